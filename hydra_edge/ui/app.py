"""The hydra-edge web UI: `create_ui()` builds the gr.Blocks, `launch()` serves it safely.

Like LLaMA-Factory's LLaMA Board, the UI is a shell: training and export run the `hydra-edge`
CLI as subprocesses, chat uses the library's loading and generation. Everything it reads or
writes lies in one workspace folder (see workspace.py).
"""

from __future__ import annotations

import atexit
import os
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

import gradio as gr  # noqa: E402

from hydra_edge.ui import DEFAULT_MAX_UPLOAD_MB, DEFAULT_WORKSPACE, chat_tab, data_tab, export_tab, train_tab  # noqa: E402
from hydra_edge.ui.chatting import ChatModels  # noqa: E402
from hydra_edge.ui.handlers import AppContext  # noqa: E402
from hydra_edge.ui.jobs import JobManager  # noqa: E402
from hydra_edge.ui.workspace import Workspace  # noqa: E402

CSS = """
#train-status p, #chat-routing p { margin: 0.2em 0; }
footer { opacity: 0.6; }
"""


def create_ui(workspace: str | Path = DEFAULT_WORKSPACE, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB) -> gr.Blocks:
    """The app's Blocks: Train, Data, Chat and Export tabs over one workspace.

    The returned Blocks carries its AppContext as `.hydra` (workspace, job manager, loaded chat
    models, upload limit); `launch` and the tests use it.
    """
    ws = Workspace(workspace)
    ctx = AppContext(ws, JobManager(ws.root), ChatModels(ws), int(max_upload_mb * 2**20))
    with gr.Blocks(title="hydra-edge", analytics_enabled=False, delete_cache=(3600, 24 * 3600)) as demo:
        gr.Markdown(
            "## hydra-edge\nFine-tune with **HydraLoRA** on a 4-bit base, chat with the result and export it to "
            f"ONNX Runtime. Workspace: `{ws.root}`"
        )
        with gr.Tabs():
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                train_tab.build(ctx, demo)
            with gr.Tab("Data", id="data", elem_id="tab-data") as data_page:
                data_file = data_tab.build(ctx, demo)
            with gr.Tab("Chat", id="chat", elem_id="tab-chat") as chat_page:
                chat_source, chat_info = chat_tab.build(ctx, demo)
            with gr.Tab("Export", id="export", elem_id="tab-export") as export_page:
                export_adapter, export_existing, export_status, export_log = export_tab.build(ctx, demo)
        # Runs finish and files arrive while a page is open: each tab lists what is there now.
        data_page.select(
            lambda current: data_tab.refresh(ctx, current),
            [data_file],
            [data_file],
            api_visibility="private",
            show_progress="hidden",
        )
        chat_page.select(
            lambda current: chat_tab.refresh(ctx, current),
            [chat_source],
            [chat_source, chat_info],
            api_visibility="private",
            show_progress="hidden",
        )
        export_page.select(
            lambda current: export_tab.refresh(ctx, current),
            [export_adapter],
            [export_adapter, export_existing, export_status, export_log],
            api_visibility="private",
            show_progress="hidden",
        )
    demo.hydra = ctx
    return demo


def launch(
    demo: gr.Blocks,
    host: str = "127.0.0.1",
    port: int = 7860,
    auth: tuple[str, str] | None = None,
    prevent_thread_lock: bool = False,
    quiet: bool = False,
):
    """Serves the app: files only from the workspace, uploads capped, no monitoring endpoint, no
    share link, no MCP server. A running job is stopped (with a checkpoint) when the server exits."""
    ctx: AppContext = demo.hydra
    atexit.register(_stop_job_on_exit, ctx)
    demo.queue(default_concurrency_limit=1)
    return demo.launch(
        server_name=host,
        server_port=port,
        auth=auth,
        auth_message="hydra-edge: sign in with the user and password given to --auth" if auth else None,
        max_file_size=ctx.max_upload_bytes,
        allowed_paths=[str(ctx.ws.root)],
        enable_monitoring=False,
        show_error=True,
        share=False,
        mcp_server=False,
        ssr_mode=False,
        pwa=False,
        run_history=False,  # nothing about a user's calls is kept, in the browser or elsewhere
        footer_links=["api", "gradio", "settings"],
        inbrowser=False,
        prevent_thread_lock=prevent_thread_lock,
        quiet=quiet,
        css=CSS,
    )


def _stop_job_on_exit(ctx: AppContext) -> None:
    job = ctx.jobs.active()
    if job is not None:
        what = "training run" if job.kind == "train" else "export"
        print(
            f"hydra-edge ui: stopping the {what} {job.name}"
            + (", saving a checkpoint…" if job.kind == "train" else "…"),
            flush=True,
        )
        ctx.jobs.shutdown()
