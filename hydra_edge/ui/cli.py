"""The `ui` command, registered onto the core CLI through the `hydra_edge.commands` entry point
(so the core never imports the UI). Its options are `UiSettings`' fields (cli/options.py). Only
typer is imported here; gradio loads inside the command, so `hydra-edge --help` stays fast.

Safe by default: the UI binds 127.0.0.1; any address other machines can reach needs --auth.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

import typer

from hydra_edge.cli.hosts import check_exposure
from hydra_edge.cli.options import settings_command
from hydra_edge.errors import UserError
from hydra_edge.settings import field_problems, setting
from hydra_edge.ui import DEFAULT_MAX_UPLOAD_MB, DEFAULT_WORKSPACE


def parse_auth(auth: str) -> tuple[str, str]:
    user, sep, password = auth.partition(":")
    if not sep or not user.strip() or not password:
        raise UserError("--auth: use USER:PASS (both non-empty, separated by ':')")
    return user.strip(), password


def check_options(host: str, port: int, auth: str | None, max_upload_mb: float) -> tuple[str, str] | None:
    """All the refusals (UiSettings'), before gradio is even imported; the sign-in pair, if any."""
    try:
        return UiSettings(host=host, port=port, auth=auth, max_upload_mb=max_upload_mb).credentials
    except ValueError as exc:
        raise UserError(str(exc)) from None


@dataclass
class UiSettings:
    host: str = setting("127.0.0.1", "Address to bind; anything but loopback needs --auth.")
    port: int = setting(7860, "Port to serve on.", ge=1, le=65535)
    workspace: str = setting(
        DEFAULT_WORKSPACE, "Folder the UI reads and writes (data/, runs/, exports/, models/); created if missing."
    )
    auth: str | None = setting(
        None,
        "USER:PASS required to sign in (also read from HYDRA_EDGE_UI_AUTH, which keeps the password out of the "
        "process list).",
        envvar="HYDRA_EDGE_UI_AUTH",
    )
    max_upload_mb: float = setting(DEFAULT_MAX_UPLOAD_MB, "Largest file an upload may be, in MB.", gt=0, le=100_000)

    def __post_init__(self) -> None:
        check_exposure(self.host, self.credentials is not None, "UI", "--auth USER:PASS")
        problems = field_problems(self)
        if problems:
            raise ValueError(problems[0])

    @property
    def credentials(self) -> tuple[str, str] | None:
        return parse_auth(self.auth) if self.auth is not None else None


def ui_command(settings: UiSettings) -> None:
    """Start the web UI: train, watch, stop and resume, chat, and export, in a browser."""
    credentials, workspace, port = settings.credentials, settings.workspace, settings.port
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

    demo = create_ui(root, max_upload_mb=settings.max_upload_mb)
    try:
        _, url, _ = launch(demo, host=settings.host, port=port, auth=credentials, prevent_thread_lock=True, quiet=True)
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
    app.command("ui")(settings_command(UiSettings, ui_command))
