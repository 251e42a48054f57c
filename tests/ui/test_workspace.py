"""The UI's path safety and the pieces that turn form values into a CLI command (no server)."""

from __future__ import annotations

import json
import math
import os

import pytest

from hydra_edge.config import build_config, read_yaml_config
from hydra_edge.errors import UserError
from hydra_edge.ui.datasets import _safe_file_name
from hydra_edge.ui.jobs import MetricsReader
from hydra_edge.ui.training import TrainSettings, build_command, config_yaml, resolve_model
from hydra_edge.ui.workspace import Workspace


@pytest.fixture
def ws(tmp_path):
    workspace = Workspace(tmp_path / "ws")
    (workspace.root / "data" / "train.jsonl").write_text('{"text": "hello"}\n')
    (workspace.root / "runs" / "r1").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jsonl").write_text('{"text": "secret"}\n')
    os.symlink(outside, workspace.root / "data" / "escape")  # a link that leads out
    os.symlink(workspace.root / "data" / "train.jsonl", workspace.root / "data" / "alias.jsonl")  # stays inside
    return workspace


@pytest.mark.parametrize(
    "typed, expected",
    [
        ("data/train.jsonl", "data/train.jsonl"),
        ("./data/train.jsonl", "data/train.jsonl"),
        ("data//train.jsonl", "data/train.jsonl"),
        ("  data/train.jsonl  ", "data/train.jsonl"),
        ("data/alias.jsonl", "data/train.jsonl"),  # a symlink inside the workspace is fine
        ("runs/r1", "runs/r1"),
        ("{root}/data/train.jsonl", "data/train.jsonl"),  # absolute, inside
    ],
)
def test_paths_inside_the_workspace_resolve(ws, typed, expected):
    assert ws.rel(ws.resolve(typed.format(root=ws.root))) == expected


@pytest.mark.parametrize(
    "typed, reason",
    [
        ("../outside/secret.jsonl", "'..' is not allowed"),
        ("data/../../outside/secret.jsonl", "'..' is not allowed"),
        ("data/../data/train.jsonl", "'..' is not allowed"),  # refused even when it would stay inside
        ("..\\outside\\secret.jsonl", "'..' is not allowed"),
        ("/etc/passwd", "outside the workspace"),
        ("{outside}/secret.jsonl", "outside the workspace"),
        ("{root}-sibling/x.jsonl", "outside the workspace"),  # a prefix of the root is not inside it
        ("data/escape/secret.jsonl", "leads outside the workspace"),
        ("~/secret.jsonl", "'~' is not allowed"),
        ("", "empty"),
        ("   ", "empty"),
        ("data/nothing.jsonl", "not found"),
        ("data/x\x00.jsonl", "invalid characters"),
    ],
)
def test_paths_leaving_the_workspace_are_refused(ws, typed, reason):
    typed = typed.format(root=ws.root, outside=ws.root.parent / "outside")
    with pytest.raises(UserError, match=reason):
        ws.resolve(typed, "data")


def test_kind_checks(ws):
    with pytest.raises(UserError, match="not a file"):
        ws.resolve("runs/r1", "data", kind="file")
    with pytest.raises(UserError, match="not a folder"):
        ws.resolve("data/train.jsonl", "adapter", kind="dir")
    assert not ws.resolve("runs/new", "run", must_exist=False).exists()


@pytest.mark.parametrize(
    "name, ok",
    [
        ("run-1", True),
        ("my_run.v2", True),
        ("A", True),
        ("", False),
        ("../x", False),
        ("a/b", False),
        (".hidden", False),
        ("-x", False),
        ("x" * 65, False),
        ("with space", False),
    ],
)
def test_new_folder_names(ws, name, ok):
    if ok:
        assert ws.new_folder("runs", name, "run name") == ws.root / "runs" / name
    else:
        with pytest.raises(UserError):
            ws.new_folder("runs", name, "run name")


@pytest.mark.parametrize(
    "uploaded, stored",
    [
        ("train.jsonl", "train.jsonl"),
        ("My Data (1).JSONL", "My_Data_1.jsonl"),
        ("../../etc/passwd.json", "passwd.json"),
        ("..\\..\\x.csv", "x.csv"),
        ("ünïcode.parquet", "n_code.parquet"),
        (".jsonl", "upload.jsonl"),
    ],
)
def test_upload_names_are_made_safe(uploaded, stored):
    assert _safe_file_name(uploaded) == stored


def test_demo_data_is_copied_into_a_new_workspace(ws):
    assert "data/demo/train.jsonl" in ws.data_files()
    assert "data/demo/eval.jsonl" in ws.data_files()
    assert "data/train.jsonl" in ws.data_files()


@pytest.mark.parametrize(
    "typed, expected",
    [
        ("tiny", "tiny"),
        ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct"),
        ("gpt2", "gpt2"),
        ("models/local", "models/local"),
    ],
)
def test_resolve_model(ws, typed, expected):
    (ws.root / "models" / "local").mkdir()
    (ws.root / "models" / "local" / "config.json").write_text("{}")
    assert resolve_model(ws, typed) == expected


