"""What the actors of one dispatcher share, in one explicit object, and their logger.

The actors (claimer, senders, recorder, liveness, listener) run as tasks of one event
loop, so plain attributes need no lock: each is changed between awaits only.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from outbox.dispatcher.backoff import full_jitter
from outbox.dispatcher.store import ClaimedMail, Outcome, Release

__all__ = ["BoundLog", "Claim", "ClaimQueue", "Shared", "mail_fields"]

#: Mail enqueued at a priority below this (more urgent than the default) is claimed at
#: once when its NOTIFY arrives, with whatever room the senders have.
URGENT_BELOW = 5


class BoundLog(logging.LoggerAdapter[logging.Logger]):
    """The ``dispatcher`` logger with this dispatcher's name on every record.

    Unlike the stock adapter it keeps the call's own ``extra`` fields too.
    """

    def __init__(self, name: str) -> None:
        super().__init__(logging.getLogger("dispatcher"), {"dispatcher": name})

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        kwargs["extra"] = {**(self.extra or {}), **kwargs.get("extra", {})}
        return msg, kwargs


def mail_fields(mail: ClaimedMail) -> dict[str, Any]:
    """The fields every log line about one attempt of a mail carries."""
    return {"outbox_id": mail.id, "message_id": mail.message_id, "attempt": mail.attempts}


@dataclass(frozen=True, slots=True)
class Claim:
    """A row this dispatcher holds a lease on, on its way to a sender."""

    mail: ClaimedMail
    #: time.monotonic() after which the lease must be presumed gone.
    deadline: float

    @property
    def id(self) -> int:
        return self.mail.id

    @property
    def attempt(self) -> int:
        return self.mail.attempts

    @property
    def fields(self) -> dict[str, Any]:
        return mail_fields(self.mail)


class ClaimQueue(asyncio.Queue["Claim | None"]):
    """The claims waiting for a sender, most urgent first (then in the order claimed).

    A claim batch is in priority order already; this keeps a priority-0 mail claimed
    while others wait ahead of them, not behind. None (a sender's cue to stop) comes last.
    """

    # asyncio.Queue's own extension points, as asyncio.PriorityQueue uses them.
    def _init(self, maxsize: int) -> None:
        self._queue: list[tuple[int, int, Claim | None]] = []  # a heap
        self._order = itertools.count()

    def _put(self, item: Claim | None) -> None:
        rank = 10 if item is None else item.mail.priority
        heapq.heappush(self._queue, (rank, next(self._order), item))

    def _get(self) -> Claim | None:
        return heapq.heappop(self._queue)[2]


def _db_backoff(attempt: int) -> float:
    return full_jitter(attempt, 0.2, 5.0) + 0.1


class Shared:
    """The state several actors read or change, and the events they signal each other by."""

    def __init__(self, db_backoff: Callable[[int], float] = _db_backoff) -> None:
        #: Set once: stop claiming, finish in-flight sends, hand back the rest.
        self.stop = asyncio.Event()
        #: Mail may have been enqueued (NOTIFY, or the listener was away): claim now.
        self.wake = asyncio.Event()
        #: Mail more urgent than the default was enqueued: claim it without waiting for
        #: a batch's worth of room.
        self.urgent = False
        #: A sender finished a claim: the claimer may have room again.
        self.room = asyncio.Event()
        #: The SMTP server's reachability changed: heartbeat now, for `outbox status`.
        self.beat_now = asyncio.Event()
        #: Claimed rows waiting for a sender; None tells a sender to stop.
        self.queue: asyncio.Queue[Claim | None] = ClaimQueue()
        #: Finished attempts and releases waiting for the recorder; None ends it.
        self.records: asyncio.Queue[Outcome | Release | None] = asyncio.Queue()
        #: Claimed and not yet finished (queued or sending).
        self.outstanding = 0
        #: Claims finished by the senders so far (sent, failed or handed back).
        self.finished = 0
        #: Ids of rows we hold a lease on, until their outcome or release is written.
        self.held: set[int] = set()
        #: time.monotonic() before which no send starts: the SMTP server is unreachable.
        self.smtp_pause_until = 0.0
        #: Why the SMTP server cannot be reached right now (None: it can).
        self.smtp_error: str | None = None
        #: Seconds to wait before the n-th retry of a failed database call.
        self.db_backoff = db_backoff

    def notified(self, payload: str) -> None:
        """A NOTIFY of enqueued mail arrived; its payload is the mail's priority."""
        if payload.isdigit() and int(payload) < URGENT_BELOW:
            self.urgent = True
            self.room.set()  # the claimer may be waiting for room: look now
        self.wake.set()

    async def sleep(self, seconds: float) -> None:
        """Sleep, but wake early when a stop is requested."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), seconds)

    async def wait_any(self, event: asyncio.Event, seconds: float) -> None:
        """Wait for ``event``, a stop request, or ``seconds``, whichever comes first."""
        waiters = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(self.stop.wait())]
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def db_trouble(
        self,
        log: logging.LoggerAdapter[logging.Logger],
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
        delay = self.db_backoff(attempt)
        log.warning(
            event + ".failed", extra={"error": repr(exc), "retry_in": round(delay, 2), **fields}
        )
        await (self.sleep(delay) if interruptible else asyncio.sleep(delay))
