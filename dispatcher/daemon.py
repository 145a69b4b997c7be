"""The dispatcher daemon: claim due mail, send it, record each outcome.

Tasks inside one process:

* claimer   - claims batches (``queries.CLAIM``) whenever workers have room, woken by
              NOTIFY or, failing that, by the poll interval;
* workers   - ``concurrency`` of them, each with its own reused SMTP connection;
* recorder  - writes outcomes as soon as they arrive, batching whatever queued up while
              the previous write was in flight (one statement per batch);
* heartbeat - proves this dispatcher is alive, so its leases are honoured;
* listener  - a dedicated LISTEN connection, probed and rebuilt when it dies.

No transaction is ever open across SMTP I/O: a claim commits before any mail is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import asyncpg
from opentelemetry import trace
from opentelemetry.trace import SpanContext, TracerProvider

from outbox.dispatcher import metrics, queries, tracing
from outbox.dispatcher.backoff import full_jitter
from outbox.dispatcher.db import CONNECTION_ERRORS, asyncpg_dsn, create_pool
from outbox.dispatcher.message import build_message
from outbox.dispatcher.settings import Settings
from outbox.dispatcher.smtp import SendResult, SmtpConfig, SmtpConnection, Verdict, describe

log = logging.getLogger("dispatcher")

#: How often the LISTEN connection is probed with a query (a silent connection may be dead).
LISTENER_PROBE_SECONDS = 5.0
#: Errors after which the same transaction may simply be tried again.
RECORD_RETRY_ERRORS: tuple[type[Exception], ...] = (
    *CONNECTION_ERRORS,
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
)
#: Longest pause of all sending while the SMTP server cannot be reached (seconds).
SMTP_PAUSE_CAP = 10.0
#: How long shutdown waits for the last outcomes to be written before giving up on them.
FLUSH_TIMEOUT_SECONDS = 10.0


class NameInUse(Exception):
    """Another live dispatcher already uses this name."""


@dataclass(frozen=True, slots=True)
class DispatcherConfig:
    """Tuning of one dispatcher process (see the README for what each one trades)."""

    name: str
    concurrency: int = 8
    batch_size: int = 32
    poll_interval: float = 2.0
    lease: float = 120.0
    heartbeat_interval: float = 2.0
    max_attempts: int = 15
    #: A row whose dispatcher vanished with it this many times is failed (circuit breaker).
    max_abandons: int = 5
    max_age: float = 3 * 86400.0
    retry_base: float = 5.0
    retry_cap: float = 1800.0
    grace: float = 20.0

    @property
    def stale_after(self) -> float:
        """A dispatcher silent for this long is presumed dead and its leases are taken."""
        return 3 * self.heartbeat_interval

    @property
    def lease_margin(self) -> float:
        """A send does not start unless this much of its lease is left."""
        return min(5.0, self.lease / 10)

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> DispatcherConfig:
        """Settings from the environment, then non-None ``overrides`` (command-line flags)."""
        config = cls(
            name=settings.dispatcher_name or default_name(),
            concurrency=settings.dispatcher_concurrency,
            batch_size=settings.dispatcher_batch_size,
            poll_interval=settings.dispatcher_poll_interval,
            lease=settings.dispatcher_lease,
            heartbeat_interval=settings.dispatcher_heartbeat_interval,
            max_attempts=settings.dispatcher_max_attempts,
            max_abandons=settings.dispatcher_max_abandons,
            max_age=settings.dispatcher_max_age,
            retry_base=settings.dispatcher_retry_base,
            retry_cap=settings.dispatcher_retry_cap,
            grace=settings.dispatcher_grace,
        )
        return replace(config, **{k: v for k, v in overrides.items() if v is not None})


def default_name() -> str:
    """``host-pid``: unique per process, readable in ``outbox status``."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True, slots=True)
class Claim:
    """A row this dispatcher holds a lease on."""

    row: asyncpg.Record
    #: time.monotonic() after which the lease must be presumed gone.
    deadline: float

    @property
    def id(self) -> int:
        return int(self.row["id"])

    @property
    def attempt(self) -> int:
        return int(self.row["attempts"])

    @property
    def fields(self) -> dict[str, Any]:
        return {"outbox_id": self.id, "message_id": self.row["message_id"], "attempt": self.attempt}


