"""The UI's metrics reader: it follows metrics.jsonl as training appends to it (half-written
lines, a rewrite on resume), and the loss plot draws training and held-out rows (no server)."""

from __future__ import annotations

import json
import math
import os

from hydra_edge.ui.jobs import MetricsReader


def test_metrics_reader_follows_appends_partial_lines_and_rewrites(tmp_path):
    path = tmp_path / "metrics.jsonl"
    reader = MetricsReader(path)
    assert reader.read() == []
    rows = [{"step": i, "loss": 1.0 / i} for i in range(1, 6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]) + '{"step": 4, "lo')  # a half-written line
    assert [r["step"] for r in reader.read()] == [1, 2, 3]
    with open(path, "a") as f:
        f.write('ss": 0.25}\n')
    assert [r["step"] for r in reader.read()] == [1, 2, 3, 4]
    # --resume from a checkpoint at step 2 rewrites the file, then appends steps 3, 4, 5 again
    tmp = tmp_path / "rewritten"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    os.replace(tmp, path)
    assert [r["step"] for r in reader.read()] == [1, 2]
    with open(path, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows[2:]))
    assert [r["step"] for r in reader.read()] == [1, 2, 3, 4, 5]


def test_metrics_reader_keeps_eval_rows_beside_their_step_and_the_plot_shows_both(tmp_path):
    from hydra_edge.ui.train_status import split_rows
    from hydra_edge.ui.train_tab import _loss_frame

    path = tmp_path / "metrics.jsonl"
    reader = MetricsReader(path)
    train = [{"step": i, "loss": 1.0 / i, "total_steps": 4} for i in range(1, 5)]
    evals = [{"step": 2, "kind": "eval", "eval_loss": 0.9}, {"step": 4, "kind": "eval", "eval_loss": 0.7}]
    path.write_text("".join(json.dumps(r) + "\n" for r in [*train[:2], evals[0], *train[2:], evals[1]]))
    rows = reader.read()
    assert [(r["step"], r.get("kind")) for r in rows] == [(1, None), (2, None), (2, "eval"), (3, None), (4, None),
                                                          (4, "eval")]  # fmt: skip
    training, held_out = split_rows(rows)
    assert [r["step"] for r in training] == [1, 2, 3, 4] and [r["eval_loss"] for r in held_out] == [0.9, 0.7]
    frame = _loss_frame(rows)
    assert list(frame[frame.series == "held-out"].itertuples(index=False, name=None)) == [
        ("held-out", 2, 0.9),
        ("held-out", 4, 0.7),
    ]
    assert len(frame[frame.series == "training"]) == 4
    # before the first eval the held-out series is there, drawn as nothing (the chart keeps the
    # series of its first drawing)
    early = _loss_frame(rows[:2])
    assert list(early.series) == ["training", "training", "held-out"] and math.isnan(early.loss.iloc[-1])
    # a resume from step 2 rewrites the file: the eval row of step 2 stays, later ones go
    with open(path, "a") as f:
        f.write(json.dumps({"step": 3, "loss": 0.3, "total_steps": 4}) + "\n")
    assert [(r["step"], r.get("kind")) for r in reader.read()] == [(1, None), (2, None), (2, "eval"), (3, None)]
