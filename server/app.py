"""The FastAPI app: routes, the API key, admission (429 beyond the queue) and errors in OpenAI's
format, over a backend that either generates (local.LocalBackend) or forwards (proxy.UpstreamBackend).

    GET  /v1/models              auto, cluster_<c> ..., base
    POST /v1/chat/completions    messages -> answer (stream: server-sent events)
    POST /v1/completions         prompt -> continuation
    GET  /health                 liveness and load, never behind the API key
    GET  /metrics                Prometheus text format
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from hydra_edge.server.admission import Admission
from hydra_edge.server.errors import ApiError
from hydra_edge.server.local import TicketedStream
from hydra_edge.server.metrics import MetricsMiddleware, ServerMetrics
from hydra_edge.server.requests import ChatRequest, CompletionRequest, parse, read_json

log = logging.getLogger("hydra_edge.server")


@dataclass(frozen=True)
class ServeSettings:
    api_key: str | None = None
    max_concurrency: int = 4
    max_queue: int = 16
    max_tokens_cap: int = 2048
    max_body_bytes: int = 4 * 1024 * 1024


def create_app(make_backend, settings: ServeSettings) -> FastAPI:
    """make_backend(metrics) -> the backend; the admission and metrics are the app's own."""
    admission = Admission(settings.max_concurrency, settings.max_queue)
    metrics = ServerMetrics(admission)
    backend = make_backend(metrics)
    app = FastAPI(title="hydra-edge", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.backend, app.state.admission, app.state.metrics = backend, admission, metrics

    def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise ApiError(
                401,
                "missing or wrong API key: send the header `Authorization: Bearer <key>` with the server's --api-key",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    async def generate(request: Request, kind: str) -> Response:
        check_key(request)
        body = await read_json(request, settings.max_body_bytes)
        parsed = parse(ChatRequest if kind == "chat" else CompletionRequest, body)
        request.state.model_label = parsed.model if parsed.model in backend.model_ids() else "unknown"
        prepared = backend.prepare(kind, parsed, body)
        ticket = admission.admit()
        if ticket is None:
            raise ApiError(
                429,
                f"the server is busy ({admission.running} requests generating, {admission.waiting} waiting); "
                "retry in a moment",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        try:
            response = await backend.respond(prepared, ticket, request)
        except BaseException:
            ticket.close()
            raise
        if not isinstance(response, TicketedStream):  # a whole answer is done; a stream closes its ticket
            ticket.close()
        return response

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, "completion")

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

    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
