"""GET /metrics: Prometheus text format.

The process metrics and the API's own counters (never the dispatcher's, which would
always read 0 here), plus the queue gauges of :mod:`dispatcher.queue_metrics` computed
from the database at scrape time. When the database is down the endpoint still answers
200, with ``outbox_database_up 0``.

With ``outbox api --workers N`` (N > 1) set ``PROMETHEUS_MULTIPROC_DIR`` to an empty
folder so the counters are summed over the workers (prometheus_client multiprocess mode);
otherwise each scrape sees the counters of whichever worker answered.
"""

from __future__ import annotations

import os

import asyncpg
from fastapi import APIRouter, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    generate_latest,
    multiprocess,
)

from outbox.dispatcher.queue_metrics import QueueCollector, sample_queue

#: The API's own metrics: the process and what the API does, never the metrics of other
#: modules that happen to be imported in the process (the dispatcher's histograms).
REGISTRY = CollectorRegistry()
for _collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
    REGISTRY.register(_collector)

REGISTRATIONS = Counter(
    "outbox_registrations_total",
    "Users registered, each with a welcome mail queued in the same transaction.",
    registry=REGISTRY,
)

router = APIRouter()


def _process_registry() -> CollectorRegistry:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return registry
    return REGISTRY


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "content": {CONTENT_TYPE_LATEST: {}},
            "description": "Prometheus text exposition format.",
        }
    },
)
async def metrics(request: Request) -> Response:
    """Prometheus metrics: process, registrations, and the queue read at scrape time."""
    pool: asyncpg.Pool = request.app.state.pool
    queue = CollectorRegistry()
    queue.register(QueueCollector(await sample_queue(pool)))
    body = generate_latest(_process_registry()) + generate_latest(queue)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
