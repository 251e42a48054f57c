"""The Train tab's router health (routing spread, head cosine, per-head share, the collapse
warning) and its symmetry-breaking settings, without a server or a browser: the form's widgets,
the API function the Start button calls, and the status it draws."""

from __future__ import annotations

import dataclasses
import inspect
import json
import subprocess
from typing import get_args

import pytest

from hydra_edge.choices import HEAD_INITS, RouterLossSchedule
from hydra_edge.errors import UserError
from hydra_edge.training.config import FinetuneConfig
from hydra_edge.ui.jobs import Job, MetricsReader
from hydra_edge.ui.training import TrainSettings, build_command, config_yaml
from hydra_edge.ui.workspace import Workspace

NEW_SETTINGS = ("head_dropout", "router_temperature", "router_top_k", "router_balance", "router_loss_schedule")
CHOSEN = {
    "heads": "3",
    "head_init": "random",
    "head_dropout": 0.1,
    "router_temperature": 0.5,
    "router_top_k": 2,
    "router_balance": 0.2,
    "router_loss_schedule": "linear",
}


@pytest.fixture
def ws(tmp_path):
    workspace = Workspace(tmp_path / "ws")
    (workspace.root / "data" / "train.jsonl").write_text('{"text": "hello"}\n')
    return workspace


def test_new_settings_default_to_finetunes_own():
    defaults, form = FinetuneConfig(), TrainSettings()
    assert {name: getattr(form, name) for name in NEW_SETTINGS} == {
        name: getattr(defaults, name) for name in NEW_SETTINGS
    }


def test_new_settings_reach_the_config_the_run_reads(ws):
    settings = TrainSettings(data="data/train.jsonl", eval_data="", **CHOSEN)
    _, _, config = build_command(ws, settings, "r1")
    assert {name: getattr(config, name) for name in CHOSEN} == CHOSEN
    text = config_yaml(config)
    assert "head_dropout: 0.1" in text and "router_loss_schedule: linear" in text and "router_top_k: 2" in text


@pytest.mark.parametrize(
    "change, message",
    [
        ({"head_dropout": 1.0}, "--head-dropout 1.0: must be >= 0 and < 1"),
        ({"router_temperature": 0}, "--router-temperature 0.0: must be > 0"),
        ({"router_top_k": 1.5}, "router top-k: 1.5 must be a whole number"),
        ({"router_top_k": 4, "heads": "3"}, "--router-top-k 4: at most --heads 3"),
        ({"router_balance": -0.1}, "--router-balance -0.1: must be >= 0"),
        ({"router_loss_schedule": "cubic"}, "--router-loss-schedule cubic"),
        ({"head_dropout": "lots"}, "head dropout: 'lots' is not a number"),
    ],
)
def test_bad_new_settings_are_refused_with_finetunes_message(ws, change, message):
    settings = TrainSettings(data="data/train.jsonl", eval_data="", **change)
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        build_command(ws, settings, "r2")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The app's Blocks, built but not launched."""
    pytest.importorskip("gradio")
    from hydra_edge.ui.app import create_ui

    demo = create_ui(tmp_path_factory.mktemp("ui-ws"))
    yield demo
    demo.close()


def _start_function(demo):
    (fn,) = [f for f in demo.fns.values() if f.api_name == "start_training"]
    return fn


