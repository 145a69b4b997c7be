"""The recorder: write outcomes as they arrive, batching whatever queued meanwhile.

One transaction per batch, retried until the database takes it: an outcome is never
dropped (the mail may have been delivered). Each outcome is then logged, counted and, when
its attempt was traced, given an ``outbox.record`` span.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import asyncpg
from opentelemetry.trace import Tracer

from outbox.dispatcher import metrics, tracing
from outbox.dispatcher.db import CONNECTION_ERRORS
from outbox.dispatcher.shared import Shared, mail_fields
from outbox.dispatcher.store import Outcome, Release, Store

if TYPE_CHECKING:
    from outbox.dispatcher.daemon import DispatcherConfig

__all__ = ["RECORD_RETRY_ERRORS", "Recorder"]

#: Errors after which the same transaction may simply be tried again.
RECORD_RETRY_ERRORS: tuple[type[Exception], ...] = (
    *CONNECTION_ERRORS,
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
)


#: Outcomes logged between two turns of the event loop.
YIELD_EVERY = 8


class Recorder:
    """Drains ``shared.records`` into the store until it hands out None."""

    def __init__(
        self,
        config: DispatcherConfig,
        store: Store,
        shared: Shared,
        log: logging.LoggerAdapter[logging.Logger],
        tracer: Tracer,
    ) -> None:
        self._config = config
        self._store = store
        self._shared = shared
        self._log = log
        self._tracer = tracer

    async def run(self) -> None:
        """Write outcomes as they come; whatever queued meanwhile goes in the same batch."""
        records = self._shared.records
        done = False
        while not done:
            item = await records.get()
            batch: list[Outcome | Release] = []
            while item is not None:
                batch.append(item)
                if records.empty():
                    break
                item = records.get_nowait()
            done = item is None
            if batch:
                await self._write(batch)

    async def _write(self, batch: list[Outcome | Release]) -> None:
        failures = 0
        started_ns = time.time_ns()
        while True:  # outcomes are never dropped: keep trying until the database is back
            try:
                recorded = await self._store.record(self._config.name, batch)
                break
            except RECORD_RETRY_ERRORS as exc:
                failures += 1
                await self._shared.db_trouble(
                    self._log,
                    "record",
                    exc,
                    failures,
                    interruptible=False,
                    pending_outcomes=len(batch),
                )
        self._shared.held.difference_update(item.mail.id for item in batch)
        finished_ns = time.time_ns()
        outcomes = [item for item in batch if isinstance(item, Outcome)]
        releases = [item for item in batch if isinstance(item, Release)]
        for index, outcome in enumerate(outcomes, 1):
            if index % YIELD_EVERY == 0:
                # A batch's logs and metrics are a few hundred microseconds of work: let
                # the senders' SMTP replies in between, not behind all of it.
                await asyncio.sleep(0)
            lease_lost = outcome.mail.id in recorded.lease_lost
            self._log_outcome(outcome, lease_lost)
            if outcome.span is not None:
                tracing.recorded(
                    self._tracer,
                    outcome.span,
                    outbox_id=outcome.mail.id,
                    outcome=outcome.outcome,
                    lease_lost=lease_lost,
                    batch=len(batch),
                    started_ns=started_ns,
                    finished_ns=finished_ns,
                )
        for release in releases:
            self._log.info(
                "mail.released", extra={**mail_fields(release.mail), "reason": release.reason}
            )
        for scope, rate in recorded.throttled.items():
            self._log.warning(
                "scope.throttled", extra={"domain": scope or "*", "rate": round(rate, 3)}
            )

    def _log_outcome(self, item: Outcome, lease_lost: bool) -> None:
        label = "lease_lost" if lease_lost else item.outcome
        metrics.MAILS.labels(label).inc()
        metrics.ATTEMPT_NUMBER.observe(item.mail.attempts)
        fields: dict[str, Any] = {
            **mail_fields(item.mail),
            "smtp_code": item.result.smtp_code,
            "smtp_stage": item.stage,
            "lease_lost": lease_lost,
        }
        if item.outcome in ("deferred", "unknown"):
            fields["retry_in"] = round(item.retry_in, 2)
        if item.outcome != "sent":
            fields["reply"] = item.result.smtp_reply
            fields["error"] = item.error
        level = logging.WARNING if lease_lost or item.outcome == "failed" else logging.INFO
        self._log.log(level, f"mail.{label}", extra=fields)
