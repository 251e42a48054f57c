"""The pieces of the UI that turn form values into a CLI command: the model list and its
choice, and the argument list with its YAML settings (no server)."""

from __future__ import annotations

import pytest
from workspacehelpers import workspace_with_links

from hydra_edge.errors import UserError
from hydra_edge.training.config import build_config, read_yaml_config
from hydra_edge.ui.training import TrainSettings, build_command, config_yaml, resolve_model


@pytest.fixture
def ws(tmp_path):
    return workspace_with_links(tmp_path)


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


def test_model_list_offers_installed_presets_and_workspace_models(ws, monkeypatch, tmp_path):
    import hydra_edge.models.gguf as gguf_models
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
