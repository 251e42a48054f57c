"""The Export tab: `hydra-edge export` of a finished run (mode, precision), run in the job slot,
with its log while it works, then its validation against PyTorch and the files it wrote. Past
exports in the workspace can be opened to see the same.

API names: export (runs one and returns its result), export_result (reads an existing one).
"""

from __future__ import annotations

import time

import gradio as gr

from hydra_edge.errors import UserError
from hydra_edge.ui.exporting import MODES, PRECISIONS, build_command, export_result, start_export
from hydra_edge.ui.handlers import AppContext, command_box, refreshed, user_errors
from hydra_edge.ui.training import command_text

MODE_HELP = {
    "adapters": "one base model + one small adapter file per cluster, switched per request",
    "merged": "one full model per cluster, the cluster's heads folded into the weights",
    "dynamic": "one model with the router and every head inside, exactly as trained",
}


def build(ctx: AppContext, demo: gr.Blocks) -> tuple[gr.Dropdown, gr.Dropdown, gr.Markdown, gr.Textbox]:
    ws, jobs = ctx.ws, ctx.jobs
    runs = ws.runs(finished_only=True)
    with gr.Row(equal_height=False):
        with gr.Column(scale=4, min_width=320):
            adapter = gr.Dropdown(
                runs,
                value=runs[0] if runs else None,
                allow_custom_value=True,
                label="Finished run (adapter)",
                elem_id="export-adapter",
            )
            mode = gr.Radio(
                list(MODES), value="adapters", label="Mode", info="; ".join(f"{m}: {h}" for m, h in MODE_HELP.items())
            )
            precision = gr.Radio(
                list(PRECISIONS),
                value="fp32",
                label="Precision",
                info="fp16: half-size floats (best on a GPU); "
                "int4: base weights as MatMulNBits, the adapter weights stay float",
            )
            name = gr.Textbox(
                "",
                label="Export name",
                placeholder="<run>-<mode>-<precision> when empty",
                info="its folder: exports/<name> in the workspace",
            )
            command = command_box()
            go = gr.Button("Export", variant="primary", elem_id="export-button")
            gr.Markdown("#### Exports in the workspace")
            existing = gr.Dropdown(ws.exports(), value=None, label="Open an export", allow_custom_value=True)
        with gr.Column(scale=6, min_width=420):
            status = gr.Markdown(elem_id="export-status")
            checks = gr.Dataframe(
                headers=["check", "max |logit diff|", "next-token agreement (decisive)", "relative error", "prompts"],
                interactive=False,
                label="Validation against PyTorch",
            )
            files = gr.Dataframe(headers=["file", "size"], interactive=False, label="Files", max_height=320, wrap=True)
            with gr.Accordion("Log", open=False):
                log = gr.Textbox(show_label=False, lines=10, max_lines=10, autoscroll=True, interactive=False)
    result = gr.JSON(visible=False)

    def preview(adapter_value: str, mode_value: str, precision_value: str, name_value: str) -> str:
        try:
            argv, _ = build_command(ws, adapter_value, name_value, mode_value, precision_value)
        except Exception as exc:
            return f"# {exc}"
        return command_text(ws, argv)

    gr.on(
        [adapter.change, mode.change, precision.change, name.change],
        preview,
        [adapter, mode, precision, name],
        [command],
        api_visibility="private",
        show_progress="hidden",
        trigger_mode="always_last",
    )

    @user_errors
    def export(adapter: str, mode: str = "adapters", precision: str = "fp32", name: str = ""):
        """Runs `hydra-edge export` (refused while another job runs); streams its log, then returns
        the validation result and the files."""
        job = start_export(ws, jobs, adapter, name, mode, precision)
        yield gr.skip(), f"Exporting {ws.rel(job.out)}: building the ONNX model and validating it…", [], [], ""
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

    go.click(export, [adapter, mode, precision, name], [result, status, checks, files, log], api_name="export").success(
        lambda: gr.update(choices=ws.exports()), None, [existing], api_visibility="private"
    )
    existing.input(open_export, [existing], [result, status, checks, files, log], api_name="export_result")
    return adapter, existing, status, log


def _render(found: dict) -> tuple[str, list, list]:
    text = (
        f"**{found['export']}**: {found['mode']} mode, {found['precision']}, clusters "
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