@pytest.mark.parametrize("typed", ["/etc", "../outside", "./runs/r1", "models/missing/x", "bad id!"])
def test_resolve_model_refuses(ws, typed):
    with pytest.raises(UserError):
        resolve_model(ws, typed)


def test_build_command_is_an_argument_list_with_workspace_paths(ws):
    settings = TrainSettings(
        data="data/train.jsonl", eval_data="", max_steps=20, seq_len=64, batch_size=4, run_name="r2; rm -rf /"
    )
    with pytest.raises(UserError, match="run name"):
        build_command(ws, settings)
    settings.run_name = "r2"
    argv, out, config = build_command(ws, settings)
    assert out == ws.root / "runs" / "r2"
    assert argv == ["finetune", "--config", "runs/r2/config.yaml"]
    assert config.model == "tiny" and config.data == ["data/train.jsonl"] and config.out == "runs/r2"
    assert config.max_steps == 20 and config.lr == 0.003 and config.eval_data is None
    # The YAML the run reads gives finetune exactly these settings back.
    path = ws.root / "settings.yaml"
    path.write_text(config_yaml(config))
    assert build_config(read_yaml_config(path), {}) == config


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rank": 0}, "--rank 0"),
        ({"rank": 2.5}, "whole number"),
        ({"lr": "fast"}, "not a number"),
        ({"heads": "many"}, "--heads many"),
        ({"data": "../x.jsonl"}, "'..' is not allowed"),
        ({"eval_data": "/etc/passwd"}, "outside the workspace"),
        ({"length": "forever"}, "steps or epochs"),
    ],
)
def test_build_command_refuses_bad_values(ws, change, message):
    settings = TrainSettings(data="data/train.jsonl", eval_data="", run_name="r3")
    for key, value in change.items():
        setattr(settings, key, value)
    with pytest.raises(UserError, match=message):
        build_command(ws, settings)


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


