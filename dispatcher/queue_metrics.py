"""Queue gauges computed at scrape time from the database, for any Prometheus endpoint.

The API's ``GET /metrics`` samples the queue on every scrape; a dispatcher's metrics
server can reuse the same collector by sampling in its event loop and handing the latest
sample to :class:`QueueCollector` (whose ``collect`` is synchronous).

Gauges (all cheap on a table with millions of rows; see :func:`dispatcher.operations.queue_counts`):

``outbox_database_up``
    1 if the queue could be sampled, else 0 (the other queue gauges are then absent, so a
    dead database never reads as an empty queue).
``outbox_rows{status}``
    Rows per status. pending, sending, failed, cancelled are exact (partial indexes);
    sent is exact while the table is under 32 MiB, then estimated from PostgreSQL's
    running live-row count (``outbox_rows_sent_estimated`` says which).
``outbox_oldest_due_pending_seconds``
    How long the oldest due pending mail has been waiting since it became due; 0 when
    nothing is due. THE alert metric: it grows only when mail is not going out (no live
    dispatcher, SMTP down, or not enough throughput). Read from ``outbox_claim_idx``.
``outbox_due_pending``
    Pending mails that are due now (the backlog).
``outbox_live_dispatchers``
    Dispatchers that heartbeated within the last 10 seconds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import asyncpg
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from outbox.dispatcher import operations
from outbox.dispatcher.db import CONNECTION_ERRORS

log = logging.getLogger("dispatcher.queue_metrics")

#: A scrape gives up on the database after this many seconds (Prometheus' default
#: scrape timeout is 10 s; the process metrics must still come back in time).
SAMPLE_TIMEOUT = 2.0

_SAMPLE_ERRORS: tuple[type[Exception], ...] = (*CONNECTION_ERRORS, asyncpg.PostgresError)


@dataclass(frozen=True, slots=True)
class QueueSample:
    """One sample of the queue; ``queue`` is None when the database could not be read."""

    queue: operations.QueueCounts | None

    @property
    def database_up(self) -> bool:
        return self.queue is not None


async def sample_queue(pool: asyncpg.Pool, *, limit_seconds: float = SAMPLE_TIMEOUT) -> QueueSample:
    """Read the queue gauges from the database; never raises for database trouble."""
    try:
        async with asyncio.timeout(limit_seconds):
            async with pool.acquire() as conn:
                queue = await operations.queue_counts(conn)
    except _SAMPLE_ERRORS as exc:
        log.warning("metrics.queue_unavailable", extra={"error": f"{type(exc).__name__}: {exc}"})
        return QueueSample(queue=None)
    return QueueSample(queue=queue)


class QueueCollector:
    """A Prometheus collector yielding the gauges of a :class:`QueueSample`.

    Give it a sample, or a function returning the latest sample (None: not sampled yet,
    reported as database down).
    """

    def __init__(self, sample: QueueSample | Callable[[], QueueSample | None]) -> None:
        self._sample = sample

    def describe(self) -> Iterable[Metric]:
        # Names only, without touching the sample (called once at registration).
        return self._families(None)

    def collect(self) -> Iterable[Metric]:
        sample = self._sample() if callable(self._sample) else self._sample
        return self._families(sample if sample is not None else QueueSample(queue=None))

    @staticmethod
    def _families(sample: QueueSample | None) -> list[Metric]:
        up = GaugeMetricFamily(
            "outbox_database_up",
            "1 if the outbox database answered the scrape-time queue queries, else 0.",
        )
        rows = GaugeMetricFamily(
            "outbox_rows",
            "Outbox rows per status (sent is estimated on large tables, see "
            "outbox_rows_sent_estimated).",
            labels=["status"],
        )
        estimated = GaugeMetricFamily(
            "outbox_rows_sent_estimated",
            '1 if outbox_rows{status="sent"} is an estimate (pg_stat n_live_tup), 0 if exact.',
        )
        oldest = GaugeMetricFamily(
            "outbox_oldest_due_pending_seconds",
            "Seconds the oldest due pending mail has waited since it became due (0: none).",
        )
        due = GaugeMetricFamily("outbox_due_pending", "Pending mails due now (the backlog).")
        live = GaugeMetricFamily(
            "outbox_live_dispatchers",
            f"Dispatchers that heartbeated in the last {operations.LIVE_SECONDS} seconds.",
        )
        if sample is None:
            return [up, rows, estimated, oldest, due, live]
        up.add_metric([], 1.0 if sample.database_up else 0.0)
        queue = sample.queue
        if queue is None:
            return [up]
        for status, count in queue.counts.items():
            rows.add_metric([status], float(count))
        estimated.add_metric([], 1.0 if queue.sent_estimated else 0.0)
        oldest.add_metric([], queue.oldest_due_pending_seconds)
        due.add_metric([], float(queue.due_pending))
        live.add_metric([], float(queue.live_dispatchers))
        return [up, rows, estimated, oldest, due, live]
