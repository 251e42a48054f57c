"""The Train tab: base model, data (with validation before anything starts), HydraLoRA and
training settings, the equivalent CLI command, Start / Stop / Resume, and a live view of the run
(progress, ETA, loss and learning-rate curves, log) polled from what the CLI writes.

API names: upload_data, validate_data, start_training, stop_training, resume_training,
training_status.
"""

from __future__ import annotations

import html
import inspect
import math
import os

import gradio as gr

from hydra_edge.ui.datasets import store_upload, validate_data
from hydra_edge.ui.handlers import AppContext, refreshed, user_errors
from hydra_edge.ui.train_form import layout
from hydra_edge.ui.train_status import format_seconds, metric_rows, plot_rows, split_rows, training_status
from hydra_edge.ui.training import (
    TrainSettings,
    build_command,
    defaults_for,
    model_choices,
    resume_training,
    run_preview,
    settings_from_kwargs,
    start_training,
    stop_training,
)

POLL_SECONDS = 1.0
FORM_FIELDS = list(TrainSettings.__dataclass_fields__)  # the order of start_training's parameters
# start_training's API signature: the TrainSettings fields, by name.
START_SIGNATURE = inspect.Signature(
    [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in FORM_FIELDS]
)


def build(ctx: AppContext, demo: gr.Blocks) -> None:
    s = TrainSettings()
    w = layout(ctx.ws, s, ctx.ws.data_files(), ctx.max_upload_bytes / 2**20)
    assert len(w.form) == len(FORM_FIELDS)
    results = gr.JSON(visible=False)
    report_json = _wire_data(ctx, w, results)
    _wire_settings(ctx, w)
    draw, panel = _wire_run(ctx, w, results)
    _wire_page_load(ctx, demo, w, draw, panel, report_json)


def _wire_data(ctx: AppContext, w, results: gr.JSON) -> gr.JSON:
    """Upload and validation of the training data; returns the validation report's holder."""
    ws = ctx.ws

    @user_errors
    def upload_data(file: str | None) -> dict:
        """Stores an uploaded data file under data/ and validates it."""
        if not file:
            raise gr.Error("upload: no file received")
        return store_upload(ws, file, ctx.max_upload_bytes)

    def after_upload(report: dict, current_eval: str):
        files = ws.data_files()
        return (gr.update(choices=files, value=report["file"]), refreshed(["", *files], current_eval), None)

    w.upload.upload(upload_data, [w.upload], [results], api_name="upload_data", show_progress="minimal").success(
        after_upload, [results, w.eval_data], [w.data, w.eval_data, w.upload], api_visibility="private"
    )

    @user_errors
    def validate(data: str, format: str = "auto") -> dict:
        """Format, valid rows and per-row problems of a workspace data file."""
        return validate_data(ws, data, format)

    report_json = gr.JSON(visible=False)
    shown = [w.data_report, w.problems]
    gr.on(
        [w.data.change, w.fmt.change], validate, [w.data, w.fmt], [report_json], api_name="validate_data",
        trigger_mode="always_last", show_progress="minimal",
    ).success(_render_report, [report_json, w.skip_invalid], shown, api_visibility="private").failure(
        lambda: ("", gr.update(visible=False)), None, shown, api_visibility="private"
    )  # fmt: skip
    w.skip_invalid.change(_render_report, [report_json, w.skip_invalid], shown, api_visibility="private")
    return report_json


MODEL_DEFAULTS = ("seq_len", "batch_size", "grad_accum", "lr", "warmup", "save_every", "length", "max_steps")


def _wire_settings(ctx: AppContext, w) -> None:
    """A model's defaults when it is picked, and the equivalent command under the form."""

    def model_defaults(model_name: str):
        d = defaults_for(model_name)
        return [gr.update(value=d[k]) for k in MODEL_DEFAULTS]

    w.model.input(model_defaults, [w.model], [getattr(w, k) for k in MODEL_DEFAULTS], api_visibility="private")

    def preview(*values) -> str:
        try:
            return run_preview(ctx.ws, *build_command(ctx.ws, settings_from_kwargs(dict(zip(FORM_FIELDS, values)))))
        except Exception as exc:  # any half-typed value: show why instead of a command
            return f"# {exc}"

    gr.on(
        [c.change for c in w.form], preview, w.form, [w.command],
        api_visibility="private", show_progress="hidden", trigger_mode="always_last",
    )  # fmt: skip


def _start_api(ctx: AppContext):
    """start_training(model, data, ..., run_name): one parameter per TrainSettings field, so the API
    takes the form's settings by name (gradio reads the signature)."""

    def start_training_api(*args, **kwargs) -> dict:
        """Starts `hydra-edge finetune` with these settings (refused while a job runs); returns the status."""
        values = START_SIGNATURE.bind(*args, **kwargs).arguments
        start_training(ctx.ws, ctx.jobs, settings_from_kwargs(dict(values)))
        return training_status(ctx.ws, ctx.jobs)

    start_training_api.__signature__ = START_SIGNATURE
    return user_errors(start_training_api)