def _outside_arrow_file(ws) -> str:
    import pyarrow as pa

    secret = ws.root.parent / "secret.arrow"
    table = pa.table({"text": ["a row of a file outside the workspace"]})
    with pa.OSFile(str(secret), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return str(secret)


def test_ui_data_must_be_a_data_file_or_datasets_folder_under_data(ws):
    from hydra_edge.ui.datasets import find_clusters, validate_data

    # The attack: an uploaded state.json in data/ itself, naming an Arrow file elsewhere on the server.
    (ws.root / "data" / "state.json").write_text(json.dumps({"_data_files": [{"filename": _outside_arrow_file(ws)}]}))
    for call in (lambda d: validate_data(ws, d), lambda d: find_clusters(ws, d)):
        for typed in ("data", ".", "runs/r1", "data/"):
            with pytest.raises(UserError, match="data file or datasets folder"):
                call(typed)
    assert ws.rel(ws.data_source("data/train.jsonl")) == "data/train.jsonl"


def test_ui_datasets_folder_naming_an_outside_file_is_refused(ws):
    from hydra_edge.ui.datasets import validate_data

    folder = ws.root / "data" / "uploaded"
    folder.mkdir()
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": _outside_arrow_file(ws)}]}))
    assert "data/uploaded" in ws.data_files()
    with pytest.raises(UserError, match="outside"):
        validate_data(ws, "data/uploaded")
    settings = TrainSettings(data="data/uploaded", eval_data="")
    _, _, config = build_command(ws, settings, "r2")  # the command is built; the run itself refuses the folder
    assert config.data == ["data/uploaded"]
    with pytest.raises(UserError, match="data file or datasets folder"):
        build_command(ws, TrainSettings(data="runs/r1", eval_data=""), "r3")


def test_model_list_offers_installed_presets_and_workspace_models(ws, monkeypatch, tmp_path):
    import hydra_edge.gguf_models as gguf_models
    from hydra_edge.ui.training import model_choices, resolve_model

    (ws.root / "models" / "mine.gguf").write_bytes(b"GGUF")
    (ws.root / "models" / "hf").mkdir()
    (ws.root / "models" / "hf" / "config.json").write_text("{}")
    monkeypatch.setattr(gguf_models, "gemma_installed", lambda: True)
    assert model_choices(ws) == ["tiny", "gemma3-270m", "models/hf", "models/mine.gguf"]
    monkeypatch.setattr(gguf_models, "gemma_installed", lambda: False)
    assert model_choices(ws) == ["tiny", "models/hf", "models/mine.gguf"]
    assert resolve_model(ws, "gemma3-270m") == "gemma3-270m"
    assert resolve_model(ws, "models/mine.gguf") == "models/mine.gguf"


# -- crafted run folders and adapters: every path they name stays inside the workspace -------------


class NoJobs:
    """A job manager that fails the test if anything is started."""

    def start(self, *args, **kwargs):
        raise AssertionError("a job was started")


def _stopped_run(ws, **saved) -> str:
    """runs/crafted: a run_config.json with `saved` over the form's settings, and one checkpoint."""
    from hydra_edge.ui.training import build_command

    _, _, config = build_command(ws, TrainSettings(data="data/train.jsonl", eval_data=""), "crafted")
    run = ws.root / "runs" / "crafted"
    state = run / "checkpoints" / "step-000002"
    state.mkdir(parents=True)
    (state / "trainer_state.json").write_text("{}")
    (run / "run_config.json").write_text(json.dumps({**config.to_dict(), **saved}))
    return "runs/crafted"


@pytest.mark.parametrize(
    "saved, needle",
    [
        ({"data": ["{outside}/secret.jsonl"]}, "training data"),
        ({"data": ["data/escape/secret.jsonl"]}, "training data"),
        ({"eval_data": "{outside}/secret.jsonl"}, "held-out data"),
        ({"model": "{outside}"}, "outside the workspace"),
        ({"chat_template": "{outside}/t.jinja"}, "chat template"),
        ({"report_to": "tensorboard", "run_name": "{outside}/events"}, "--run-name"),
        ({"run_name": "../../events"}, "--run-name"),
    ],
)
def test_resume_refuses_a_run_folder_naming_paths_outside_the_workspace(ws, tmp_path, saved, needle):
    from hydra_edge.ui.training import resume_training

    outside = str(tmp_path / "outside")
    (tmp_path / "outside" / "t.jinja").write_text("{{ messages }}")
    run = _stopped_run(ws, **{k: json.loads(json.dumps(v).replace("{outside}", outside)) for k, v in saved.items()})
    with pytest.raises(UserError, match=needle):
        resume_training(ws, NoJobs(), run)


def test_resume_of_a_stopped_run_with_workspace_paths_starts(ws):
    from hydra_edge.ui.training import resume_training

    class Started(Exception):
        pass

    class RecordingJobs:
        def start(self, kind, name, out, argv, *args, **kwargs):
            raise Started(argv)

    with pytest.raises(Started, match="--resume"):
        resume_training(ws, RecordingJobs(), _stopped_run(ws))


def _adapter_naming_base(folder, base_model: str):
    """A minimal well-formed adapter folder whose base_model is base_model."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    config = {
        "format_version": 1,
        "base_model": base_model,
        "base_fingerprint": "st-0",
        "quantization": "none",
        "r": 2,
        "alpha": 4.0,
        "heads": 1,
        "target_modules": ["m"],
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    weights = {"m.hydra_A": torch.zeros(2, 4), "m.hydra_B": torch.zeros(1, 4, 2), "m.hydra_router": torch.zeros(1, 4)}
    save_file(weights, str(folder / "adapter_model.safetensors"))


@pytest.mark.parametrize("base", ["{outside}", "data/escape", "{outside}/model.gguf"])
def test_an_adapter_whose_base_lies_outside_the_workspace_is_neither_chatted_with_nor_exported(ws, tmp_path, base):
    from hydra_edge.ui.chatting import ChatModels
    from hydra_edge.ui.exporting import build_command as export_command

    (tmp_path / "outside" / "config.json").write_text("{}")
    (tmp_path / "outside" / "model.gguf").write_bytes(b"GGUF")
    _adapter_naming_base(ws.root / "runs" / "crafted", base.replace("{outside}", str(tmp_path / "outside")))
    with pytest.raises(UserError, match="base_model"):
        ChatModels(ws).get("runs/crafted")
    with pytest.raises(UserError, match="base_model"):
        export_command(ws, "runs/crafted", "x", "adapters", "fp32")


def test_an_adapter_on_a_workspace_model_loads_that_folder(ws):
    from hydra_edge.ui.training import adapter_base

    (ws.root / "models" / "local").mkdir()
    (ws.root / "models" / "local" / "config.json").write_text("{}")
    _adapter_naming_base(ws.root / "runs" / "a", "models/local")
    assert adapter_base(ws, ws.root / "runs" / "a") == str(ws.root / "models" / "local")
    _adapter_naming_base(ws.root / "runs" / "b", "tiny")
    assert adapter_base(ws, ws.root / "runs" / "b") == "tiny"


def test_chat_reloads_an_adapter_whose_config_changed_even_with_its_times_kept(ws, monkeypatch):
    from hydra_edge.ui import chatting

    loads = []
    monkeypatch.setattr(chatting, "open_engine", lambda *args, **kwargs: loads.append(args) or object())
    _adapter_naming_base(ws.root / "runs" / "a", "tiny")
    models = chatting.ChatModels(ws)
    models.get("runs/a")
    models.get("runs/a")
    assert len(loads) == 1
    config_file = ws.root / "runs" / "a" / "adapter_config.json"
    times = config_file.stat()
    config_file.write_text(config_file.read_text().replace('"alpha": 4.0', '"alpha": 8.0'))
    os.utime(config_file, ns=(times.st_atime_ns, times.st_mtime_ns))  # as `cp -p` would leave it
    models.get("runs/a")
    assert len(loads) == 2
