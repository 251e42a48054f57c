"""FinetuneConfig is the one place a finetune setting is written: a new field is a CLI option
with its help and bounds, a YAML key, and part of the command the web UI runs."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import typer
from typer.testing import CliRunner

import hydra_edge.cli.app as cli
from hydra_edge.errors import UserError
from hydra_edge.settings import setting
from hydra_edge.training.config import FinetuneConfig


@dataclass
class WithKnob(FinetuneConfig):
    new_knob: int = setting(7, "A setting added in one place (test).", ge=1)


def knob_app() -> typer.Typer:
    app = typer.Typer(rich_markup_mode=None, pretty_exceptions_enable=False)
    app.command("finetune")(cli.finetune_command(WithKnob))
    app.command("other")(lambda: None)  # two commands, so `finetune` stays a subcommand
    return app


def test_a_new_field_is_an_option_with_its_help_and_bounds(tmp_path, monkeypatch):
    runner = CliRunner()
    shown = runner.invoke(knob_app(), ["finetune", "--help"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0 and "--new-knob" in shown.output and "A setting added in one place" in shown.output

    seen = []
    monkeypatch.setattr(cli, "run_and_report", lambda settings, explicit: seen.append((settings, explicit)))
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("new-knob: 9\nmax_steps: 3\n")
    assert runner.invoke(knob_app(), ["finetune", "--config", str(yaml_file)]).exit_code == 0
    assert runner.invoke(knob_app(), ["finetune", "--config", str(yaml_file), "--new-knob", "11"]).exit_code == 0
    assert [(s.new_knob, s.max_steps) for s, _ in seen] == [(9, 3), (11, 3)]
    assert isinstance(seen[0][0], WithKnob) and "new_knob" in seen[1][1]

    refused = runner.invoke(knob_app(), ["finetune", "--new-knob", "0"])
    assert isinstance(refused.exception, UserError) and "--new-knob 0: must be >= 1" in str(refused.exception)
    yaml_file.write_text("new_knob: lots\n")
    refused = runner.invoke(knob_app(), ["finetune", "--config", str(yaml_file)])
    assert isinstance(refused.exception, UserError) and "'new_knob'" in str(refused.exception)


def test_a_new_field_is_in_the_settings_the_ui_runs(tmp_path):
    from hydra_edge.training.config import build_config, read_yaml_config
    from hydra_edge.ui.training import TrainSettings, build_command, config_yaml
    from hydra_edge.ui.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    (ws.root / "data" / "train.jsonl").write_text('{"text": "hello"}\n')
    argv, out, config = build_command(ws, TrainSettings(data="data/train.jsonl", eval_data=""), "r1", WithKnob)
    assert argv == ["finetune", "--config", "runs/r1/config.yaml"] and out == ws.root / "runs" / "r1"
    text = config_yaml(config)
    assert "new_knob: 7" in text
    (tmp_path / "written.yaml").write_text(text)
    assert build_config(read_yaml_config(tmp_path / "written.yaml", WithKnob), {}, WithKnob) == config


@pytest.mark.parametrize(
    "setting, value, message",
    [
        ("format", "csvish", "--format csvish: use one of auto, alpaca"),
        ("head_init", "ones", "--head-init ones: use one of zero, random"),
        ("pool_over", "answer", "--pool-over answer: use one of cluster, sample, prompt"),
        ("dropout", 1.0, "--dropout 1.0: must be >= 0 and < 1"),
        ("pooled_steps", 1.5, "--pooled-steps 1.5: must be >= 0 and <= 1"),
        ("alpha", 0.0, "--alpha 0.0: must be > 0"),
    ],
)
def test_choices_and_bounds_are_checked_once_from_the_fields(setting, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        FinetuneConfig(**{setting: value})
