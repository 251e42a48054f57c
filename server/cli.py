"""The `serve` command, registered onto the core CLI through the `hydra_edge.commands` entry point.
Options are checked (and the port bound) before the model loads; FastAPI and uvicorn load inside
the command, so `hydra-edge --help` stays fast.

Safe by default: it binds 127.0.0.1; any address other machines can reach needs --api-key.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import typer

from hydra_edge.errors import UserError
from hydra_edge.hosts import is_loopback


def check_options(host: str, port: int, api_key: str | None, numbers: dict[str, float]) -> None:
    """All the refusals, before anything heavy loads."""
    if not host.strip():
        raise UserError("--host: empty; use 127.0.0.1 (this machine only) or an address with --api-key")
    if api_key is not None and not api_key.strip():
        raise UserError("--api-key: empty; give a secret clients will send as `Authorization: Bearer <key>`")
    if api_key is None and not is_loopback(host):
        raise UserError(
            f"--host {host} makes the API reachable from other machines; add --api-key KEY "
            "(or keep the default --host 127.0.0.1)"
        )
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: use 1-65535 (0 picks a free port)")
    for flag, value in numbers.items():
        if value < (0 if flag == "--max-queue" else 1):
            raise UserError(f"{flag} {value:g}: must be at least {0 if flag == '--max-queue' else 1}")


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


def router_folder(onnx: str | None, adapter: str | None) -> Path:
    """--upstream needs only the request router: an export's router/ or the adapter folder."""
    folder = Path(onnx) / "router" if onnx else Path(adapter)
    if not (folder / "clusters.json").is_file():
        raise UserError(f"{folder}: no request router here (clusters.json); give an export's folder or a finished run")
    return folder


