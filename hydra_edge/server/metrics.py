"""Prometheus metrics (/metrics, text format), through the official client. Each app has its own
registry, so two servers in one process (tests) count apart."""

from __future__ import annotations

import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from hydra_edge.server.admission import Admission

GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")
KNOWN_PATHS = (*GENERATION_PATHS, "/v1/models", "/health", "/metrics")
disable_created_metrics()  # the *_created series only double the output; nothing here reads them

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, admission: Admission) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "hydra_edge_requests",
            "HTTP requests answered, by endpoint, model and status.",
            ["endpoint", "model", "status"],
            registry=registry,
        )
        self.served = Counter(
            "hydra_edge_served_requests",
            "Generations started, by what served them: cluster_<c> or base.",
            ["served_by"],
            registry=registry,
        )
        self.prompt_tokens = Counter("hydra_edge_prompt_tokens", "Prompt tokens read.", registry=registry)
        self.completion_tokens = Counter("hydra_edge_completion_tokens", "Tokens generated.", registry=registry)
        self.latency = Histogram(
            "hydra_edge_request_seconds",
            "Time from request to the end of its response (generation endpoints).",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.first_token = Histogram(
            "hydra_edge_time_to_first_token_seconds",
            "Time from request to its first generated token.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        Gauge("hydra_edge_requests_running", "Requests holding a generation slot.", registry=registry).set_function(
            lambda: admission.running
        )
        Gauge("hydra_edge_queue_depth", "Admitted requests waiting for a slot.", registry=registry).set_function(
            lambda: admission.waiting
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts every response by endpoint, model and status, and times the generation endpoints to
    their last byte. A plain ASGI middleware: Starlette's BaseHTTPMiddleware would get in the way
    of a streaming response noticing that its client has gone."""

    def __init__(self, app, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def note_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, note_status)
        finally:
            path = scope["path"] if scope["path"] in KNOWN_PATHS else "other"
            model = scope.get("state", {}).get("model_label", "")
            self.metrics.requests.labels(path, model, str(status)).inc()
            if path in GENERATION_PATHS and status == 200:
                self.metrics.latency.observe(time.perf_counter() - started)