def test_the_form_offers_the_settings_with_the_configs_choices_help_and_bounds(app):
    from hydra_edge.ui.train_tab import FORM_FIELDS

    fields = {f.name: f.metadata for f in dataclasses.fields(FinetuneConfig)}
    widgets = {block.elem_id: block for block in app.blocks.values() if getattr(block, "elem_id", None)}
    assert widgets["head-dropout"].minimum == 0 and widgets["head-dropout"].maximum == 1
    assert widgets["router-temperature"].minimum == 0 and widgets["router-temperature"].maximum is None
    assert widgets["router-top-k"].minimum == 0 and widgets["router-top-k"].precision == 0
    assert widgets["router-balance"].minimum == 0
    for name in ("head_dropout", "router_temperature", "router_top_k", "router_balance"):
        widget = widgets[name.replace("_", "-")]
        assert widget.info == fields[name]["help"] and widget.value == getattr(FinetuneConfig(), name)
    radios = {block.label: block for block in app.blocks.values() if type(block).__name__ == "Radio"}
    assert [c[1] for c in radios["Head init"].choices] == list(HEAD_INITS)
    schedule = radios["Router loss schedule"]
    assert [c[1] for c in schedule.choices] == list(get_args(RouterLossSchedule))
    assert schedule.info == fields["router_loss_schedule"]["help"]
    # The Start button's inputs are the form in TrainSettings' order, each new box where its field is.
    start = _start_function(app)
    assert list(inspect.signature(start.fn).parameters) == FORM_FIELDS
    for name in ("head_dropout", "router_temperature", "router_top_k", "router_balance"):
        assert start.inputs[FORM_FIELDS.index(name)] is widgets[name.replace("_", "-")]
    assert start.inputs[FORM_FIELDS.index("router_loss_schedule")] is schedule


def test_start_passes_the_new_settings_into_the_command_it_runs(app, monkeypatch):
    import hydra_edge.ui.train_tab as train_tab

    started = []
    monkeypatch.setattr(train_tab, "start_training", lambda ws, jobs, settings: started.append((ws, settings)))
    values = {**dataclasses.asdict(TrainSettings()), **CHOSEN, "data": "data/demo/train.jsonl", "run_name": "api"}
    status = _start_function(app).fn(**values)
    assert status["state"] == "idle"
    ((ws, settings),) = started
    _, _, config = build_command(ws, settings)
    assert {name: getattr(config, name) for name in CHOSEN} == CHOSEN


class _Running:
    """A finetune process that is still running (the status only polls it)."""

    pid = 4242

    def poll(self):
        return None


def _status_of(ws, rows: list[dict], run: str = "r") -> dict:
    """training_status of a running job whose metrics.jsonl holds these rows."""
    from types import SimpleNamespace

    from hydra_edge.ui.train_status import training_status

    out = ws.root / "runs" / run
    out.mkdir(parents=True)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    process: subprocess.Popen = _Running()  # type: ignore[assignment]
    job = Job("train", run, out, ["finetune"], out / "train.log", process, metrics=MetricsReader(out / "metrics.jsonl"))
    return training_status(ws, SimpleNamespace(last={"train": job}, spawned=1))


def _train_row(step: int) -> dict:
    return {"step": step, "total_steps": 200, "loss": 1.0, "lr": 1e-3, "tokens_per_s": 100.0, "step_time_s": 0.1}


def _eval_row(step: int, collapsed: bool) -> dict:
    summary = {"routing_spread": 0.004, "head_cosine": 0.94, "max_head_share": 0.62, "head_share": [0.62, 0.38]}
    return {"step": step, "kind": "eval", "eval_loss": 1.5, "router": {}, "router_summary": summary,
            "heads_collapsed": collapsed}  # fmt: skip


def test_status_shows_the_latest_router_health_and_the_collapse_warning(ws):
    from hydra_edge.ui.train_tab import _status_markdown

    status = _status_of(ws, [_train_row(1), _eval_row(1, False), _train_row(2), _eval_row(2, True), _train_row(3)])
    assert status["state"] == "running" and status["router"]["step"] == 2 and status["router"]["heads_collapsed"]
    assert status["router"]["head_cosine"] == 0.94 and status["router"]["head_share"] == [0.62, 0.38]
    text = _status_markdown(status)
    assert "Router at step 2: routing spread **0.004** · head cosine **0.94** · head share 62% / 38%" in text
    assert "The heads have collapsed** (mean head cosine 0.94 at step 2)" in text and "one LoRA" in text


def test_status_without_a_collapse_or_before_the_first_eval_shows_no_warning(ws):
    from hydra_edge.ui.train_tab import _status_markdown

    status = _status_of(ws, [_train_row(1), _eval_row(1, False), _train_row(2)])
    text = _status_markdown(status)
    assert "routing spread **0.004**" in text and "collapsed" not in text

    early = _status_of(ws, [_train_row(1)], run="early")
    assert early["router"] is None and "Router" not in _status_markdown(early)