def serve_command(
    onnx: str | None = typer.Option(None, "--onnx", help="Serve this ONNX export (hydra-edge export --out)."),
    adapter: str | None = typer.Option(None, "--adapter", help="Serve this trained adapter with PyTorch."),
    model: str | None = typer.Option(None, "--model", help="With --adapter: another copy of its base model."),
    upstream: str | None = typer.Option(
        None,
        "--upstream",
        help="Proxy to this OpenAI-compatible server (e.g. http://127.0.0.1:8001/v1, vLLM serving the "
        "export's serve-vllm.sh), rewriting `model` to the routed cluster's adapter name.",
    ),
    upstream_api_key: str | None = typer.Option(
        None, "--upstream-api-key", envvar="HYDRA_EDGE_UPSTREAM_API_KEY", help="Bearer key the upstream wants."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; anything but loopback needs --api-key."),
    port: int = typer.Option(8000, "--port", help="Port to serve on (0: any free port, printed at start)."),
    api_key: str | None = typer.Option(
        None,
        "--api-key",
        envvar="HYDRA_EDGE_API_KEY",
        show_envvar=True,
        help="Secret every request must send as `Authorization: Bearer KEY` (also read from "
        "HYDRA_EDGE_API_KEY, which keeps it out of the process list). /health stays open.",
    ),
    max_concurrency: int = typer.Option(4, "--max-concurrency", help="Requests generating at once."),
    max_queue: int = typer.Option(16, "--max-queue", help="Requests waiting for a slot; more get 429."),
    max_tokens_cap: int = typer.Option(2048, "--max-tokens-cap", help="Largest max_tokens a request may ask for."),
    max_body_mb: float = typer.Option(4, "--max-body-mb", help="Largest request body, in MB."),
    client_timeout: float = typer.Option(
        10,
        "--client-timeout",
        help="Seconds a client has to send a request's headers, and then its body; slower connections are "
        "closed (the body: 408), so half-open ones cannot pile up.",
    ),
    upstream_connect_timeout: float = typer.Option(
        10, "--upstream-connect-timeout", help="With --upstream: seconds to connect to it before a 504."
    ),
    upstream_read_timeout: float = typer.Option(
        300,
        "--upstream-read-timeout",
        help="With --upstream: seconds it may stay silent (before its answer, or between chunks) before a 504.",
    ),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn's: critical, error, warning, info, debug."),
) -> None:
    """Serve an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models) that
    routes every request to its cluster's adapter; `model` may pin cluster_<c> or the base."""
    numbers = {
        "--max-concurrency": max_concurrency,
        "--max-queue": max_queue,
        "--max-tokens-cap": max_tokens_cap,
        "--max-body-mb": max_body_mb,
        "--client-timeout": client_timeout,
        "--upstream-connect-timeout": upstream_connect_timeout,
        "--upstream-read-timeout": upstream_read_timeout,
    }
    check_options(host, port, api_key, numbers)
    if bool(onnx) == bool(adapter):
        raise UserError("give either --onnx DIR (an export) or --adapter DIR (PyTorch), not both or neither")
    if upstream and not upstream.startswith(("http://", "https://")):
        raise UserError(f"--upstream {upstream}: give the server's base URL, e.g. http://127.0.0.1:8001/v1")
    try:
        import uvicorn

        from hydra_edge.server.app import ServeSettings, create_app
        from hydra_edge.server.connections import with_header_deadline
    except ImportError as exc:
        raise UserError(
            f"serve needs FastAPI, uvicorn and prometheus-client ({exc}); pip install 'hydra-edge[serve]'"
        ) from exc
    sock = bind(host, port)
    if adapter and not upstream and max_concurrency > 1:
        # PyTorch generates one request at a time (see torch_engine.py); the other slots would only
        # wait on its lock while /health called them running, so they join the queue instead.
        print(f"hydra-edge serve: --adapter generates one request at a time; --max-concurrency {max_concurrency} "
              "becomes 1 running and the rest queued", file=sys.stderr, flush=True)  # fmt: skip
        max_concurrency, max_queue = 1, max_queue + max_concurrency - 1
    settings = ServeSettings(
        api_key, max_concurrency, max_queue, max_tokens_cap, int(max_body_mb * 1024 * 1024), client_timeout
    )
    upstream_timeouts = (upstream_connect_timeout, upstream_read_timeout)
    app = create_app(
        backend_factory(onnx, adapter, model, upstream, upstream_api_key, upstream_timeouts, settings), settings
    )
    backend = app.state.backend
    backend.warm_up()
    bound_host, bound_port = sock.getsockname()[:2]
    url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
    print(
        f"hydra-edge serve: http://{url_host}:{bound_port}/v1 ({backend.describe()}; models: "
        f"{', '.join(backend.model_ids())}{'; API key required' if api_key else ''}). Ctrl-C stops it.",
        flush=True,
    )
    config = uvicorn.Config(
        app,
        http=with_header_deadline(client_timeout),
        log_level=log_level,
        log_config=log_config(),
        timeout_graceful_shutdown=3,  # with the exit that follows, a SIGTERM stops it within 5 s
        lifespan="off",
    )
    # The event loop shares Python's lock with the threads that route and render long prompts: a
    # 1 ms switch interval (Python's default is 5 ms) keeps /health quick while they run.
    sys.setswitchinterval(0.001)
    uvicorn.Server(config).run(sockets=[sock])


def log_config() -> dict:
    """uvicorn's logging, with its access lines on stderr (stdout holds only the URL line, which
    scripts read) and this server's request lines (model, cluster, tokens) beside them."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    config["loggers"]["hydra_edge.server"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config


def backend_factory(onnx, adapter, model, upstream, upstream_api_key, upstream_timeouts, settings):
    """make_backend(metrics) for create_app: the engine loads here, after the checks."""
    if upstream:
        from hydra_edge.request_router import RequestRouter
        from hydra_edge.server.proxy import UpstreamBackend

        try:
            router = RequestRouter.from_dir(router_folder(onnx, adapter))
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
            raise UserError(f"{onnx or adapter}: the request router cannot be read ({exc})") from exc
        return lambda metrics: UpstreamBackend(upstream, upstream_api_key, router, metrics, *upstream_timeouts)

    from hydra_edge.engines import open_engine
    from hydra_edge.server.local import LocalBackend

    engine = open_engine(adapter, onnx, model)
    print(f"hydra-edge serve: loaded {engine.describe()}", file=sys.stderr, flush=True)
    return lambda metrics: LocalBackend(engine, settings.max_tokens_cap, settings.max_concurrency, metrics)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)
