"""The Export tab: `hydra-edge export` of a finished run, in any registered format (its options
are the format's own, from exporters/formats/), run in the job slot, with its log while it works,
then its validation against PyTorch and the files it wrote. Past exports in the workspace can be
opened to see the same.

API names: export (runs one and returns its result), export_result (reads an existing one). The
export API takes adapter, format, name and every format's options by name (mode, precision, ...).
"""

from __future__ import annotations

import inspect
import time

import gradio as gr

from hydra_edge.errors import UserError
from hydra_edge.exporters.formats import DEFAULT_FORMAT, all_options, formats
from hydra_edge.ui.exporting import build_command, export_result, start_export
from hydra_edge.ui.handlers import AppContext, command_box, refreshed, user_errors
from hydra_edge.ui.training import command_text


def _option_widgets(registry: dict, selected: str) -> dict[str, gr.Radio]:
    """One radio per option name of any format, shown while a format that has it is selected."""
    widgets = {}
    for name, owners in registry.items():
        _, option = owners[0]
        choices = list(dict.fromkeys(c for _, o in owners for c in o.choices))  # every format's, in order
        shown = {
            "label": name.replace("_", " ").capitalize(), "info": option.help, "elem_id": f"export-{name}",
            "visible": any(fmt.name == selected for fmt, _ in owners),
        }  # fmt: skip
        widgets[name] = (
            gr.Radio(choices, value=option.default, **shown) if choices else gr.Textbox(option.default, **shown)
        )
    return widgets


def _form(ws, registry: dict) -> tuple:
    runs = ws.runs(finished_only=True)
    adapter = gr.Dropdown(
        runs, value=runs[0] if runs else None, allow_custom_value=True, label="Finished run (adapter)",
        elem_id="export-adapter",
    )  # fmt: skip
    known = formats()
    fmt = gr.Radio(
        list(known), value=DEFAULT_FORMAT, label="Format", elem_id="export-format",
        info="; ".join(f"{n}: {f.summary}" for n, f in known.items()),
    )  # fmt: skip
    options = _option_widgets(registry, DEFAULT_FORMAT)
    name = gr.Textbox(
        "", label="Export name", placeholder="<run>-<format>-<options> when empty",
        info="its folder: exports/<name> in the workspace",
    )  # fmt: skip
    return adapter, fmt, options, name


def _results() -> tuple:
    status = gr.Markdown(elem_id="export-status")
    checks = gr.Dataframe(
        headers=["check", "max |logit diff|", "next-token agreement (decisive)", "relative error", "prompts"],
        interactive=False,
        label="Validation against PyTorch",
    )
    files = gr.Dataframe(headers=["file", "size"], interactive=False, label="Files", max_height=320, wrap=True)
    with gr.Accordion("Log", open=False):
        log = gr.Textbox(show_label=False, lines=10, max_lines=10, autoscroll=True, interactive=False)
    return status, checks, files, log