@dataclass(frozen=True, slots=True)
class Outcome:
    """A finished attempt, waiting to be recorded."""

    claim: Claim
    outcome: str  # sent | deferred | unknown | failed
    result: SendResult
    started_at: datetime
    finished_at: datetime
    retry_in: float = 0.0
    error: str | None = None
    #: The attempt's ``outbox.send`` span when it is recorded (``outbox.record`` goes under it).
    span: SpanContext | None = None


@dataclass(frozen=True, slots=True)
class Release:
    """A claimed row handed back unsent."""

    claim: Claim
    reason: str


class Dispatcher:
    """One dispatcher process's worth of work; :meth:`run` until :meth:`request_stop`."""

    def __init__(
        self,
        config: DispatcherConfig,
        database_url: str,
        smtp: SmtpConfig,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.config = config
        self._database_url = database_url
        self._smtp = smtp
        #: The global provider's unless one is given: no-op until an SDK is configured.
        self._tracer = tracing.tracer("outbox.dispatcher", tracer_provider)
        self._pool: asyncpg.Pool | None = None
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._queue: asyncio.Queue[Claim | None] = asyncio.Queue()
        self._records: asyncio.Queue[Outcome | Release | None] = asyncio.Queue()
        self._outstanding = 0  # claimed and not yet finished (queued or sending)
        #: Ids of rows we hold a lease on, until their outcome or release is written.
        self._held: set[int] = set()
        self._last_beat = 0.0
        #: time.monotonic() of the heartbeat that ended our last lapse: claims made before
        #: it may have been taken over while we were silent, so they are never sent.
        self._lapsed_at = 0.0
        self._smtp_failures = 0
        self._smtp_pause_until = 0.0
        #: Why the SMTP server cannot be reached right now (None: it can).
        self._smtp_error: str | None = None
        self._beat_now = asyncio.Event()
        self.started = asyncio.Event()
        #: Set when a task died of an unexpected error (the process should exit non-zero).
        self.crashed = False

    # --- lifecycle -----------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop gracefully: no new claims, finish in-flight sends, hand back the rest."""
        self._stop.set()

    async def run(self) -> None:
        """Run until a stop is requested, then shut down gracefully."""
        fields = {"dispatcher": self.config.name}
        self._pool = await self._until_connected(
            lambda: create_pool(
                self._database_url,
                min_size=1,
                max_size=4,
                application_name=f"outbox-dispatcher:{self.config.name}",
            ),
            "database.connect",
        )
        if self._pool is None:
            return
        try:
            if not await self._register():
                return
            log.info(
                "dispatcher.started",
                extra={
                    **fields,
                    "concurrency": self.config.concurrency,
                    "batch_size": self.config.batch_size,
                    "smtp": repr(self._smtp),
                },
            )
            background = [
                asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
                asyncio.create_task(self._listen_loop(), name="listener"),
            ]
            recorder = asyncio.create_task(self._record_loop(), name="recorder")
            workers = [
                asyncio.create_task(self._worker(i), name=f"worker-{i}")
                for i in range(self.config.concurrency)
            ]
            claimer = asyncio.create_task(self._claim_loop(), name="claimer")
            for task in (*background, recorder, *workers, claimer):
                task.add_done_callback(self._on_task_done)
            self.started.set()
            await self._stop.wait()
            log.info("dispatcher.stopping", extra=fields)
            await self._shutdown(claimer, workers, recorder, background)
        finally:
            await self._pool.close()
        log.info("dispatcher.stopped", extra=fields)

    async def _shutdown(
        self,
        claimer: asyncio.Task[None],
        workers: list[asyncio.Task[None]],
        recorder: asyncio.Task[None],
        background: list[asyncio.Task[None]],
    ) -> None:
        # The claimer notices the stop between claims; it is not cancelled mid-claim, so a
        # committed claim is never lost on the way back to us. (A task that crashed was
        # already reported by _on_task_done: shut down the rest all the same.)
        await asyncio.gather(claimer, return_exceptions=True)
        unstarted = 0
        while not self._queue.empty():
            claim = self._queue.get_nowait()
            if claim is not None:
                self._records.put_nowait(Release(claim, "shutdown"))
                unstarted += 1
        for _ in workers:
            self._queue.put_nowait(None)
        _, late = await asyncio.wait(workers, timeout=self.config.grace)
        for task in late:  # their rows stay leased; deregistering frees them at once
            task.cancel()
        if late:
            log.warning(
                "dispatcher.grace_exceeded",
                extra={"dispatcher": self.config.name, "abandoned_sends": len(late)},
            )
        self._records.put_nowait(None)
        _, unflushed = await asyncio.wait([recorder], timeout=FLUSH_TIMEOUT_SECONDS)
        if unflushed:
            recorder.cancel()
            log.error(
                "dispatcher.unrecorded_outcomes",
                extra={"dispatcher": self.config.name, "count": self._records.qsize()},
            )
        for task in background:
            task.cancel()
        await asyncio.gather(*late, *background, recorder, return_exceptions=True)
        assert self._pool is not None
        # If this fails our heartbeat goes stale instead, and others take over after that.
        with contextlib.suppress(*CONNECTION_ERRORS):
            await self._pool.execute(queries.DEREGISTER, self.config.name, timeout=5)
        log.info(
            "dispatcher.drained", extra={"dispatcher": self.config.name, "handed_back": unstarted}
        )

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        # A bug, not an outage (those are handled in the loops): stop rather than limp on.
        self.crashed = True
        log.error(
            "dispatcher.task_crashed",
            exc_info=task.exception(),
            extra={"dispatcher": self.config.name, "task": task.get_name()},
        )
        self.request_stop()

    async def _until_connected(
        self, connect: Callable[[], Awaitable[asyncpg.Pool]], event: str
    ) -> asyncpg.Pool | None:
        attempt = 0
        while not self._stop.is_set():
            try:
                return await connect()
            except CONNECTION_ERRORS as exc:
                attempt += 1
                await self._db_trouble(event, exc, attempt)
        return None

    async def _db_trouble(
        self,
        event: str,
        exc: BaseException,
        attempt: int,
        *,
        interruptible: bool = True,
        **fields: Any,
    ) -> None:
        """Log a database failure, then back off (capped, jittered) before the next try.

        ``interruptible``: a stop request cuts the wait short (not for work that must
        finish, like recording outcomes).
        """
        delay = full_jitter(attempt, 0.2, 5.0) + 0.1
        log.warning(
            event + ".failed",
            extra={
                "dispatcher": self.config.name,
                "error": repr(exc),
                "retry_in": round(delay, 2),
                **fields,
            },
        )
        await (self._sleep(delay) if interruptible else asyncio.sleep(delay))

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake early when a stop is requested."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    # --- liveness ------------------------------------------------------------------------

    async def _register(self) -> bool:
        cfg = self.config
        assert self._pool is not None
        attempt = 0
        waited_since = time.monotonic()
        while not self._stop.is_set():
            try:
                async with self._pool.acquire() as conn, conn.transaction():
                    force = await self._holder_is_gone(conn)
                    taken = await conn.fetchval(
                        queries.REGISTER,
                        cfg.name,
                        socket.gethostname(),
                        os.getpid(),
                        force,
                        cfg.stale_after,
                    )
                    if taken is not None:
                        orphans = await conn.fetch(
                            queries.RECLAIM_PREDECESSOR, cfg.name, cfg.max_abandons
                        )
                        await conn.execute(queries.FORGET_GONE_DISPATCHERS)
                if taken is not None:
                    self._last_beat = time.monotonic()
                    if orphans:
                        log.info(
                            "dispatcher.reclaimed_predecessor",
                            extra={"dispatcher": cfg.name, "rows": len(orphans)},
                        )
                    return True
            except CONNECTION_ERRORS as exc:
                attempt += 1
                await self._db_trouble("dispatcher.register", exc, attempt)
                continue
            if time.monotonic() - waited_since > cfg.stale_after + cfg.heartbeat_interval:
                raise NameInUse(cfg.name)
            await self._sleep(cfg.heartbeat_interval / 2)
        return False

    async def _holder_is_gone(self, conn: Any) -> bool:
        """True if the name is held by a process on this host that no longer exists."""
        holder = await conn.fetchrow(queries.NAME_HOLDER, self.config.name)
        if holder is None or holder["hostname"] != socket.gethostname():
            return False
        if holder["pid"] == os.getpid():
            return True
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def fenced(self) -> bool:
        """True when our heartbeat may look stale to others: start no send then."""
        silent = time.monotonic() - self._last_beat
        return silent > self.config.stale_after - self.config.heartbeat_interval

    async def _heartbeat_loop(self) -> None:
        cfg = self.config
        assert self._pool is not None
        failures = 0
        while True:
            try:
                alive = await self._pool.fetchval(
                    queries.HEARTBEAT, cfg.name, self._smtp_error, timeout=cfg.heartbeat_interval
                )
                if alive is None:  # our row was removed (e.g. by an operator): re-register
                    await self._pool.fetchval(
                        queries.REGISTER,
                        cfg.name,
                        socket.gethostname(),
                        os.getpid(),
                        True,
                        cfg.stale_after,
                    )
                now = time.monotonic()
                if alive is None or self.fenced():
                    # Silent long enough to be presumed dead: others may own our leases now.
                    self._lapsed_at = now
                self._last_beat = now
                failures = 0
            except CONNECTION_ERRORS as exc:
                failures += 1
                if failures == 1 or failures % 10 == 0:
                    log.warning(
                        "heartbeat.failed",
                        extra={"dispatcher": cfg.name, "error": repr(exc), "failures": failures},
                    )
            self._beat_now.clear()
            await self._wait_any(self._beat_now, cfg.heartbeat_interval)

    async def _listen_loop(self) -> None:
        """LISTEN for enqueue notifications on a dedicated connection; rebuild it if it dies."""
        attempt = 0
        while True:
            lost = asyncio.Event()
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(
                    asyncpg_dsn(self._database_url),
                    timeout=5,
                    server_settings={
                        "application_name": f"outbox-listener:{self.config.name}"[:63]
                    },
                )
                await conn.add_listener(queries.NOTIFY_CHANNEL, lambda *_: self._wake.set())
                conn.add_termination_listener(lambda _, lost=lost: lost.set())
                if attempt:
                    log.info("listener.rebuilt", extra={"dispatcher": self.config.name})
                attempt = 0
                self._wake.set()  # notifications may have been missed while we were away
                while not lost.is_set():
                    try:
                        await asyncio.wait_for(lost.wait(), LISTENER_PROBE_SECONDS)
                    except TimeoutError:
                        await conn.fetchval("SELECT 1", timeout=LISTENER_PROBE_SECONDS)
                log.warning("listener.lost", extra={"dispatcher": self.config.name})
            except CONNECTION_ERRORS as exc:
                attempt += 1
                await self._db_trouble("listener", exc, attempt, interruptible=False)
            finally:
                if conn is not None and not conn.is_closed():
                    conn.terminate()

    # --- claiming ------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        cfg = self.config
        assert self._pool is not None
        high_water = 2 * cfg.concurrency
        failures = 0
        unsure = False  # a claim failed: it may have committed without our learning of it
        while not self._stop.is_set():
            if unsure:
                unsure = not await self._release_unknown()
            room = high_water - self._outstanding
            wanted = min(cfg.batch_size, high_water)
            # Claim in batches: wait for a batch's worth of room unless workers are idle.
            if room <= 0 or (room < wanted and not self._queue.empty()):
                self._room.clear()
                await self._wait_any(self._room, cfg.poll_interval)
                continue
            pause = self._smtp_pause_until - time.monotonic()
            if pause > 0:  # the SMTP server is unreachable: don't burn attempts on it
                await self._sleep(pause)
                continue
            if self.fenced():  # our heartbeat is failing: whatever we claim we could not send
                await self._sleep(cfg.heartbeat_interval)
                continue
            self._wake.clear()
            now = time.monotonic()  # before the claim: a lapse during it voids it too
            claim_started_ns = time.time_ns()
            try:
                rows = await self._pool.fetch(
                    queries.CLAIM,
                    min(room, cfg.batch_size),
                    cfg.name,
                    cfg.lease,
                    cfg.stale_after,
                    cfg.max_abandons,
                )
            except CONNECTION_ERRORS as exc:
                failures += 1
                unsure = True
                await self._db_trouble("claim", exc, failures)
                continue
            failures = 0
            claim_finished_ns = time.time_ns()
            for row in rows:
                self._outstanding += 1
                self._held.add(row["id"])
                self._queue.put_nowait(Claim(row, now + cfg.lease))
                if row["trace_context"] is not None:
                    tracing.claimed(
                        self._tracer,
                        row["trace_context"],
                        outbox_id=row["id"],
                        dispatcher=cfg.name,
                        batch=len(rows),
                        started_ns=claim_started_ns,
                        finished_ns=claim_finished_ns,
                    )
            if rows:
                metrics.CLAIM_BATCH.observe(len(rows))
                log.debug("claim", extra={"dispatcher": cfg.name, "rows": len(rows)})
            if len(rows) < min(room, cfg.batch_size):
                # Drained: sleep until NOTIFY, the next scheduled retry, the poll interval
                # or a stop, whichever comes first (retries are not announced by NOTIFY).
                await self._wait_any(self._wake, await self._idle_seconds())

    async def _release_unknown(self) -> bool:
        """Hand back rows leased to us that we never heard of; False if the database is away.

        A claim whose connection died after the commit leaves rows leased to this live
        dispatcher that no worker will ever send; without this they would wait for their
        lease to expire.
        """
        assert self._pool is not None
        try:
            rows = await self._pool.fetch(
                queries.RELEASE_UNKNOWN, self.config.name, list(self._held)
            )
        except CONNECTION_ERRORS:
            return False
        if rows:
            log.warning(
                "claim.recovered", extra={"dispatcher": self.config.name, "rows": len(rows)}
            )
        return True

    async def _idle_seconds(self) -> float:
        """How long the claimer may sleep: until the next deferred mail is due, at most."""
        assert self._pool is not None
        try:
            due_in = await self._pool.fetchval(queries.NEXT_DUE_IN)
        except CONNECTION_ERRORS:
            return self.config.poll_interval
        if due_in is None:
            return self.config.poll_interval
        # Due already but not claimable (locked by someone else's claim): look again soon.
        return min(self.config.poll_interval, max(0.1, float(due_in)))

    async def _wait_any(self, event: asyncio.Event, seconds: float) -> None:
        """Wait for ``event``, a stop request, or ``seconds``, whichever comes first."""
        waiters = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(self._stop.wait())]
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    # --- sending -------------------------------------------------------------------------

    async def _worker(self, index: int) -> None:
        connection = SmtpConnection(self._smtp)
        try:
            while True:
                claim = await self._queue.get()
                if claim is None:
                    return
                try:
                    await self._deliver(connection, claim)
                except Exception as exc:  # a bug must cost one attempt, not the dispatcher
                    log.error(
                        "mail.deliver_crashed",
                        exc_info=exc,
                        extra={**claim.fields, "dispatcher": self.config.name},
                    )
                    now = datetime.now(UTC)
                    result = SendResult(Verdict.TRANSIENT, error=describe(exc))
                    retry_in = full_jitter(
                        claim.attempt, self.config.retry_base, self.config.retry_cap
                    )
                    self._records.put_nowait(
                        Outcome(claim, "deferred", result, now, now, retry_in, result.error)
                    )
                finally:
                    self._outstanding -= 1
                    self._room.set()
        finally:
            await connection.quit()

    async def _deliver(self, connection: SmtpConnection, claim: Claim) -> None:
        """One attempt, in an ``outbox.send`` span that continues the mail's trace."""
        if not tracing.may_record(self._tracer):  # no SDK: not even a no-op span per mail
            self._records.put_nowait(await self._attempt(connection, claim))
            return
        span = tracing.send_span(
            self._tracer,
            claim.row["trace_context"],
            outbox_id=claim.id,
            message_id=claim.row["message_id"],
            attempt=claim.attempt,
            dispatcher=self.config.name,
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
                    stage=result.stage,
                    code=result.smtp_code,
                    error=None if item.outcome == "sent" else item.error or result.smtp_reply,
                )
                if context is not None:
                    item = replace(item, span=context)
        self._records.put_nowait(item)

    async def _attempt(self, connection: SmtpConnection, claim: Claim) -> Outcome | Release:
        """Send the claimed mail if its lease still holds: its outcome, or its release."""
        pause = self._smtp_pause_until - time.monotonic()
        if pause > 0:
            await asyncio.sleep(min(pause, max(0.0, claim.deadline - time.monotonic())))
        budget = claim.deadline - time.monotonic() - self.config.lease_margin
        lapsed = claim.deadline - self.config.lease < self._lapsed_at  # claimed before it
        if budget <= 0 or self.fenced() or lapsed:
            # The lease may already belong to someone else: sending now could duplicate.
            reason = (
                "lease nearly expired"
                if budget <= 0
                else "heartbeat lapsed since the claim"
                if lapsed
                else "heartbeat not confirmed"
            )
            return Release(claim, reason)
        started_at = datetime.now(UTC)
        try:
            message = build_message(claim.row)
        except Exception as exc:  # a row no server could take: never retried, never fatal
            result = SendResult(
                Verdict.PERMANENT,
                error=f"cannot render the message: {describe(exc)}",
                stage="render",
            )
            return self._decide(claim, result, started_at)
        clock = time.perf_counter()
        try:
            async with asyncio.timeout(budget):
                result = await connection.send(message)
        except TimeoutError:
            result = _broken(connection, "send did not finish within its lease")
        except Exception as exc:  # whatever nobody foresaw is this mail's attempt, not a crash
            log.error(
                "mail.send_crashed",
                exc_info=exc,
                extra={**claim.fields, "dispatcher": self.config.name},
            )
            result = _broken(connection, f"unexpected error: {describe(exc)}")
        metrics.SEND_SECONDS.observe(time.perf_counter() - clock)
        self._note_smtp_health(result)
        if result.connection_problem and result.stage == "connect":
            # The server could not be reached at all: nothing was attempted for this mail,
            # so it keeps its attempts and waits for the pause to end.
            return Release(claim, f"SMTP server unreachable: {_smtp_error(result)}")
        return self._decide(claim, result, started_at)

    def _note_smtp_health(self, result: SendResult) -> None:
        if not result.connection_problem:
            self._smtp_failures = 0
            self._set_smtp_error(None)
            return
        if result.stage == "connect":
            self._set_smtp_error(_smtp_error(result))
        now = time.monotonic()
        if now < self._smtp_pause_until:
            return  # another worker's failure in the same round already set the pause
        # One failed round lengthens the pause, however many workers failed in it; capped
        # low, so delivery resumes within seconds of the server coming back.
        self._smtp_failures += 1
        self._smtp_pause_until = now + 0.5 + full_jitter(self._smtp_failures, 0.5, SMTP_PAUSE_CAP)

    def _set_smtp_error(self, error: str | None) -> None:
        """Log the SMTP server's reachability once per change, and publish it."""
        changed = (error is None) != (self._smtp_error is None)
        self._smtp_error = error
        if not changed:
            return
        metrics.SMTP_UNREACHABLE.set(error is not None)
        if error is None:
            log.info("smtp.reachable", extra={"dispatcher": self.config.name})
        else:
            log.warning(
                "smtp.unreachable",
                extra={"dispatcher": self.config.name, "error": error, "smtp": repr(self._smtp)},
            )
        self._beat_now.set()  # tell `outbox status` now, not at the next heartbeat

    def _decide(self, claim: Claim, result: SendResult, started_at: datetime) -> Outcome:
        cfg = self.config
        finished_at = datetime.now(UTC)
        if result.verdict is Verdict.SENT:
            return Outcome(claim, "sent", result, started_at, finished_at)
        if result.verdict is Verdict.PERMANENT:
            return Outcome(claim, "failed", result, started_at, finished_at, error=result.error)
        age = (finished_at - claim.row["created_at"]).total_seconds()
        if claim.attempt >= cfg.max_attempts or age >= cfg.max_age:
            why = f"gave up after {claim.attempt} attempts over {age:.0f}s"
            if result.verdict is Verdict.UNKNOWN:
                why += " (the last one may have been delivered)"
            return Outcome(
                claim,
                "failed",
                result,
                started_at,
                finished_at,
                error=f"{why}: {_smtp_error(result)}",
            )
        delay = full_jitter(claim.attempt, cfg.retry_base, cfg.retry_cap)
        outcome = "unknown" if result.verdict is Verdict.UNKNOWN else "deferred"
        return Outcome(
            claim, outcome, result, started_at, finished_at, retry_in=delay, error=result.error
        )

    # --- recording -----------------------------------------------------------------------

    async def _record_loop(self) -> None:
        """Write outcomes as they come; whatever queued meanwhile goes in the same batch."""
        done = False
        while not done:
            item = await self._records.get()
            batch: list[Outcome | Release] = []
            while item is not None:
                batch.append(item)
                if self._records.empty():
                    break
                item = self._records.get_nowait()
            done = item is None
            if batch:
                await self._write(batch)

    async def _write(self, batch: list[Outcome | Release]) -> None:
        outcomes = [item for item in batch if isinstance(item, Outcome)]
        releases = [item for item in batch if isinstance(item, Release)]
        assert self._pool is not None
        failures = 0
        started_ns = time.time_ns()
        while True:  # outcomes are never dropped: keep trying until the database is back
            try:
                async with self._pool.acquire() as conn, conn.transaction():
                    if len(batch) > 1:
                        await conn.execute(
                            queries.LOCK_FOR_RECORD, [item.claim.id for item in batch]
                        )
                    recorded = (
                        await conn.fetch(queries.RECORD, *self._record_args(outcomes))
                        if outcomes
                        else []
                    )
                    if releases:
                        await conn.execute(
                            queries.RELEASE,
                            [r.claim.id for r in releases],
                            [r.claim.row["lease_token"] for r in releases],
                        )
                break
            except RECORD_RETRY_ERRORS as exc:
                failures += 1
                await self._db_trouble(
                    "record", exc, failures, interruptible=False, pending_outcomes=len(batch)
                )
        self._held.difference_update(item.claim.id for item in batch)
        lost = {row["outbox_id"] for row in recorded if row["lease_lost"]}
        finished_ns = time.time_ns()
        for item in outcomes:
            self._log_outcome(item, item.claim.id in lost)
            if item.span is not None:
                tracing.recorded(
                    self._tracer,
                    item.span,
                    outbox_id=item.claim.id,
                    outcome=item.outcome,
                    lease_lost=item.claim.id in lost,
                    batch=len(batch),
                    started_ns=started_ns,
                    finished_ns=finished_ns,
                )
        for release in releases:
            log.info(
                "mail.released",
                extra={
                    **release.claim.fields,
                    "dispatcher": self.config.name,
                    "reason": release.reason,
                },
            )

    def _record_args(self, outcomes: list[Outcome]) -> list[Any]:
        return [
            [o.claim.id for o in outcomes],
            [o.claim.row["lease_token"] for o in outcomes],
            [o.claim.attempt for o in outcomes],
            [o.outcome for o in outcomes],
            [o.result.smtp_code for o in outcomes],
            [_clip(o.result.smtp_reply) for o in outcomes],
            [_clip(o.error) for o in outcomes],
            [o.started_at for o in outcomes],
            [o.finished_at for o in outcomes],
            [o.retry_in for o in outcomes],
            self.config.name,
            [o.result.stage for o in outcomes],
        ]

    def _log_outcome(self, item: Outcome, lease_lost: bool) -> None:
        label = "lease_lost" if lease_lost else item.outcome
        metrics.MAILS.labels(label).inc()
        metrics.ATTEMPT_NUMBER.observe(item.claim.attempt)
        fields: dict[str, Any] = {
            **item.claim.fields,
            "dispatcher": self.config.name,
            "smtp_code": item.result.smtp_code,
            "smtp_stage": item.result.stage,
            "lease_lost": lease_lost,
        }
        if item.outcome in ("deferred", "unknown"):
            fields["retry_in"] = round(item.retry_in, 2)
        if item.outcome != "sent":
            fields["reply"] = item.result.smtp_reply
            fields["error"] = item.error
        level = logging.WARNING if lease_lost or item.outcome == "failed" else logging.INFO
        log.log(level, f"mail.{label}", extra=fields)


def _broken(connection: SmtpConnection, error: str) -> SendResult:
    """The result of a send cut off mid-way: the connection is dropped, and if the server
    already had the whole message it may have accepted it."""
    connection.close()
    stage = connection.stage
    verdict = Verdict.UNKNOWN if stage == "end_of_data" else Verdict.TRANSIENT
    return SendResult(verdict, error=error, connection_problem=True, stage=stage)


def _smtp_error(result: SendResult) -> str:
    return result.error or f"{result.smtp_code} {result.smtp_reply}"


def _clip(text: str | None, limit: int = 1000) -> str | None:
    # Replies are server input: bounded, and without what PostgreSQL text cannot hold
    # (NUL, and the lone surrogates that undecodable bytes become).
    if text is None:
        return None
    text = text[:limit].replace("\x00", "\ufffd")
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
