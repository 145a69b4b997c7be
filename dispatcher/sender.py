"""The senders: ``concurrency`` workers, each with its own reused SMTP connection.

A worker takes a claim from the queue, makes one attempt and queues its outcome (or the
claim's release) for the recorder. No send starts unless the lease surely still holds.
When the SMTP server cannot be reached, all sending pauses (capped, jittered) instead
of spending every mail's attempts on it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from opentelemetry import trace
from opentelemetry.trace import Tracer

from outbox.dispatcher import metrics, retry, tracing
from outbox.dispatcher.backoff import full_jitter
from outbox.dispatcher.liveness import Liveness
from outbox.dispatcher.message import build_message
from outbox.dispatcher.shared import Claim, Shared
from outbox.dispatcher.smtp import SendResult, SmtpConfig, SmtpConnection, Verdict, describe
from outbox.dispatcher.store import Outcome, Release

if TYPE_CHECKING:
    from outbox.dispatcher.daemon import DispatcherConfig

__all__ = ["SMTP_PAUSE_CAP", "SUPPRESSED", "Sender"]

#: Longest pause of all sending while the SMTP server cannot be reached (seconds).
SMTP_PAUSE_CAP = 10.0
#: The error recorded for a mail whose recipient is on the suppression list.
SUPPRESSED = "recipient is on the suppression list"


class Sender:
    """The workers of one dispatcher, and the SMTP server's health they share."""

    def __init__(
        self,
        config: DispatcherConfig,
        smtp: SmtpConfig,
        shared: Shared,
        liveness: Liveness,
        log: logging.LoggerAdapter[logging.Logger],
        tracer: Tracer,
        *,
        jitter: retry.Jitter = full_jitter,
    ) -> None:
        self._config = config
        self._smtp = smtp
        self._shared = shared
        self._liveness = liveness
        self._log = log
        self._tracer = tracer
        self._jitter = jitter
        #: Failed rounds of SMTP connections in a row (lengthens the pause).
        self._smtp_failures = 0

    async def work(self, index: int) -> None:
        """One worker: deliver claims from the queue until it hands out None."""
        shared = self._shared
        connection = SmtpConnection(self._smtp)
        try:
            while True:
                claim = await shared.queue.get()
                if claim is None:
                    return
                try:
                    await self._deliver(connection, claim)
                except Exception as exc:  # a bug must cost one attempt, not the dispatcher
                    self._log.error("mail.deliver_crashed", exc_info=exc, extra=claim.fields)
                    now = datetime.now(UTC)
                    result = SendResult(Verdict.TRANSIENT, error=describe(exc))
                    cfg = self._config
                    retry_in = self._jitter(claim.attempt, cfg.retry_base, cfg.retry_cap)
                    shared.records.put_nowait(
                        Outcome(claim.mail, "deferred", result, now, now, retry_in, result.error)
                    )
                finally:
                    shared.outstanding -= 1
                    shared.finished += 1
                    shared.room.set()
        finally:
            await connection.quit()

    async def _deliver(self, connection: SmtpConnection, claim: Claim) -> None:
        """One attempt, in an ``outbox.send`` span that continues the mail's trace."""
        records = self._shared.records
        if not tracing.may_record(self._tracer):  # no SDK: not even a no-op span per mail
            records.put_nowait(await self._attempt(connection, claim))
            return
        span = tracing.send_span(
            self._tracer,
            claim.mail.trace_context,
            outbox_id=claim.id,
            message_id=claim.mail.message_id,
            attempt=claim.attempt,
            dispatcher=self._config.name,
        )
        with trace.use_span(span, end_on_exit=True):
            item = await self._attempt(connection, claim)
            if isinstance(item, Release):
                tracing.send_finished(span, "released", error=item.reason)
            else:
                result = item.result
                context = tracing.send_finished(
                    span,
                    item.outcome,
                    stage=item.stage,
                    code=result.smtp_code,
                    error=None if item.outcome == "sent" else item.error or result.smtp_reply,
                )
                if context is not None:
                    item = replace(item, span=context)
        records.put_nowait(item)

    async def _attempt(self, connection: SmtpConnection, claim: Claim) -> Outcome | Release:
        """Send the claimed mail if its lease still holds: its outcome, or its release."""
        if claim.mail.suppressed:
            return _suppressed(claim)
        cfg = self._config
        pause = self._shared.smtp_pause_until - time.monotonic()
        if pause > 0:
            await asyncio.sleep(min(pause, max(0.0, claim.deadline - time.monotonic())))
        budget = claim.deadline - time.monotonic() - cfg.lease_margin
        lapsed = self._liveness.lapsed_since(claim.deadline - cfg.lease)
        if budget <= 0 or self._liveness.fenced() or lapsed:
            # The lease may already belong to someone else: sending now could duplicate.
            reason = (
                "lease nearly expired"
                if budget <= 0
                else "heartbeat lapsed since the claim"
                if lapsed
                else "heartbeat not confirmed"
            )
            return Release(claim.mail, reason)
        started_at = datetime.now(UTC)
        try:
            message = build_message(claim.mail)
        except Exception as exc:  # a row no server could take: never retried, never fatal
            result = SendResult(
                Verdict.PERMANENT,
                error=f"cannot render the message: {describe(exc)}",
                stage="render",
            )
            return self._decide(claim, result, started_at)
        clock = time.perf_counter()
        try:
            deadline = asyncio.get_running_loop().time() + budget
            result = await connection.send(message, deadline=deadline)
        except Exception as exc:  # whatever nobody foresaw is this mail's attempt, not a crash
            self._log.error("mail.send_crashed", exc_info=exc, extra=claim.fields)
            result = _broken(connection, f"unexpected error: {describe(exc)}")
        metrics.SEND_SECONDS.observe(time.perf_counter() - clock)
        self._note_smtp_health(result)
        if result.connection_problem and result.stage == "connect":
            # The server could not be reached at all: nothing was attempted for this mail,
            # so it keeps its attempts and waits for the pause to end.
            return Release(claim.mail, f"SMTP server unreachable: {retry.failure_text(result)}")
        return self._decide(claim, result, started_at)

    def _decide(self, claim: Claim, result: SendResult, started_at: datetime) -> Outcome:
        finished_at = datetime.now(UTC)
        age = (finished_at - claim.mail.created_at).total_seconds()
        decision = retry.decide(result, claim.attempt, age, self._config, jitter=self._jitter)
        return Outcome(
            claim.mail,
            decision.outcome,
            result,
            started_at,
            finished_at,
            retry_in=decision.retry_in,
            error=decision.error,
        )

    def _note_smtp_health(self, result: SendResult) -> None:
        shared = self._shared
        if not result.connection_problem:
            self._smtp_failures = 0
            self._set_smtp_error(None)
            return
        if result.stage == "connect":
            self._set_smtp_error(retry.failure_text(result))
        now = time.monotonic()
        if now < shared.smtp_pause_until:
            return  # another worker's failure in the same round already set the pause
        # One failed round lengthens the pause, however many workers failed in it; capped
        # low, so delivery resumes within seconds of the server coming back.
        self._smtp_failures += 1
        shared.smtp_pause_until = now + 0.5 + full_jitter(self._smtp_failures, 0.5, SMTP_PAUSE_CAP)

    def _set_smtp_error(self, error: str | None) -> None:
        """Log the SMTP server's reachability once per change, and publish it."""
        shared = self._shared
        changed = (error is None) != (shared.smtp_error is None)
        shared.smtp_error = error
        if not changed:
            return
        metrics.SMTP_UNREACHABLE.set(error is not None)
        if error is None:
            self._log.info("smtp.reachable")
        else:
            self._log.warning("smtp.unreachable", extra={"error": error, "smtp": repr(self._smtp)})
        shared.beat_now.set()  # tell `outbox status` now, not at the next heartbeat


def _suppressed(claim: Claim) -> Outcome:
    """The outcome of a mail that must not go out: no SMTP, never retried."""
    now = datetime.now(UTC)
    result = SendResult(Verdict.PERMANENT, error=SUPPRESSED)
    return Outcome(claim.mail, "suppressed", result, now, now, error=SUPPRESSED)


def _broken(connection: SmtpConnection, error: str) -> SendResult:
    """The result of a send cut off mid-way: the connection is dropped, and if the server
    already had the whole message it may have accepted it."""
    connection.close()
    stage = connection.stage
    verdict = Verdict.UNKNOWN if stage == "end_of_data" else Verdict.TRANSIENT
    return SendResult(verdict, error=error, connection_problem=True, stage=stage)
