"""The FastAPI app: routes, the API key, admission (429 beyond the queue) and errors in OpenAI's
format, over a backend that either generates (local.LocalBackend) or forwards (proxy.UpstreamBackend).

    GET  /v1/models              auto, cluster_<c> ..., base
    POST /v1/chat/completions    messages -> answer (stream: server-sent events)
    POST /v1/completions         prompt -> continuation
    GET  /health                 liveness and load, never behind the API key
    GET  /metrics                Prometheus text format
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
from concurrent.futures import Executor, Future

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from hydra_edge.errors import UserError
from hydra_edge.server.admission import Admission
from hydra_edge.server.errors import ApiError, client_left
from hydra_edge.server.local import TicketedStream, unknown_model, until_disconnected
from hydra_edge.server.metrics import MetricsMiddleware, ServerMetrics
from hydra_edge.server.requests import ChatRequest, CompletionRequest, GenerationRequest, parse_body, read_body
from hydra_edge.server.settings import ServeSettings

log = logging.getLogger("hydra_edge.server")


class DaemonThreads(Executor):
    """Each call on a daemon thread of its own. Preparing a request cannot be interrupted (a
    second or more per megabyte of prompt) and a SIGTERM must not wait for it; the request's
    slot already bounds how many run at once."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()

        def run() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as exc:
                    future.set_exception(exc)

        threading.Thread(target=run, name="hydra-prepare", daemon=True).start()
        return future


def create_app(make_backend, settings: ServeSettings) -> FastAPI:
    """make_backend(metrics) -> the backend; the admission and metrics are the app's own."""
    admission = Admission(settings.max_concurrency, settings.max_queue)
    metrics = ServerMetrics(admission)
    backend = make_backend(metrics)
    # No redirect from /v1/models/ to /v1/models: an API answers 404 naming the path, not a 307.
    app = FastAPI(title="hydra-edge", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)
    app.state.backend, app.state.admission, app.state.metrics = backend, admission, metrics
    check_key = key_check(settings.api_key)
    _add_generation_routes(app, Generation(backend, admission, settings, check_key))
    _add_read_routes(app, backend, admission, metrics, check_key)
    _add_error_handlers(app)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


def key_check(api_key: str | None):
    """check(request): raises a 401 unless the request sends the key (compared in constant time,
    so the answer's timing does not tell how much of a guess was right). No key: all pass."""

    def check(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(
                401,
                "missing or wrong API key: send the header `Authorization: Bearer <key>` with the server's --api-key",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return check


class Generation:
    """One generation request from its body to its answer: the key, the body (bounded in size and
    time), the model, a place in the admission (429 beyond the queue), then the backend's work.
    The ticket is closed on every way out, so that a slot is never lost."""

    def __init__(self, backend, admission: Admission, settings: ServeSettings, check_key) -> None:
        self.backend, self.admission, self.settings, self.check_key = backend, admission, settings, check_key
        self.preparers = DaemonThreads()

    async def __call__(self, request: Request, kind: str) -> Response:
        self.check_key(request)
        parsed = await self.parse(request, kind)
        ticket = self.admit()
        try:
            if not await until_disconnected(request, ticket.take_slot()):  # it left while queued
                ticket.close()
                return client_left()
            prepared = await self.prepare(kind, parsed)
            response = await self.backend.respond(prepared, ticket, request)
        except BaseException:
            ticket.close()
            raise
        if not isinstance(response, TicketedStream):  # a whole answer is done; a stream closes its ticket
            ticket.close()
        return response

    async def parse(self, request: Request, kind: str) -> GenerationRequest:
        """The request's body, checked, for a model this server has (the metrics label it)."""
        raw = await read_body(request, self.settings.max_body_bytes, self.settings.client_timeout)
        # Decoding and checking a 4 MB body takes a fifth of a second: off the event loop too.
        parsed = await asyncio.to_thread(parse_body, ChatRequest if kind == "chat" else CompletionRequest, raw)
        known = self.backend.model_ids()
        request.state.model_label = parsed.model if parsed.model in known else "unknown"
        if parsed.model not in known:
            raise unknown_model(parsed.model, known)
        return parsed

    def admit(self):
        """A ticket in the admission, or a 429 when every slot and place in the queue is taken."""
        ticket = self.admission.admit()
        if ticket is None:
            raise ApiError(
                429,
                f"the server is busy ({self.admission.running} requests generating, {self.admission.waiting} "
                "waiting); retry in a moment",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        return ticket

    async def prepare(self, kind: str, parsed: GenerationRequest):
        """The backend's prepare() (routing, rendering, tokenizing: CPU work that grows with the
        prompt) off the event loop, in the request's slot: it counts as running, and the slot is
        held until it ends, even if the client has left."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self.preparers, self.backend.prepare, kind, parsed)
        except UserError as exc:  # the chat template refuses the conversation (or takes too long)
            raise ApiError(400, str(exc), param="messages" if kind == "chat" else "prompt") from None


def _add_generation_routes(app: FastAPI, generate: Generation) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, "completion")


def _add_read_routes(app: FastAPI, backend, admission: Admission, metrics: ServerMetrics, check_key) -> None:
    """The models, the load and the metrics; /health stays open without the key (for probes)."""

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        check_key(request)
        return {
            "object": "list",
            "data": [{"id": m, "object": "model", "created": 0, "owned_by": "hydra-edge"} for m in backend.model_ids()],
        }

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "running": admission.running, "waiting": admission.waiting}

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        check_key(request)
        return Response(metrics.exposition(), media_type=metrics.content_type)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's format, FastAPI's and Starlette's own included; an unexpected one
    names only its type (the traceback goes to the log, never to the client)."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = {404: f"no such endpoint: {request.url.path}", 405: f"{request.method} is not allowed here"}
        return ApiError(exc.status_code, message.get(exc.status_code, str(exc.detail))).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return ApiError(400, str(exc)).response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        return ApiError(500, f"internal error ({type(exc).__name__}); see the server's log").response()
