"""`serve --upstream URL`: a routing proxy in front of any OpenAI-compatible server that serves
the per-cluster LoRA adapters by name (vLLM with --enable-lora --lora-modules cluster_0=DIR ...,
SGLang, llama.cpp's server). The request router picks the cluster, `model` is rewritten to that
adapter's name (auto -> cluster_<c>; cluster_<c> and base pass as they are), and the upstream's
answer, streamed or whole, is relayed as it comes. Only the router is loaded here: scale-out is
the upstream's job, batching included.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
from fastapi import Request
from fastapi.responses import Response

from hydra_edge.data import routing_text
from hydra_edge.request_router import RequestRouter
from hydra_edge.server.admission import Ticket
from hydra_edge.server.errors import ApiError
from hydra_edge.server.local import TicketedStream, model_ids, unknown_model
from hydra_edge.server.metrics import ServerMetrics
from hydra_edge.server.replies import Kind
from hydra_edge.server.requests import GenerationRequest

PATHS = {"chat": "/chat/completions", "completion": "/completions"}


@dataclass
class Forward:
    kind: Kind
    cluster: int | None  # None: the base
    body: dict  # the client's body with `model` rewritten
    stream: bool
    arrived: float

    @property
    def upstream_model(self) -> str:
        return self.body["model"]


class UpstreamBackend:
    def __init__(self, url: str, api_key: str | None, router: RequestRouter, metrics: ServerMetrics) -> None:
        self.url, self.router, self.metrics = url.rstrip("/"), router, metrics
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # No read timeout: a long answer streams for as long as it takes; connecting must be quick.
        self.client = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=httpx.Timeout(None, connect=10))

    def model_ids(self) -> list[str]:
        return model_ids(list(range(self.router.k)), base=True)

    def describe(self) -> str:
        return f"routing proxy to {self.url} ({self.router.k} clusters)"

    def warm_up(self) -> None:
        pass  # the upstream may start after this proxy; a request it cannot reach gets a 502

    def prepare(self, kind: Kind, request: GenerationRequest, body: dict) -> Forward:
        known = self.model_ids()
        if request.model not in known:
            raise unknown_model(request.model, known)
        if request.model == "auto":
            turns = request.turns()
            cluster = int(self.router.route([routing_text(turns)])[0])
            upstream_model = f"cluster_{cluster}"
        else:
            upstream_model = request.model
            cluster = None if request.model == "base" else int(request.model.removeprefix("cluster_"))
        return Forward(kind, cluster, {**body, "model": upstream_model}, request.stream, time.perf_counter())

    async def respond(self, forward: Forward, ticket: Ticket, request: Request) -> Response:
        await ticket.take_slot()
        self.metrics.served.labels(forward.upstream_model).inc()
        upstream_request = self.client.build_request("POST", PATHS[forward.kind], json=forward.body)
        try:
            upstream = await self.client.send(upstream_request, stream=True)
        except httpx.HTTPError as exc:
            raise ApiError(502, f"the upstream server {self.url} cannot be reached ({exc}); is it running?") from None
        headers = {"X-Hydra-Cluster": "base" if forward.cluster is None else str(forward.cluster)}
        media_type = upstream.headers.get("content-type", "application/json")
        if forward.stream and upstream.status_code == 200:
            return TicketedStream(
                self._relay(upstream, forward), ticket, status_code=200, media_type=media_type, headers=headers
            )
        try:
            content = await upstream.aread()
        finally:
            await upstream.aclose()
        if upstream.status_code == 200:
            content = self._label(content, forward)
        return Response(content, status_code=upstream.status_code, media_type=media_type, headers=headers)

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
        except ValueError:
            return content
        if isinstance(body, dict):
            body.setdefault("hydra_cluster", forward.cluster)
            content = json.dumps(body).encode()
        return content

    async def close(self) -> None:
        await self.client.aclose()
