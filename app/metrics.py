"""Prometheus metrics: per-stage latency histograms, request/batch/queue counters, and the /metrics endpoint.

Metrics live in the default registry of the process. Under several workers (`retrieval serve --workers N`,
RETRIEVAL_API_WORKERS) every worker writes its series to PROMETHEUS_MULTIPROC_DIR, which `retrieval serve` sets,
and /metrics, whichever worker answers it, adds them up (prometheus_client's multiprocess mode).
"""

from __future__ import annotations

import os
import time

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Stages of one query: decode -> preprocess -> forward (the batched pass) -> search -> metadata (SQL join).
STAGES = ("decode", "preprocess", "queue", "forward", "search", "metadata")
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

STAGE_SECONDS = Histogram("retrieval_stage_seconds", "Latency of one stage of a request.", ["stage"],
                          buckets=_LATENCY_BUCKETS)
REQUEST_SECONDS = Histogram("retrieval_http_request_seconds", "HTTP request latency.", ["method", "route"],
                            buckets=_LATENCY_BUCKETS)
REQUESTS = Counter("retrieval_http_requests", "HTTP requests answered.", ["method", "route", "status"])
BATCH_SIZE = Histogram("retrieval_batch_size", "Queries per forward pass.", buckets=(1, 2, 4, 8, 16, 32, 64, 128))
QUEUE_DEPTH = Gauge("retrieval_queue_depth", "Queries waiting for a forward pass.", multiprocess_mode="livesum")
REJECTED = Counter("retrieval_rejected", "Queries refused with 503 because the queue was full.")
SWAPS = Counter("retrieval_swaps", "Hot swaps of the model + index pair.", ["result"])
IMAGES_WRITTEN = Counter("retrieval_images_written", "Images added, updated or deleted through the API.",
                         ["action"])
INDEX_VECTORS = Gauge("retrieval_index_vectors", "Live vectors in the serving index.", multiprocess_mode="livemax")

for _stage in STAGES:
    STAGE_SECONDS.labels(_stage)  # export every stage from the start, even before its first observation

router = APIRouter(tags=["health"])


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
def metrics() -> Response:
    """Prometheus text exposition (every worker's series added up when there are several)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def forget_dead_workers() -> None:
    """Under several workers: drop the live gauges of workers that died (uvicorn starts a new one in their place;
    without this a dead worker's last queue depth and vector count would be reported for ever)."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory or not os.path.isdir(directory):
        return
    suffixes = (name.removesuffix(".db").rpartition("_")[2] for name in os.listdir(directory)
                if name.startswith("gauge_live"))  # gauge_livesum_<pid>.db
    pids = {int(suffix) for suffix in suffixes if suffix.isdigit()}
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            mark_process_dead(pid, directory)
        except PermissionError:  # alive, someone else's
            pass


class RequestMetrics:
    """Pure ASGI middleware counting requests by route template (not raw path: ids would explode cardinality)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "GET")
            REQUESTS.labels(method, template, str(status)).inc()
            REQUEST_SECONDS.labels(method, template).observe(time.perf_counter() - start)