def _panel_drawer(ctx: AppContext, w):
    """draw(last_seen) -> the run panel's updates, skipping everything when nothing changed."""
    ws, jobs = ctx.ws, ctx.jobs
    seen = gr.State(None)  # what this browser tab last drew, so unchanged polls send nothing
    panel = [seen, w.status_md, w.progress, w.loss_plot, w.lr_plot, w.log, w.start, w.stop, w.resume_run]

    def draw(last_seen):
        status = training_status(ws, jobs)
        rows = metric_rows(jobs)
        job = jobs.last.get("train")
        log_size = os.path.getsize(job.log_path) if job is not None and job.log_path.exists() else 0
        key = (status.get("pid"), status["state"], status.get("phase"), len(rows), log_size)
        if key == last_seen:
            return [gr.skip()] * len(panel)
        running = status["state"] in ("running", "stopping")
        resumable = gr.update(
            choices=ws.resumable_runs(), value=status["run"] if status["state"] == "stopped" else None
        )
        return [
            key, _status_markdown(status), _progress_html(status), _loss_frame(rows),
            _frame(split_rows(rows)[0], "lr"), job.log_tail() if job is not None else "",
            gr.update(interactive=not running), gr.update(interactive=status["state"] == "running"),
            resumable if not running else gr.skip(),
        ]  # fmt: skip

    return draw, panel, seen


def _wire_run(ctx: AppContext, w, results: gr.JSON):
    """Start, stop, resume and the status API, and the panel they redraw; returns (draw, panel)."""
    ws, jobs = ctx.ws, ctx.jobs
    draw, panel, seen = _panel_drawer(ctx, w)

    @user_errors
    def stop_training_api() -> dict:
        """Stops the running training; it saves a resumable checkpoint first. Returns the status."""
        stop_training(jobs)
        return training_status(ws, jobs)

    @user_errors
    def resume_training_api(run: str, max_steps: float | None = None) -> dict:
        """Continues a stopped run (runs/<name> or <name>) from its latest checkpoint, optionally to a
        new total of max_steps; returns the status."""
        resume_training(ws, jobs, run, max_steps)
        return training_status(ws, jobs)

    def training_status_api() -> dict:
        """The current (or last) run: state, step, loss, lr, tokens/s, ETA, checkpoint, adapter."""
        return training_status(ws, jobs)

    redraw = {"fn": draw, "inputs": [gr.State(None)], "outputs": panel, "api_visibility": "private"}
    w.start.click(_start_api(ctx), w.form, [results], api_name="start_training", concurrency_limit=None).then(
        show_progress="hidden", **redraw
    )
    w.stop.click(stop_training_api, None, [results], api_name="stop_training", concurrency_limit=None).then(
        show_progress="hidden", **redraw
    )
    w.resume.click(
        resume_training_api, [w.resume_run, w.resume_steps], [results], api_name="resume_training",
        concurrency_limit=None,
    ).then(show_progress="hidden", **redraw)  # fmt: skip
    gr.api(training_status_api, api_name="training_status", concurrency_limit=None)
    timer = gr.Timer(POLL_SECONDS)
    timer.tick(draw, [seen], panel, api_visibility="private", show_progress="hidden", concurrency_limit=None)
    return draw, panel


def _wire_page_load(ctx: AppContext, demo: gr.Blocks, w, draw, panel, report_json: gr.JSON) -> None:
    ws = ctx.ws

    def on_load(current_data, current_eval, current_model):
        """A new page (or a reload) refreshes the lists and reattaches to the running job."""
        files = ws.data_files()
        return [
            refreshed(files, current_data),
            refreshed(["", *files], current_eval),
            gr.update(choices=model_choices(ws), value=current_model),
            *draw(None),
        ]

    def quiet_validate(data_file: str, data_format: str):
        """On page load: the report for the preselected file, or nothing (no error notice)."""
        try:
            return validate_data(ws, data_file, data_format) if data_file else None
        except Exception:
            return None

    demo.load(
        on_load, [w.data, w.eval_data, w.model], [w.data, w.eval_data, w.model, *panel],
        api_visibility="private", show_progress="hidden",
    ).then(quiet_validate, [w.data, w.fmt], [report_json], api_visibility="private", show_progress="hidden").then(
        _render_report, [report_json, w.skip_invalid], [w.data_report, w.problems], api_visibility="private"
    )  # fmt: skip


