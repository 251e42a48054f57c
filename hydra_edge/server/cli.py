"""The `serve` command, registered onto the core CLI through the `hydra_edge.commands` entry point.
Its options are the fields of settings.py's BackendChoice (what to serve) and ServeSettings (how),
generated with their defaults and help. Options are checked (and the port bound) before the model
loads; FastAPI and uvicorn load inside the command, so `hydra-edge --help` stays fast.

Safe by default: it binds 127.0.0.1; any address other machines can reach needs --api-key.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import typer

from hydra_edge.cli.options import from_options, options_signature
from hydra_edge.errors import UserError
from hydra_edge.server.settings import BackendChoice, ServeSettings


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads, so a taken port is one line, at once."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        raise UserError(
            f"--host {host} --port {port}: cannot serve there ({exc.strerror or exc}); choose another"
        ) from exc
    sock.set_inheritable(True)
    return sock


def router_folder(export: str | None, adapter: str | None) -> Path:
    """--upstream needs only the request router: an export's router/ or the adapter folder."""
    folder = Path(export) / "router" if export else Path(adapter)
    if not (folder / "clusters.json").is_file():
        raise UserError(f"{folder}: no request router here (clusters.json); give an export's folder or a finished run")
    return folder


def serve_command(**options) -> None:
    """Serve an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models) that
    routes every request to its cluster's adapter; `model` may pin cluster_<c> or the base."""
    settings = from_options(ServeSettings, options)  # its refusals come first, as they always have
    choice = from_options(BackendChoice, options)
    uvicorn, create_app, with_header_deadline = _server_modules()
    sock = bind(settings.host, settings.port)
    one_at_a_time = "--adapter" if choice.adapter else "--gguf" if choice.gguf else None
    if one_at_a_time and not choice.upstream and settings.max_concurrency > 1:
        print(
            f"hydra-edge serve: {one_at_a_time} generates one request at a time; --max-concurrency "
            f"{settings.max_concurrency} becomes 1 running and the rest queued",
            file=sys.stderr,
            flush=True,
        )
        settings = settings.one_generation_at_a_time()
    app = create_app(backend_factory(choice, settings), settings)
    app.state.backend.warm_up()
    _announce(app.state.backend, sock, settings)
    config = uvicorn.Config(
        app,
        http=with_header_deadline(settings.client_timeout),
        log_level=settings.log_level,
        log_config=log_config(),
        timeout_graceful_shutdown=3,  # with the exit that follows, a SIGTERM stops it within 5 s
        lifespan="off",
    )
    # The event loop shares Python's lock with the threads that route and render long prompts: a
    # 1 ms switch interval (Python's default is 5 ms) keeps /health quick while they run.
    sys.setswitchinterval(0.001)
    uvicorn.Server(config).run(sockets=[sock])


serve_command.__signature__ = options_signature(BackendChoice, ServeSettings)
serve_command.__annotations__ = {p.name: p.annotation for p in serve_command.__signature__.parameters.values()}


def _server_modules():
    """uvicorn, create_app and with_header_deadline, imported only once the options are checked
    (FastAPI and uvicorn take a while to import, and are an extra: a missing one is one line)."""
    try:
        import uvicorn

        from hydra_edge.server.app import create_app
        from hydra_edge.server.connections import with_header_deadline
    except ImportError as exc:
        raise UserError(
            f"serve needs FastAPI, uvicorn and prometheus-client ({exc}); pip install 'hydra-edge[serve]'"
        ) from exc
    return uvicorn, create_app, with_header_deadline


def _announce(backend, sock: socket.socket, settings: ServeSettings) -> None:
    """The one line on stdout, which scripts read: the URL clients use, what answers there, and
    whether they need the key."""
    bound_host, bound_port = sock.getsockname()[:2]
    url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
    print(
        f"hydra-edge serve: http://{url_host}:{bound_port}/v1 ({backend.describe()}; models: "
        f"{', '.join(backend.model_ids())}{'; API key required' if settings.api_key else ''}). Ctrl-C stops it.",
        flush=True,
    )


def log_config() -> dict:
    """uvicorn's logging, with its access lines on stderr (stdout holds only the URL line, which
    scripts read) and this server's request lines (model, cluster, tokens) beside them."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    config["loggers"]["hydra_edge.server"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config


def backend_factory(choice: BackendChoice, settings: ServeSettings):
    """make_backend(metrics) for create_app: the engine loads here, after the checks."""
    if choice.upstream:
        from hydra_edge.clusters.router import RequestRouter
        from hydra_edge.server.proxy import UpstreamBackend

        try:
            router = RequestRouter.from_dir(router_folder(choice.onnx or choice.gguf, choice.adapter))
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
            where = choice.onnx or choice.gguf or choice.adapter
            raise UserError(f"{where}: the request router cannot be read ({exc})") from exc
        return lambda metrics: UpstreamBackend(
            choice.upstream, choice.upstream_api_key, router, metrics, *settings.upstream_timeouts
        )

    from hydra_edge.inference.engines import open_engine
    from hydra_edge.server.local import LocalBackend

    engine = open_engine(choice.adapter, choice.onnx, choice.model, choice.gguf)
    print(f"hydra-edge serve: loaded {engine.describe()}", file=sys.stderr, flush=True)
    return lambda metrics: LocalBackend(engine, settings.max_tokens_cap, settings.max_concurrency, metrics)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)
