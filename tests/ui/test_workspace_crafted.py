"""Crafted run folders and adapters in the workspace: every path they name stays inside it, and a
changed adapter is loaded again (no server)."""

from __future__ import annotations

import json
import os

import pytest
from workspacehelpers import workspace_with_links

from hydra_edge.errors import UserError
from hydra_edge.ui.training import TrainSettings


@pytest.fixture
def ws(tmp_path):
    return workspace_with_links(tmp_path)


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
        export_command(ws, "runs/crafted", "x", "onnx", {"mode": "adapters", "precision": "fp32"})


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
