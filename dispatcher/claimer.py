"""The claimer: lease due mail in batches whenever the senders have room for it.

Claimed rows wait in a local queue for a sender. The queue is kept as deep as the senders'
pace needs (:class:`Prefetch`): a claim is a commit, which waits for the disk, and the
senders should have enough to work through meanwhile; but never deeper than that, so a
dispatcher behind a slow relay does not sit on mail that other dispatchers could send.
It claims nothing while the SMTP server is unreachable or our heartbeat is failing, and
sleeps when the queue is drained until NOTIFY, the next scheduled retry, the poll
interval or a stop, whichever comes first.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from opentelemetry.trace import Tracer

from outbox.dispatcher import metrics, tracing
from outbox.dispatcher.db import CONNECTION_ERRORS
from outbox.dispatcher.liveness import Liveness
from outbox.dispatcher.shared import Claim, Shared
from outbox.dispatcher.store import Store

if TYPE_CHECKING:
    from outbox.dispatcher.daemon import DispatcherConfig

__all__ = ["Claimer", "Prefetch"]


@dataclass
class Prefetch:
    """How many claimed rows may wait in the queue for a sender: measured, not configured.

    What the senders finish in twice a claim's duration, or in :attr:`WORTH` seconds if
    that is more (their pace and a claim's duration both smoothed), at least one per
    sender and at most two batches. Behind a slow relay that is one per sender; in a fast
    drain, enough that a sender never waits for a claim, and claims large enough to be
    worth their fixed cost.
    """

    concurrency: int
    batch_size: int
    #: Claims the senders finish per second, and seconds a claim takes (smoothed).
    pace: float = 0.0
    claim_seconds: float = 0.0

    #: Weight of the newest sample in the smoothed figures.
    SMOOTHING = 0.5
    #: Seconds of sending the queue may hold however fast claims are. A claim costs
    #: PostgreSQL about a millisecond besides its rows (planning, commit), as much as 30
    #: rows do: a queue as short as a fast claim lets claims of a few rows each
    #: (PostgreSQL's CPU per mail in a drain fell by a fifth with this floor). 50 ms of
    #: mail is still nothing to sit on.
    WORTH = 0.05

    def queued(self) -> int:
        """Most claimed rows to hold that no sender has taken yet."""
        wanted = math.ceil(self.pace * max(2 * self.claim_seconds, self.WORTH))
        return max(self.concurrency, min(2 * self.batch_size, wanted))

    def high_water(self) -> int:
        """Most rows to hold claimed and unfinished (queued or being sent)."""
        return self.concurrency + self.queued()

    def low_room(self) -> int:
        """Room worth a claim while rows still wait: half the queue, at most a batch."""
        return min(self.batch_size, math.ceil(self.queued() / 2))

    def claimed(self, seconds: float) -> None:
        """A claim took ``seconds``."""
        self.claim_seconds += self.SMOOTHING * (seconds - self.claim_seconds)

    def finished(self, count: int, seconds: float) -> None:
        """The senders finished ``count`` claims in the last ``seconds``."""
        if seconds > 0:
            self.pace += self.SMOOTHING * (count / seconds - self.pace)


class Claimer:
    """The claim loop, feeding ``shared.queue``."""

    def __init__(
        self,
        config: DispatcherConfig,
        store: Store,
        shared: Shared,
        liveness: Liveness,
        log: logging.LoggerAdapter[logging.Logger],
        tracer: Tracer,
    ) -> None:
        self._config = config
        self._store = store
        self._shared = shared
        self._liveness = liveness
        self._log = log
        self._tracer = tracer
        self.prefetch = Prefetch(config.concurrency, config.batch_size)

    async def run(self) -> None:
        """Claim until a stop is requested (checked between claims, never during one)."""
        cfg = self._config
        shared = self._shared
        prefetch = self.prefetch
        failures = 0
        unsure = False  # a claim failed: it may have committed without our learning of it
        finished, since = shared.finished, time.monotonic()
        while not shared.stop.is_set():
            if unsure:
                unsure = not await self._release_unknown()
            now = time.monotonic()
            if now - since >= 0.05:  # the senders' pace since the last look
                prefetch.finished(shared.finished - finished, now - since)
                finished, since = shared.finished, now
            room = prefetch.high_water() - shared.outstanding
            # Claim in batches: wait for room worth a claim unless senders are idle or
            # urgent mail came in.
            if room <= 0 or (
                room < prefetch.low_room() and not shared.queue.empty() and not shared.urgent
            ):
                shared.room.clear()
                await shared.wait_any(shared.room, cfg.poll_interval)
                continue
            pause = shared.smtp_pause_until - time.monotonic()
            if pause > 0:  # the SMTP server is unreachable: don't burn attempts on it
                await shared.sleep(pause)
                continue
            if self._liveness.fenced():  # our heartbeat is failing: we could not send it
                await shared.sleep(cfg.heartbeat_interval)
                continue
            shared.wake.clear()
            shared.urgent = False
            now = time.monotonic()  # before the claim: a lapse during it voids it too
            claim_started_ns = time.time_ns()
            try:
                mails = await self._store.claim(
                    cfg.name,
                    min(room, cfg.batch_size),
                    lease=cfg.lease,
                    stale_after=cfg.stale_after,
                    max_abandons=cfg.max_abandons,
                )
            except CONNECTION_ERRORS as exc:
                failures += 1
                unsure = True
                await shared.db_trouble(self._log, "claim", exc, failures)
                continue
            failures = 0
            claim_finished_ns = time.time_ns()
            prefetch.claimed((claim_finished_ns - claim_started_ns) / 1e9)
            for mail in mails:
                shared.outstanding += 1
                shared.held.add(mail.id)
                shared.queue.put_nowait(Claim(mail, now + cfg.lease))
                if mail.trace_context is not None:
                    tracing.claimed(
                        self._tracer,
                        mail.trace_context,
                        outbox_id=mail.id,
                        dispatcher=cfg.name,
                        batch=len(mails),
                        started_ns=claim_started_ns,
                        finished_ns=claim_finished_ns,
                    )
            if mails:
                metrics.CLAIM_BATCH.observe(len(mails))
                self._log.debug("claim", extra={"rows": len(mails)})
            if len(mails) < min(room, cfg.batch_size):
                # Drained: sleep until NOTIFY, the next scheduled retry, the poll interval
                # or a stop, whichever comes first (retries are not announced by NOTIFY).
                await shared.wait_any(shared.wake, await self._idle_seconds())

    async def _release_unknown(self) -> bool:
        """Hand back rows leased to us that we never heard of; False if the database is away.

        A claim whose connection died after the commit leaves rows leased to this live
        dispatcher that no sender will ever send; without this they would wait for their
        lease to expire.
        """
        try:
            released = await self._store.release_unknown(self._config.name, self._shared.held)
        except CONNECTION_ERRORS:
            return False
        if released:
            self._log.warning("claim.recovered", extra={"rows": released})
        return True

    async def _idle_seconds(self) -> float:
        """How long the claimer may sleep: until the next deferred mail is due, at most."""
        poll = self._config.poll_interval
        try:
            due_in = await self._store.next_due_in()
        except CONNECTION_ERRORS:
            return poll
        if due_in is None:
            return poll
        # Due already but not claimable (locked by someone else's claim): look again soon.
        return min(poll, max(0.1, due_in))
