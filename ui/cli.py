"""The `ui` command, registered onto the core CLI through the `hydra_edge.commands` entry point
(so hydra_edge/ never imports ui/). Only typer is imported here; gradio loads inside the command,
so `hydra-edge --help` stays fast.

Safe by default: the UI binds 127.0.0.1; any address other machines can reach needs --auth.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import typer

from hydra_edge.errors import UserError
from hydra_edge.hosts import is_loopback


def parse_auth(auth: str) -> tuple[str, str]:
    user, sep, password = auth.partition(":")
    if not sep or not user.strip() or not password:
        raise UserError("--auth: use USER:PASS (both non-empty, separated by ':')")
    return user.strip(), password


def check_options(host: str, port: int, auth: str | None, max_upload_mb: float) -> tuple[str, str] | None:
    """All the refusals, before gradio is even imported."""
    if not host.strip():
        raise UserError("--host: empty; use 127.0.0.1 (this machine only) or an address with --auth")
    credentials = parse_auth(auth) if auth is not None else None
    if credentials is None and not is_loopback(host):
        raise UserError(
            f"--host {host} makes the UI reachable from other machines; add --auth USER:PASS "
            "(or keep the default --host 127.0.0.1)"
        )
    if not 1 <= port <= 65535:
        raise UserError(f"--port {port}: use 1-65535")
    if not 0 < max_upload_mb <= 100_000:
        raise UserError(f"--max-upload-mb {max_upload_mb:g}: must be > 0")
    return credentials


def ui_command(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; anything but loopback needs --auth."),
    port: int = typer.Option(7860, "--port", help="Port to serve on."),
    workspace: str = typer.Option(
        "hydra-workspace",
        "--workspace",
        help="Folder the UI reads and writes (data/, runs/, exports/, models/); created if missing.",
    ),
    auth: str | None = typer.Option(
        None,
        "--auth",
        envvar="HYDRA_EDGE_UI_AUTH",
        show_envvar=True,
        help="USER:PASS required to sign in (also read from HYDRA_EDGE_UI_AUTH, "
        "which keeps the password out of the process list).",
    ),
    max_upload_mb: float = typer.Option(50, "--max-upload-mb", help="Largest file an upload may be, in MB."),
) -> None:
    """Start the web UI: train, watch, stop and resume, chat, and export, in a browser."""
    credentials = check_options(host, port, auth, max_upload_mb)
    root = Path(workspace).expanduser()
    if root.exists() and not root.is_dir():
        raise UserError(f"--workspace {workspace}: exists and is not a folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--workspace {workspace}: cannot create it ({exc.strerror})") from exc
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        from hydra_edge.ui.app import create_ui, launch
    except ImportError as exc:
        raise UserError(f"the web UI needs gradio ({exc}); pip install 'hydra-edge[ui]'") from exc

    demo = create_ui(root, max_upload_mb=max_upload_mb)
    try:
        _, url, _ = launch(demo, host=host, port=port, auth=credentials, prevent_thread_lock=True, quiet=True)
    except OSError as exc:  # gradio: "Cannot find empty port in range ..."
        raise UserError(f"--port {port}: cannot serve there ({exc}); choose another port") from exc
    print(
        f"hydra-edge ui: {url} (workspace {demo.hydra.ws.root}"
        + (", sign-in required" if credentials else "")
        + "). Ctrl-C stops it; a running training saves "
        "a checkpoint first.",
        flush=True,
    )
    # SIGTERM (a service manager, `kill`) ends the UI like Ctrl-C does, so the exit handler stops
    # a running training with a checkpoint instead of leaving it orphaned.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        pass


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def register(app: typer.Typer) -> None:
    app.command("ui")(ui_command)