def _named(function, registry: dict):
    """The generator `function(adapter, format, name, options)` behind a signature naming every
    option of the registry (all_options()), so the API takes them by name (gradio reads it)."""
    keyword = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter("adapter", keyword)]
    params += [
        inspect.Parameter("format", keyword, default=DEFAULT_FORMAT),
        inspect.Parameter("name", keyword, default=""),
    ]
    for option_name, owners in registry.items():
        params.append(inspect.Parameter(option_name, keyword, default=owners[0][1].default))
    signature = inspect.Signature(params)

    def call(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        values = dict(bound.arguments)
        yield from function(values.pop("adapter"), values.pop("format"), values.pop("name"), values)

    call.__signature__ = signature
    call.__name__ = function.__name__
    call.__doc__ = function.__doc__
    return call


def build(ctx: AppContext, demo: gr.Blocks) -> tuple[gr.Dropdown, gr.Dropdown, gr.Markdown, gr.Textbox]:
    ws, jobs = ctx.ws, ctx.jobs
    registry = all_options()  # option name -> the formats that have it, read once
    with gr.Row(equal_height=False):
        with gr.Column(scale=4, min_width=320):
            adapter, fmt, options, name = _form(ws, registry)
            command = command_box()
            go = gr.Button("Export", variant="primary", elem_id="export-button")
            gr.Markdown("#### Exports in the workspace")
            existing = gr.Dropdown(ws.exports(), value=None, label="Open an export", allow_custom_value=True)
        with gr.Column(scale=6, min_width=420):
            status, checks, files, log = _results()
    result = gr.JSON(visible=False)
    option_names = list(options)
    form = [adapter, fmt, name, *options.values()]

    def shown(format_value: str):
        return [gr.update(visible=any(f.name == format_value for f, _ in registry[n])) for n in option_names]

    fmt.change(shown, [fmt], list(options.values()), api_visibility="private", show_progress="hidden")

    def preview(adapter_value, format_value, name_value, *option_values) -> str:
        try:
            argv, _ = build_command(ws, adapter_value, name_value, format_value, dict(zip(option_names, option_values)))
        except Exception as exc:
            return f"# {exc}"
        return command_text(ws, argv)

    gr.on(
        [c.change for c in form], preview, form, [command],
        api_visibility="private", show_progress="hidden", trigger_mode="always_last",
    )  # fmt: skip

    def export(adapter: str, format_name: str, name: str, chosen: dict):
        """Runs `hydra-edge export` (refused while another job runs); streams its log, then returns
        the validation result and the files."""
        job = start_export(ws, jobs, adapter, name, format_name, chosen)
        yield gr.skip(), f"Exporting {ws.rel(job.out)} ({format_name}): building and validating it…", [], [], ""
        while job.running:
            time.sleep(1.0)
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), job.log_tail()
        if job.process.returncode != 0:
            raise UserError(f"export failed: {job.error_message()}")
        found = export_result(ws, job.out)
        yield found, *_render(found), job.log_tail()

    @user_errors
    def open_export(export: str):
        """The validation result and the files of an existing export."""
        found = export_result(ws, export)
        return found, *_render(found), ""

    outputs = [result, status, checks, files, log]
    go.click(user_errors(_named(export, registry)), form, outputs, api_name="export").success(
        lambda: gr.update(choices=ws.exports()), None, [existing], api_visibility="private"
    )
    existing.input(open_export, [existing], outputs, api_name="export_result")
    return adapter, existing, status, log


def _render(found: dict) -> tuple[str, list, list]:
    text = (
        f"**{found['export']}**: {_settings(found)}, clusters "
        f"{', '.join(map(str, found['clusters']))}, base {found['base']}; "
        f"{len(found['files'])} files, {found['total_bytes'] / 2**20:.1f} MB.\n\n"
        f"**Validation passed**: {found['criteria']}."
    )
    checks = [
        [
            c["check"],
            f"{c['max_abs_logit_diff']:.2e}",
            f"{c.get('decisive_agreement', c['top1_agreement']):.3f}",
            f"{c.get('relative_error', float('nan')):.2e}",
            c.get("prompts", ""),
        ]
        for c in found["checks"]
    ]
    files = [[f["file"], _size(f["bytes"])] for f in found["files"]]
    return text, checks, files


def _settings(found: dict) -> str:
    """ "onnx: adapters mode, fp32" or "peft"."""
    if found.get("mode"):
        return f"{found['format']}: {found['mode']} mode, {found['precision']}"
    return found["format"]


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def refresh(ctx: AppContext, current_adapter: str | None):
    """Fresh lists; and when an export is running (say, started before a page reload), its state."""
    from hydra_edge.ui.exporting import export_status

    status = export_status(ctx.ws, ctx.jobs)
    running = status["state"] == "running"
    return (
        refreshed(ctx.ws.runs(finished_only=True), current_adapter),
        gr.update(choices=ctx.ws.exports()),
        status["message"] if running else gr.skip(),
        status["log"] if running else gr.skip(),
    )
