"""Serving from a loaded engine (an ONNX export or a PyTorch adapter): the model a request names
is resolved to a cluster (auto: the request router's), the prompt is rendered with that cluster's
chat template, and the answer is generated on a worker thread while the event loop streams it.

One worker thread per slot (--max-concurrency): the engines release Python's lock while they
compute, so the loop keeps answering /health and new requests during generation. Preparing a
request (routing, rendering, tokenizing: a second per megabyte of prompt) runs off the loop too,
in the same slot (see app.py).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from hydra_edge.data.records import prompt_ids, text_prompt_ids
from hydra_edge.inference.protocol import Engine, Sampling, ServeAs
from hydra_edge.server.admission import Ticket
from hydra_edge.server.errors import ApiError, client_left
from hydra_edge.server.metrics import ServerMetrics
from hydra_edge.server.replies import Kind, Replies, sse
from hydra_edge.server.requests import GenerationRequest
from hydra_edge.server.stops import StopScanner

log = logging.getLogger("hydra_edge.server")


@dataclass
class Plan:
    """One request, checked and ready to generate."""

    kind: Kind
    model: str  # the id the client asked for
    cluster: int  # the routed or pinned cluster (for the base: the routed one, reported only)
    serve_as: ServeAs
    prompt_ids: list[int]
    sampling: Sampling
    stops: list[str]
    stream: bool
    include_usage: bool
    arrived: float  # time.perf_counter() when the request came in

    @property
    def served_by(self) -> str:
        return "base" if self.serve_as == "base" else f"cluster_{self.cluster}"

    def replies(self) -> Replies:
        return Replies(self.kind, self.model, None if self.serve_as == "base" else self.cluster, self.served_by)


def model_ids(clusters: list[int], base: bool) -> list[str]:
    """What GET /v1/models lists: auto (routed per request), each pinnable cluster, the base."""
    return ["auto", *[f"cluster_{c}" for c in clusters], *(["base"] if base else [])]


def unknown_model(model: str, known: list[str]) -> ApiError:
    return ApiError(
        404,
        f"the model `{model}` does not exist on this server; use one of {', '.join(known)} (GET /v1/models)",
        param="model",
        code="model_not_found",
    )


class LocalBackend:
    def __init__(self, engine: Engine, max_tokens_cap: int, slots: int, metrics: ServerMetrics) -> None:
        self.engine, self.max_tokens_cap, self.metrics = engine, max_tokens_cap, metrics
        self.executor = ThreadPoolExecutor(slots, thread_name_prefix="hydra-generate")
        # One routing at a time: the router holds Python's lock for long stretches (counting the
        # n-grams of a 1 MB prompt is one 0.2 s call), so the event loop waits behind one at most.
        self.routing = threading.Lock()

    def model_ids(self) -> list[str]:
        return model_ids(self.engine.forceable_clusters(), self.engine.serves_base())

    def describe(self) -> str:
        return self.engine.describe()

    def warm_up(self) -> None:
        """Loads the first cluster's model now, so a broken export fails at start, not at the
        first request."""
        self.engine.tokenizer(self.engine.route([{"role": "user", "content": ""}]))

    def prepare(self, kind: Kind, request: GenerationRequest) -> Plan:
        """Runs on a worker thread, holding a slot: the request routed, rendered and tokenized. A
        UserError (the chat template refuses the conversation or runs out of time) is a 400."""
        turns = request.turns()
        cluster, serve_as = self._resolve(request.model, turns)
        tokenizer = self.engine.tokenizer(cluster)
        ids = prompt_ids(tokenizer, turns) if kind == "chat" else text_prompt_ids(tokenizer, request.prompt)
        context = self.engine.context_length(cluster)
        if len(ids) >= context:
            raise ApiError(
                400,
                f"the prompt is {len(ids)} tokens and this model's context is {context} tokens, "
                "which leaves no room for an answer; shorten the prompt",
                param="messages" if kind == "chat" else "prompt",
                code="context_length_exceeded",
            )
        wanted = request.wanted_tokens()
        if wanted is not None and wanted > self.max_tokens_cap:
            raise ApiError(
                400,
                f"max_tokens {wanted} is above this server's limit of {self.max_tokens_cap} (--max-tokens-cap)",
                param="max_tokens",
            )
        max_new = min(wanted or self.max_tokens_cap, context - len(ids))
        sampling = Sampling(max_new, request.temperature, request.top_p, request.seed, request.ignore_eos)
        return Plan(
            kind,
            request.model,
            cluster,
            serve_as,
            ids,
            sampling,
            request.stop_strings(),
            request.stream,
            request.include_usage(),
            time.perf_counter(),
        )

    def _resolve(self, model: str, turns: list[dict]) -> tuple[int, ServeAs]:
        if model in ("auto", "base"):
            with self.routing:
                return self.engine.route(turns), "routed" if model == "auto" else "base"
        return int(model.removeprefix("cluster_")), "cluster"

    async def respond(self, plan: Plan, ticket: Ticket, request: Request):
        generation = Generation(self, plan, ticket)
        replies = plan.replies()
        headers = {"X-Hydra-Cluster": "base" if plan.serve_as == "base" else str(plan.cluster)}
        if plan.stream:
            events = stream_events(generation, replies, plan)
            return TicketedStream(
                events, ticket, on_close=generation.cancelled.set, media_type="text/event-stream", headers=headers
            )
        text = await generation.collect(request)
        if text is None:  # the client left; nobody reads this
            return client_left()
        body = replies.whole(text, generation.finish_reason, len(plan.prompt_ids), generation.completion_tokens)
        return JSONResponse(body, headers=headers)

    def produce(self, plan: Plan, emit: Callable[[str], None], cancelled: threading.Event) -> tuple[str, int]:
        """Runs on a worker thread: (finish reason, tokens generated). Stops at a stop string, an
        end token, max_tokens, or as soon as `cancelled` is set (the client left)."""
        scanner, count = StopScanner(plan.stops), 0
        pieces = self.engine.stream(plan.prompt_ids, plan.cluster, plan.serve_as, plan.sampling)
        try:
            for piece in pieces:
                count += 1
                if count == 1:
                    self.metrics.first_token.observe(time.perf_counter() - plan.arrived)
                text, stopped = scanner.feed(piece)
                emit(text)
                if stopped:
                    return "stop", count
                if cancelled.is_set():
                    return "cancelled", count
            emit(scanner.flush())
            return ("length" if count >= plan.sampling.max_new_tokens else "stop"), count
        finally:
            pieces.close()


class Generation:
    """One request's answer: generated on a worker thread, read on the event loop."""

    def __init__(self, backend: LocalBackend, plan: Plan, ticket: Ticket) -> None:
        self.backend, self.plan, self.ticket = backend, plan, ticket
        self.cancelled = threading.Event()
        self.finish_reason, self.completion_tokens = "stop", 0

    async def pieces(self) -> AsyncIterator[str]:
        """The answer's text as it comes, in the slot the request was prepared in. Leaving the loop
        early (the client disconnected) cancels the generation, which then frees its slot."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        self.ticket.worker_owns_slot = True
        loop.run_in_executor(self.backend.executor, self._work, loop, queue)
        try:
            while True:
                kind, value = await queue.get()
                if kind == "text":
                    yield value
                elif kind == "end":
                    self.finish_reason, self.completion_tokens = value
                    return
                else:
                    raise value
        finally:
            self.cancelled.set()

    def _work(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop has closed (server shutdown): nobody is reading
                pass

        metrics, plan = self.backend.metrics, self.plan
        try:
            if self.cancelled.is_set():
                return
            metrics.served.labels(plan.served_by).inc()
            metrics.prompt_tokens.inc(len(plan.prompt_ids))
            result = self.backend.produce(plan, lambda text: text and put(("text", text)), self.cancelled)
            metrics.completion_tokens.inc(result[1])
            log.info(
                "%s -> %s: %d prompt + %d answer tokens (%s) in %.2f s",
                plan.model, plan.served_by, len(plan.prompt_ids), result[1], result[0],
                time.perf_counter() - plan.arrived,
            )  # fmt: skip
            put(("end", result))
        except Exception as exc:
            log.exception("generation failed")
            put(("error", exc))
        finally:
            try:
                loop.call_soon_threadsafe(self.ticket.free_slot)
            except RuntimeError:
                pass

    async def collect(self, request: Request) -> str | None:
        """The whole answer, or None if the client disconnects first (generation is cancelled)."""

        async def gather() -> str:
            async with aclosing(self.pieces()) as pieces:
                return "".join([text async for text in pieces])

        return await until_disconnected(request, gather())


async def until_disconnected(request: Request, work: Awaitable):
    """work's result, or None as soon as the client disconnects (work is then cancelled): a
    client that hangs up while queued or answered frees its place at once."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()  # raises what work raised
            if await request.is_disconnected():
                task.cancel()
                return None
    finally:
        task.cancel()  # this request was cancelled itself (server shutdown): so is its work


async def stream_events(generation: Generation, replies: Replies, plan: Plan) -> AsyncIterator[str]:
    if plan.kind == "chat":
        yield sse(replies.chunk(first=True))
    try:
        async with aclosing(generation.pieces()) as pieces:
            async for text in pieces:
                yield sse(replies.chunk(text))
    except Exception as exc:  # the engine failed mid-answer: tell the client in the stream
        yield sse(ApiError(500, f"generation failed: {exc}").body())
        yield sse("[DONE]")
        return
    yield sse(replies.chunk(finish_reason=generation.finish_reason))
    if plan.include_usage:
        yield sse(replies.usage_chunk(len(plan.prompt_ids), generation.completion_tokens))
    yield sse("[DONE]")


class TicketedStream(StreamingResponse):
    """A streaming response that closes its ticket however it ends: sent, failed, or abandoned by
    a client that disconnected (Starlette then cancels the stream mid-iteration)."""

    def __init__(self, content, ticket: Ticket, on_close: Callable[[], object] = lambda: None, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self.ticket, self.on_close = ticket, on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()
            self.ticket.close()
            await self.body_iterator.aclose()
