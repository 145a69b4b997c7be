"""The dispatcher daemon: claim due mail, send it, record each outcome.

One actor per job, each a task of one event loop, wired here:

* claimer   - claims batches whenever senders have room, woken by NOTIFY or, failing
              that, by the poll interval (``dispatcher.claimer``);
* senders   - ``concurrency`` workers, each with its own reused SMTP connection
              (``dispatcher.sender``; what a result means: ``dispatcher.retry``);
* recorder  - writes outcomes as soon as they arrive, batching whatever queued up while
              the previous write was in flight (``dispatcher.recorder``);
* liveness  - registers the name and heartbeats, so our leases are honoured
              (``dispatcher.liveness``);
* listener  - a dedicated LISTEN connection, probed and rebuilt when it dies
              (``dispatcher.listener``).

They share one :class:`~dispatcher.shared.Shared` and reach the database only through
one :class:`~dispatcher.store.Store`. No transaction is ever open across SMTP I/O: a
claim commits before any mail is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from dataclasses import dataclass, replace
from typing import Any

from opentelemetry.trace import TracerProvider

from outbox.dispatcher import tracing
from outbox.dispatcher.claimer import Claimer
from outbox.dispatcher.db import CONNECTION_ERRORS
from outbox.dispatcher.listener import Listener
from outbox.dispatcher.liveness import Liveness
from outbox.dispatcher.recorder import Recorder
from outbox.dispatcher.sender import Sender
from outbox.dispatcher.settings import Settings
from outbox.dispatcher.shared import BoundLog, Claim, Shared
from outbox.dispatcher.smtp import SmtpConfig
from outbox.dispatcher.store import Outcome, PgStore, Release, Store

__all__ = [
    "Claim",
    "Dispatcher",
    "DispatcherConfig",
    "NameInUse",
    "Outcome",
    "Release",
    "default_name",
]

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


class Dispatcher:
    """One dispatcher process's worth of work; :meth:`run` until :meth:`request_stop`."""

    def __init__(
        self,
        config: DispatcherConfig,
        database_url: str,
        smtp: SmtpConfig,
        tracer_provider: TracerProvider | None = None,
        *,
        store: Store | None = None,
    ) -> None:
        """``store``: use this one (closed when :meth:`run` ends) instead of connecting
        to ``database_url``."""
        self.config = config
        self._database_url = database_url
        self._smtp = smtp
        self._store = store
        #: The global provider's unless one is given: no-op until an SDK is configured.
        self._tracer = tracing.tracer("outbox.dispatcher", tracer_provider)
        self._log = BoundLog(config.name)
        self._shared = Shared()
        self._liveness: Liveness | None = None
        self.started = asyncio.Event()
        #: Set when a task died of an unexpected error (the process should exit non-zero).
        self.crashed = False

    def request_stop(self) -> None:
        """Stop gracefully: no new claims, finish in-flight sends, hand back the rest."""
        self._shared.stop.set()

    def fenced(self) -> bool:
        """True when our heartbeat may look stale to others: start no send then."""
        return self._liveness is None or self._liveness.fenced()

    async def run(self) -> None:
        """Run until a stop is requested, then shut down gracefully."""
        cfg, shared, log = self.config, self._shared, self._log
        store = self._store if self._store is not None else await self._connect()
        if store is None:
            return
        try:
            liveness = self._liveness = Liveness(cfg, store, shared, log)
            registration = await liveness.register()
            if registration == "taken":
                raise NameInUse(cfg.name)
            if registration == "stopped":
                return
            log.info(
                "dispatcher.started",
                extra={
                    "concurrency": cfg.concurrency,
                    "batch_size": cfg.batch_size,
                    "smtp": repr(self._smtp),
                },
            )
            sender = Sender(cfg, self._smtp, shared, liveness, log, self._tracer)
            background = [
                asyncio.create_task(liveness.run(), name="heartbeat"),
                asyncio.create_task(Listener(cfg.name, store, shared, log).run(), name="listener"),
            ]
            recorder = asyncio.create_task(
                Recorder(cfg, store, shared, log, self._tracer).run(), name="recorder"
            )
            workers = [
                asyncio.create_task(sender.work(i), name=f"worker-{i}")
                for i in range(cfg.concurrency)
            ]
            claimer = asyncio.create_task(
                Claimer(cfg, store, shared, liveness, log, self._tracer).run(), name="claimer"
            )
            for task in (*background, recorder, *workers, claimer):
                task.add_done_callback(self._on_task_done)
            self.started.set()
            await shared.stop.wait()
            log.info("dispatcher.stopping")
            await self._shutdown(store, claimer, workers, recorder, background)
        finally:
            await store.close()
        log.info("dispatcher.stopped")

    async def _connect(self) -> Store | None:
        """Open the store, waiting for the database as long as no stop is requested."""
        attempt = 0
        while not self._shared.stop.is_set():
            try:
                return await PgStore.open(self._database_url, self.config.name)
            except CONNECTION_ERRORS as exc:
                attempt += 1
                await self._shared.db_trouble(self._log, "database.connect", exc, attempt)
        return None

    async def _shutdown(
        self,
        store: Store,
        claimer: asyncio.Task[None],
        workers: list[asyncio.Task[None]],
        recorder: asyncio.Task[None],
        background: list[asyncio.Task[None]],
    ) -> None:
        shared, log = self._shared, self._log
        # The claimer notices the stop between claims; it is not cancelled mid-claim, so a
        # committed claim is never lost on the way back to us. (A task that crashed was
        # already reported by _on_task_done: shut down the rest all the same.)
        await asyncio.gather(claimer, return_exceptions=True)
        unstarted = 0
        while not shared.queue.empty():
            claim = shared.queue.get_nowait()
            if claim is not None:
                shared.records.put_nowait(Release(claim.mail, "shutdown"))
                unstarted += 1
        for _ in workers:
            shared.queue.put_nowait(None)
        _, late = await asyncio.wait(workers, timeout=self.config.grace)
        for task in late:  # their rows stay leased; deregistering frees them at once
            task.cancel()
        if late:
            log.warning("dispatcher.grace_exceeded", extra={"abandoned_sends": len(late)})
        shared.records.put_nowait(None)
        _, unflushed = await asyncio.wait([recorder], timeout=FLUSH_TIMEOUT_SECONDS)
        if unflushed:
            recorder.cancel()
            log.error("dispatcher.unrecorded_outcomes", extra={"count": shared.records.qsize()})
        for task in background:
            task.cancel()
        await asyncio.gather(*late, *background, recorder, return_exceptions=True)
        # If this fails our heartbeat goes stale instead, and others take over after that.
        with contextlib.suppress(*CONNECTION_ERRORS):
            await store.deregister(self.config.name, time_limit=5)
        log.info("dispatcher.drained", extra={"handed_back": unstarted})

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        # A bug, not an outage (those are handled in the actors): stop rather than limp on.
        self.crashed = True
        self._log.error(
            "dispatcher.task_crashed", exc_info=task.exception(), extra={"task": task.get_name()}
        )
        self.request_stop()
