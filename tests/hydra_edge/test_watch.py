"""Watching a run: held-out evals during training (metrics.jsonl `eval` rows), early stopping
that keeps the best step's adapter (also across --resume), and the experiment trackers
(TensorBoard, MLflow, W&B offline), each read back with its own reader."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from cli_helpers import FP32, assert_one_line_error, run_in_process
from safetensors.torch import load_file

from hydra_edge.errors import TrainingStopped
from hydra_edge.models.tiny import DEMO_EVAL, DEMO_TRAIN
from hydra_edge.training.config import build_config

pytestmark = pytest.mark.slow


def settings(out: Path, **more) -> dict:
    small_eval = out.parent / "eval.jsonl"
    small_eval.write_text("".join(DEMO_EVAL.read_text().splitlines(keepends=True)[:12]))
    return {**FP32, "data": [str(DEMO_TRAIN)], "eval_data": str(small_eval), "out": str(out), **more}


def rows(out: Path, kind: str | None = None) -> list[dict]:
    found = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in found if r.get("kind") == kind]


def test_eval_rows_and_every_tracker_read_back(tmp_path, monkeypatch):
    from hydra_edge.training.finetune import run_finetune

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # what the run sets for its own store
    out = tmp_path / "watched"
    config = settings(out, max_steps=20, eval_every=5, eval_em_rows=4, report_to="all", run_name="tiny-watch")
    run_finetune(build_config({}, config))

    evals = rows(out, "eval")
    assert [r["step"] for r in evals] == [5, 10, 15, 20]
    first = evals[0]
    assert first["eval_loss"] > 0 and first["eval_em_rows"] == 4 and 0 <= first["eval_exact_match"] <= 1
    assert set(first["eval_cluster_loss"]) == {"0", "1"}  # --heads 2
    health = next(iter(first["router"].values()))
    assert 0 <= health["gate_entropy"] <= 1 and sum(health["head_share"]) == pytest.approx(1.0)
    training = rows(out, None)
    assert [r["step"] for r in training] == list(range(1, 21))

    # TensorBoard: the event files under <out>/runs/<run name>
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "runs" / "tiny-watch"))
    events.Reload()
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == list(range(1, 21))
    assert [e.value for e in losses] == pytest.approx([r["loss"] for r in training], rel=1e-5)
    assert [e.value for e in events.Scalars("eval/loss")] == pytest.approx([r["eval_loss"] for r in evals], rel=1e-5)
    assert "eval/loss_cluster_1" in events.Tags()["scalars"]
    assert any(tag.startswith("router/") and tag.endswith("/head_0_share") for tag in events.Tags()["scalars"])

    # MLflow: the file store under <out>/mlruns, read with its client
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("hydra-edge")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tiny-watch"
    assert float(run.data.params["lr"]) == pytest.approx(build_config({}, config).lr)
    assert run.data.params["heads"] == "2" and run.data.params["eval_every"] == "5"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(1, 21))
    assert len(client.get_metric_history(run.info.run_id, "eval/exact_match")) == 4

    # W&B offline: its run folder under <out>/wandb
    offline = list((out / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("run-*.wandb"))


def test_evals_do_not_change_training(tmp_path):
    """Scoring between steps draws no random numbers and leaves the model in training mode:
    the losses and the adapter equal a run without --eval-every."""
    from hydra_edge.training.finetune import run_finetune

    plain, watched = tmp_path / "plain", tmp_path / "watched"
    run_finetune(build_config({}, settings(plain, max_steps=8, dropout=0.1)))
    run_finetune(build_config({}, settings(watched, max_steps=8, dropout=0.1, eval_every=3)))
    assert [r["loss"] for r in rows(plain)] == [r["loss"] for r in rows(watched)]
    a, b = load_file(str(plain / "adapter_model.safetensors")), load_file(str(watched / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# Held-out loss by step: falls to step 6, then rises; with patience 2 the run stops at step 12.
SCRIPTED_LOSS = {3: 2.0, 6: 1.5, 9: 1.7, 12: 1.8, 15: 1.9, 18: 2.0}


def scripted_scores(monkeypatch, current: dict):
    from hydra_edge.training.held_out import HeldOut

    def score(self, model):
        loss = SCRIPTED_LOSS[current["step"]]
        return {"kind": "eval", "eval_loss": loss, "eval_perplexity": None, "eval_exact_match": None,
                "eval_em_rows": 0, "eval_cluster_loss": {}, "router": {}}  # fmt: skip

    monkeypatch.setattr(HeldOut, "score", score)


def test_early_stopping_keeps_the_best_step_and_resume_agrees(tmp_path, monkeypatch):
    from hydra_edge.adapter.inject import adapter_state_dict
    from hydra_edge.training.finetune import run_finetune

    current, weights = {}, {}

    def on_step(step, model, skipped):
        current["step"] = step
        weights[step] = {k: v.clone() for k, v in adapter_state_dict(model).items()}  # a copy, not the live tensors

    scripted_scores(monkeypatch, current)
    straight = tmp_path / "straight"
    config = settings(straight, max_steps=18, eval_every=3, early_stopping=2, save_every=4)
    result = run_finetune(build_config({}, config), on_step=on_step)
    assert result["train"]["steps"] == 12 and result["train"]["stopped_early"]
    assert [r["step"] for r in rows(straight, "eval")] == [3, 6, 9, 12]
    assert rows(straight)[-1]["step"] == 12
    scores = json.loads((straight / "eval_results.json").read_text())
    assert scores["best_step"] == 6 and scores["stopped_early"] is True
    saved = load_file(str(straight / "adapter_model.safetensors"))
    assert all(torch.equal(saved[k], weights[6][k]) for k in saved)  # the best step's weights, not step 12's
    assert not all(torch.equal(saved[k], weights[12][k]) for k in saved)

    # The same run stopped at step 8 (SIGTERM: a checkpoint), then resumed, ends the same way.
    stopped = tmp_path / "stopped"

    def stop_at_8(step, model, skipped):
        on_step(step, model, skipped)
        if step == 8:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingStopped):
        run_finetune(build_config({}, {**config, "out": str(stopped)}), on_step=stop_at_8)
    resumed = run_finetune(build_config({}, {**config, "out": str(stopped), "resume": True}), {"resume"}, on_step)
    assert resumed["train"]["steps"] == 12 and resumed["train"]["best_step"] == 6
    again = load_file(str(stopped / "adapter_model.safetensors"))
    assert all(torch.equal(again[k], saved[k]) for k in saved)
    assert [r["step"] for r in rows(stopped, "eval")] == [3, 6, 9, 12]


def test_flags_that_need_each_other_and_missing_packages(tmp_path, monkeypatch):
    import importlib.util

    assert_one_line_error(run_in_process("finetune", "--early-stopping", "2"), "--early-stopping", "--eval-every")
    assert_one_line_error(
        run_in_process("finetune", "--data", str(DEMO_TRAIN), "--eval-every", "5", "--out", str(tmp_path / "a")),
        "--eval-every",
        "--eval-data",
    )
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    assert_one_line_error(
        run_in_process("finetune", "--report-to", "all", "--out", str(tmp_path / "b")), "hydra-edge[mlflow]"
    )
