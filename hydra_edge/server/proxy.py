"""`serve --upstream URL`: a routing proxy in front of any OpenAI-compatible server that serves
the per-cluster LoRA adapters by name (vLLM with --enable-lora --lora-modules cluster_0=DIR ...,
SGLang, llama.cpp's server). The request router picks the cluster, `model` is rewritten to that
adapter's name (auto -> cluster_<c>; cluster_<c> and base pass as they are), and the upstream's
answer, streamed or whole, is relayed as it comes. Only the router is loaded here: scale-out is
the upstream's job, batching included.

The upstream gets the checked request, never the client's raw body: a field this server does
not know (vLLM's `lora_request`, `logits_processors`, ...) is dropped here as the local server
ignores it, so a client cannot reach upstream features past the proxy. A client that hangs up
cancels its upstream request, and an upstream that stops answering fails the request (504)
after --upstream-read-timeout, so neither holds a slot for ever.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
from fastapi import Request
from fastapi.responses import Response

from hydra_edge.clusters.router import RequestRouter
from hydra_edge.data.records import routing_text
from hydra_edge.server.admission import Ticket
from hydra_edge.server.errors import ApiError, client_left
from hydra_edge.server.local import TicketedStream, model_ids, until_disconnected
from hydra_edge.server.metrics import ServerMetrics
from hydra_edge.server.replies import Kind
from hydra_edge.server.requests import GenerationRequest

PATHS = {"chat": "/chat/completions", "completion": "/completions"}


@dataclass
class Forward:
    kind: Kind
    cluster: int | None  # None: the base
    body: dict  # the checked request's fields with `model` rewritten
    stream: bool
    arrived: float

    @property
    def upstream_model(self) -> str:
        return self.body["model"]


class UpstreamBackend:
    def __init__(
        self,
        url: str,
        api_key: str | None,
        router: RequestRouter,
        metrics: ServerMetrics,
        connect_timeout: float = 10,
        read_timeout: float = 300,
    ) -> None:
        self.url, self.router, self.metrics = url.rstrip("/"), router, metrics
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # The read timeout bounds each wait for data (the answer's start, then each chunk), so a
        # long answer streams for as long as it takes while a silent upstream fails.
        timeout = httpx.Timeout(read_timeout, connect=connect_timeout)
        self.client = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout)
        self.routing = threading.Lock()

    def model_ids(self) -> list[str]:
        return model_ids(list(range(self.router.k)), base=True)

    def describe(self) -> str:
        return f"routing proxy to {self.url} ({self.router.k} clusters)"

    def warm_up(self) -> None:
        pass  # the upstream may start after this proxy; a request it cannot reach gets a 502

    def prepare(self, kind: Kind, request: GenerationRequest) -> Forward:
        """Runs on a worker thread (routing a long prompt takes a while): the upstream's body."""
        if request.model == "auto":
            with self.routing:  # one at a time, as in local.LocalBackend
                cluster = int(self.router.route([routing_text(request.turns())])[0])
            upstream_model = f"cluster_{cluster}"
        else:
            upstream_model = request.model
            cluster = None if request.model == "base" else int(request.model.removeprefix("cluster_"))
        fields = request.model_dump(exclude_unset=True, exclude=set(request.model_extra or ()))
        return Forward(kind, cluster, {**fields, "model": upstream_model}, request.stream, time.perf_counter())

    async def respond(self, forward: Forward, ticket: Ticket, request: Request) -> Response:
        self.metrics.served.labels(forward.upstream_model).inc()
        upstream = await until_disconnected(request, self._send(forward))
        if upstream is None:  # the client left: its upstream request is cancelled
            return client_left()
        headers = {"X-Hydra-Cluster": "base" if forward.cluster is None else str(forward.cluster)}
        media_type = upstream.headers.get("content-type", "application/json")
        if forward.stream and upstream.status_code == 200:
            return TicketedStream(
                self._relay(upstream, forward), ticket, status_code=200, media_type=media_type, headers=headers
            )
        content = upstream.content
        if upstream.status_code == 200:
            content = self._label(content, forward)
        return Response(content, status_code=upstream.status_code, media_type=media_type, headers=headers)

    async def _send(self, forward: Forward) -> httpx.Response:
        """The upstream's response: open for a stream, read in full otherwise."""
        upstream_request = self.client.build_request("POST", PATHS[forward.kind], json=forward.body)
        try:
            upstream = await self.client.send(upstream_request, stream=True)
            if not (forward.stream and upstream.status_code == 200):
                try:
                    await upstream.aread()
                finally:
                    await upstream.aclose()
        except httpx.TimeoutException as exc:
            raise ApiError(
                504,
                f"the upstream server {self.url} did not answer in time ({type(exc).__name__}; "
                "--upstream-connect-timeout, --upstream-read-timeout)",
            ) from None
        except httpx.HTTPError as exc:
            raise ApiError(502, f"the upstream server {self.url} cannot be reached ({exc}); is it running?") from None
        return upstream

    async def _relay(self, upstream: httpx.Response, forward: Forward) -> AsyncIterator[bytes]:
        first = True
        try:
            async for chunk in upstream.aiter_raw():
                if first:
                    self.metrics.first_token.observe(time.perf_counter() - forward.arrived)
                    first = False
                yield chunk
        except httpx.HTTPError as exc:  # the upstream broke off mid-answer
            error = ApiError(502, f"the upstream server {self.url} broke off the answer ({exc})")
            yield f"data: {json.dumps(error.body())}\n\ndata: [DONE]\n\n".encode()
        finally:
            await upstream.aclose()

    @staticmethod
    def _label(content: bytes, forward: Forward) -> bytes:
        """The upstream's JSON answer with `hydra_cluster` added, as the local server gives it."""
        try:
            body = json.loads(content)
        except (ValueError, RecursionError):
            return content
        if isinstance(body, dict):
            body.setdefault("hydra_cluster", forward.cluster)
            content = json.dumps(body).encode()
        return content

    async def close(self) -> None:
        await self.client.aclose()