def _render_report(report: dict | None, skip_invalid: bool):
    if not report:
        return "", gr.update(visible=False)
    text = f"**{report['file']}**: format **{report['format']}**, **{report['rows']:,}** valid rows"
    if report["invalid"]:
        text += f", **{report['invalid']:,} invalid**"
        text += (
            " (they will be skipped)."
            if skip_invalid
            else ". Training would stop on them: fix the file, or tick *Skip invalid rows*."
        )
    else:
        text += ", no problems found."
    rows = [[p["location"], p["reason"], p["detail"]] for p in report["problems"]]
    return text, gr.update(value=rows, visible=bool(rows))


def _status_markdown(status: dict) -> str:
    text = html.escape(status["message"])
    if status.get("state") == "finished" and status.get("eval"):
        scores = status["eval"]
        em = "n/a" if scores.get("exact_match") is None else f"{100 * scores['exact_match']:.1f}%"
        text += f"\n\nHeld-out: exact-match **{em}**, loss {scores['loss']:.4f}, perplexity {scores['perplexity']:.2f}"
        per = scores.get("per_cluster") or {}
        if per:
            text += " · per cluster: " + ", ".join(f"{c}: {_percent(v.get('exact_match'))}" for c, v in per.items())
    text += _router_markdown(status.get("router"))
    if status.get("command"):
        text += f"\n\n`{html.escape(status['command'])}`"
    return text


def _router_markdown(router: dict | None) -> str:
    """The latest held-out eval's router health (train_status.latest_router), and a warning
    when that eval found the heads collapsed; "" before the first eval."""
    if not router:
        return ""
    parts = []
    if router.get("routing_spread") is not None:
        parts.append(f"routing spread **{router['routing_spread']:.3f}**")
    if router.get("head_cosine") is not None:
        parts.append(f"head cosine **{router['head_cosine']:.2f}**")
    if len(router.get("head_share") or []) > 1:  # one head takes every token: nothing to show
        parts.append("head share " + " / ".join(_percent(share) for share in router["head_share"]))
    text = f"\n\nRouter at step {router['step']}: " + " · ".join(parts) if parts else ""
    if router.get("heads_collapsed"):
        text += (
            f"\n\n⚠️ **The heads have collapsed** (mean head cosine {router['head_cosine']:.2f} at step "
            f"{router['step']}): HydraLoRA is training as one LoRA. Try Head init *random* with a Head dropout "
            "of 0.1 (More settings) to keep them apart."
        )
    return text


def _percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def _progress_html(status: dict) -> str:
    """A progress bar with step, percentage, elapsed time and ETA."""
    total, step = status.get("total_steps"), status.get("step") or 0
    if status["state"] == "idle":
        return ""
    fraction = step / total if total else 0.0
    if status["state"] == "finished":
        fraction = 1.0
    color = {"failed": "#dc2626", "stopped": "#a3a3a3", "stopping": "#f59e0b"}.get(status["state"], "#f97316")
    parts = [f"step {step}/{total}" if total else "preparing…", f"{100 * fraction:.0f}%"]
    if status.get("tokens_per_s"):
        parts.append(f"{status['tokens_per_s']:,.0f} tokens/s")
    if status.get("elapsed_s") is not None and status["state"] in ("running", "stopping"):
        parts.append(f"elapsed {format_seconds(status['elapsed_s'])}")
    if status.get("eta_s") is not None:
        parts.append(f"ETA {format_seconds(status['eta_s'])}")
    return (
        '<div style="margin:4px 0 2px 0">'
        '<div style="height:14px;border-radius:7px;background:#e5e7eb;overflow:hidden">'
        f'<div data-testid="progress-fill" style="height:100%;width:{100 * fraction:.1f}%;background:{color};'
        'transition:width .4s"></div></div>'
        f'<div style="font-size:0.85em;margin-top:4px;opacity:.8">{" · ".join(parts)}</div></div>'
    )


def _points(rows: list[dict], column: str) -> list[tuple[int, float]]:
    return [
        (r["step"], r[column])
        for r in plot_rows(rows)
        if isinstance(r.get(column), (int, float)) and math.isfinite(r[column])
    ]


def _frame(rows: list[dict], column: str):
    import pandas as pd

    return pd.DataFrame(_points(rows, column), columns=["step", column])


def _loss_frame(rows: list[dict]):
    """Training loss and, with --eval-every, held-out loss: one line each (the `series` column)."""
    import pandas as pd

    training, held_out = split_rows(rows)
    points = [("training", step, loss) for step, loss in _points(training, "loss")]
    points += [("held-out", step, loss) for step, loss in _points(held_out, "eval_loss")]
    first_step = points[0][1] if points else 0
    for series in ("training", "held-out"):
        if not any(p[0] == series for p in points):
            # A point that draws nothing: the chart keeps the series of its first drawing, so a
            # held-out line that starts later would otherwise never be drawn.
            points.append((series, first_step, math.nan))
    return pd.DataFrame(points, columns=["series", "step", "loss"])
