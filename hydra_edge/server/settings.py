"""The `serve` command's settings: what it serves (BackendChoice) and how (ServeSettings).

Each field is written once, here: its default, its help and its bounds; `hydra-edge serve`'s
options are generated from the fields (cli.py), and the checks run whoever
builds the settings (hydra_edge/settings.py, cli/options.py: the same machinery as every
command's). Adding a setting is adding a field. This module imports no web framework,
so `hydra-edge --help` stays fast.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from hydra_edge.cli.hosts import check_exposure
from hydra_edge.errors import UserError
from hydra_edge.settings import field_problems, setting


@dataclass(frozen=True)
class BackendChoice:
    """Which backend answers: an ONNX or GGUF export or a PyTorch adapter generating here, or, with
    --upstream, another server that generates while this one routes."""

    onnx: str | None = setting(None, "Serve this ONNX export (hydra-edge export --out).")
    gguf: str | None = setting(None, "Serve this GGUF export in llama.cpp (hydra-edge export --format gguf).")
    adapter: str | None = setting(None, "Serve this trained adapter with PyTorch.")
    model: str | None = setting(None, "With --adapter: another copy of its base model.")
    upstream: str | None = setting(
        None,
        "Proxy to this OpenAI-compatible server (e.g. http://127.0.0.1:8001/v1, vLLM started by the "
        "serve-vllm.sh of an `export --format vllm`), rewriting `model` to the routed cluster's adapter name.",
    )
    upstream_api_key: str | None = setting(None, "Bearer key the upstream wants.", envvar="HYDRA_EDGE_UPSTREAM_API_KEY")

    def __post_init__(self) -> None:
        if sum(bool(x) for x in (self.onnx, self.gguf, self.adapter)) != 1:
            raise UserError(
                "give one of --onnx DIR, --gguf DIR (an export) or --adapter DIR (PyTorch), not several or none"
            )
        if self.upstream and not self.upstream.startswith(("http://", "https://")):
            raise UserError(f"--upstream {self.upstream}: give the server's base URL, e.g. http://127.0.0.1:8001/v1")


@dataclass(frozen=True)
class ServeSettings:
    """Where the server listens, who may call it, how much it takes on, and how long it waits.
    Safe by default: loopback only; any other address needs an API key."""

    host: str = setting("127.0.0.1", "Address to bind; anything but loopback needs --api-key.")
    port: int = setting(
        8000,
        "Port to serve on (0: any free port, printed at start).",
        ge=0,
        le=65535,
        refusal="use 1-65535 (0 picks a free port)",
    )
    api_key: str | None = setting(
        None,
        "Secret every request must send as `Authorization: Bearer KEY` (also read from "
        "HYDRA_EDGE_API_KEY, which keeps it out of the process list). /health stays open.",
        envvar="HYDRA_EDGE_API_KEY",
    )
    max_concurrency: int = setting(4, "Requests generating at once.", ge=1)
    max_queue: int = setting(16, "Requests waiting for a slot; more get 429.", ge=0)
    max_tokens_cap: int = setting(2048, "Largest max_tokens a request may ask for.", ge=1)
    # Whole-number defaults for the float settings: --help shows them as they were always shown (4, not 4.0).
    max_body_mb: float = setting(4, "Largest request body, in MB.", ge=1)
    client_timeout: float = setting(
        10,
        "Seconds a client has to send a request's headers, and then its body; slower connections are "
        "closed (the body: 408), so half-open ones cannot pile up.",
        ge=1,
    )
    upstream_connect_timeout: float = setting(10, "With --upstream: seconds to connect to it before a 504.", ge=1)
    upstream_read_timeout: float = setting(
        300,
        "With --upstream: seconds it may stay silent (before its answer, or between chunks) before a 504.",
        ge=1,
    )
    log_level: str = setting("info", "uvicorn's: critical, error, warning, info, debug.")

    def __post_init__(self) -> None:
        """All the refusals, before anything heavy loads: the address and its key, then the bounds."""
        check_exposure(self.host, self.api_key is not None, "API", "--api-key KEY")
        if self.api_key is not None and not self.api_key.strip():
            raise UserError("--api-key: empty; give a secret clients will send as `Authorization: Bearer <key>`")
        problems = field_problems(self)
        if problems:
            raise UserError(problems[0])

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def upstream_timeouts(self) -> tuple[float, float]:
        """(connect, read) for the --upstream proxy."""
        return self.upstream_connect_timeout, self.upstream_read_timeout

    def one_generation_at_a_time(self) -> ServeSettings:
        """These settings for a backend that generates one request at a time (PyTorch: see
        torch_engine.py): one slot, the others' places added to the queue. The other slots would
        only wait on its lock while /health called them running."""
        return dataclasses.replace(self, max_concurrency=1, max_queue=self.max_queue + self.max_concurrency - 1)
