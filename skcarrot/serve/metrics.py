"""Prometheus metrics of one application (its own registry, so tests may build many apps).

With ``--workers N`` each worker process reports its own series; scrape each, or
set ``PROMETHEUS_MULTIPROC_DIR`` for prometheus_client's multiprocess mode.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess

from .config import metrics_multiprocess_dir

__all__ = ["Metrics", "MetricsMiddleware"]


class Metrics:
    """Request counts and latencies, queries and images charged, images cached."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "skcarrot_requests_total", "HTTP requests", ["route", "method", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "skcarrot_request_seconds",
            "Request latency",
            ["route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.queries = Counter("skcarrot_queries_total", "Queries (prompts) charged", registry=self.registry)
        self.images_scored = Counter("skcarrot_images_scored_total", "Images scored", registry=self.registry)
        self.replays = Counter(
            "skcarrot_idempotent_replays_total", "Requests answered from a stored response", registry=self.registry
        )
        self.refusals = Counter(
            "skcarrot_refusals_total", "Charged requests refused", ["reason"], registry=self.registry
        )
        self.images_cached = Gauge("skcarrot_images_cached", "Decoded images in memory", registry=self.registry)
        self.image_cache_bytes = Gauge(
            "skcarrot_image_cache_bytes", "Bytes of decoded images in memory", registry=self.registry
        )
        #: HTTP requests in flight in this process (kept by :class:`MetricsMiddleware`).
        self.in_flight = 0
        in_flight = Gauge("skcarrot_requests_in_flight", "HTTP requests in flight", registry=self.registry)
        in_flight.set_function(lambda: self.in_flight)

    def render(self) -> bytes:
        if metrics_multiprocess_dir():
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


class MetricsMiddleware:
    """ASGI middleware: count and time every request by its route template (never by raw URL)."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        self.metrics.in_flight += 1
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.in_flight -= 1
            route = scope.get("route")
            name = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(name, scope.get("method", ""), str(status["code"])).inc()
            self.metrics.latency.labels(name).observe(time.perf_counter() - start)
