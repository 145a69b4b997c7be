"""The dispatcher's database: every call its actors make, one typed method each.

:class:`PgStore` runs the statements of :mod:`dispatcher.queries` over an asyncpg pool
(and one dedicated LISTEN connection); :class:`Store` is what the actors depend on, so
that an in-memory store can stand in for it in tests. The store only talks to the
database: what to do when the database is away (retry, back off, give up) is decided by
the actor that called it.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import asyncpg
from opentelemetry.trace import SpanContext

from outbox.dispatcher import limits, policy, queries
from outbox.dispatcher.db import Connection, asyncpg_dsn, create_pool
from outbox.dispatcher.smtp import SendResult

__all__ = [
    "ClaimedMail",
    "Outcome",
    "PgStore",
    "Release",
    "Store",
    "Subscription",
]


@dataclass(frozen=True, slots=True)
class ClaimedMail:
    """A row the claim statement leased to us."""

    id: int
    message_id: str
    sender: str
    recipient: str
    recipient_name: str | None
    subject: str
    body_text: str
    body_html: str | None
    created_at: datetime
    #: This attempt's number (the claim counted it).
    attempts: int
    lease_token: uuid.UUID
    lease_expires_at: datetime
    #: The W3C traceparent the mail was queued under (``dispatcher.tracing``).
    trace_context: str | None
    priority: int = 5
    recipient_domain: str = ""
    #: The recipient is on the suppression list: the mail must not be sent.
    suppressed: bool = False

    @classmethod
    def from_record(cls, record: asyncpg.Record) -> ClaimedMail:
        """The row as the claim returned it; columns it does not return yet get defaults."""
        return cls(
            id=record["id"],
            message_id=record["message_id"],
            sender=record["sender"],
            recipient=record["recipient"],
            recipient_name=record["recipient_name"],
            subject=record["subject"],
            body_text=record["body_text"],
            body_html=record["body_html"],
            created_at=record["created_at"],
            attempts=record["attempts"],
            lease_token=record["lease_token"],
            lease_expires_at=record["lease_expires_at"],
            trace_context=record["trace_context"],
            priority=record.get("priority", 5),
            recipient_domain=record.get("recipient_domain", ""),
            suppressed=bool(record.get("suppressed", False)),
        )

    def __getitem__(self, column: str) -> Any:
        """Read a column by name, as :func:`~dispatcher.message.build_message` reads a row."""
        return getattr(self, column)


@dataclass(frozen=True, slots=True)
class Outcome:
    """A finished attempt, waiting to be recorded.

    It keeps the whole :class:`SendResult` (code, stage) and the mail (its
    ``recipient_domain``): what a store needs to derive per-domain throttling from.
    """

    mail: ClaimedMail
    outcome: str  # sent | deferred | unknown | failed | suppressed
    result: SendResult
    started_at: datetime
    finished_at: datetime
    retry_in: float = 0.0
    error: str | None = None
    #: The attempt's ``outbox.send`` span when it is recorded (``outbox.record`` goes under it).
    span: SpanContext | None = None

    @property
    def stage(self) -> str | None:
        """The SMTP step to record: none for a mail that never went to SMTP (suppressed)."""
        return None if self.outcome == "suppressed" else self.result.stage


@dataclass(frozen=True, slots=True)
class Recorded:
    """What writing a batch of outcomes found."""

    #: Ids whose lease another dispatcher had taken: their rows were left as they were.
    lease_lost: set[int]
    #: Scopes ('' = all mail, else a domain) slowed down by replies in the batch, with
    #: their new rate in mails per second.
    throttled: dict[str, float]


@dataclass(frozen=True, slots=True)
class Release:
    """A claimed row handed back unsent."""

    mail: ClaimedMail
    reason: str


class Subscription(Protocol):
    """A live LISTEN on the enqueue channel."""

    async def probe(self, time_limit: float) -> None:
        """Round-trip on the connection (within ``time_limit`` seconds); raises a connection
        error if it is dead."""

    def close(self) -> None:
        """Drop the connection (no more notifications)."""


class Store(Protocol):
    """Every database operation of a running dispatcher.

    ``time_limit``: the seconds one statement may take before it fails as a timeout.
    """

    async def register(self, name: str, *, stale_after: float, max_abandons: int) -> int | None:
        """Take the name (from a holder silent for ``stale_after`` or whose process is
        gone) and reclaim rows a previous run of it left leased: how many, or None when a
        live dispatcher holds the name."""

    async def heartbeat(
        self, name: str, smtp_error: str | None, *, stale_after: float, time_limit: float
    ) -> bool:
        """Prove we are alive (with our SMTP health); False if our row was gone and has
        been registered afresh."""

    async def deregister(self, name: str, *, time_limit: float) -> None:
        """Remove our row: our leases stop being honoured at once."""

    async def claim(
        self, name: str, limit: int, *, lease: float, stale_after: float, max_abandons: int
    ) -> list[ClaimedMail]:
        """Lease up to ``limit`` due rows to ``name`` for ``lease`` seconds."""

    async def release_unknown(self, name: str, held: Collection[int]) -> int:
        """Hand back rows leased to ``name`` other than ``held``: how many."""

    async def next_due_in(self) -> float | None:
        """Seconds until the earliest pending mail is due (negative: due), None if none."""

    async def record(self, dispatcher: str, batch: Sequence[Outcome | Release]) -> Recorded:
        """Write outcomes and releases in one transaction (and throttle what said so)."""

    async def listen(
        self, name: str, on_notify: Callable[[str], None], on_lost: Callable[[], None]
    ) -> Subscription:
        """LISTEN for enqueued mail on a connection of its own."""

    async def close(self) -> None:
        """Close every connection."""


class PgStore:
    """:class:`Store` over an asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool, database_url: str) -> None:
        self._pool = pool
        self._database_url = database_url
        #: The last claim found a sending policy: the next one goes the policed way at
        #: once instead of trying the plain claim first.
        self._policed = False
        #: Recent attempts and their "slow down" replies (limits.record_throttles).
        self._slow_downs = policy.SlowDowns()

    @classmethod
    async def open(cls, database_url: str, name: str) -> PgStore:
        """Open the pool of dispatcher ``name`` (raises a connection error if unreachable)."""
        pool = await create_pool(
            database_url,
            min_size=1,
            max_size=4,
            application_name=f"outbox-dispatcher:{name}",
        )
        return cls(pool, database_url)

    async def close(self) -> None:
        await self._pool.close()

    # --- liveness ----------------------------------------------------------------------

    async def register(self, name: str, *, stale_after: float, max_abandons: int) -> int | None:
        async with self._pool.acquire() as conn, conn.transaction():
            force = await _holder_is_gone(conn, name)
            taken = await conn.fetchval(
                queries.REGISTER, name, socket.gethostname(), os.getpid(), force, stale_after
            )
            if taken is None:
                return None
            orphans = await conn.fetch(queries.RECLAIM_PREDECESSOR, name, max_abandons)
            await conn.execute(queries.FORGET_GONE_DISPATCHERS)
        return len(orphans)

    async def heartbeat(
        self, name: str, smtp_error: str | None, *, stale_after: float, time_limit: float
    ) -> bool:
        # The SMTP server's words (a refusal at the greeting, say) are server input.
        alive = await self._pool.fetchval(
            queries.HEARTBEAT, name, _clip(smtp_error), timeout=time_limit
        )
        if alive is not None:
            return True
        # Our row was removed (e.g. by an operator): register again, by force.
        await self._pool.fetchval(
            queries.REGISTER, name, socket.gethostname(), os.getpid(), True, stale_after
        )
        return False

    async def deregister(self, name: str, *, time_limit: float) -> None:
        await self._pool.execute(queries.DEREGISTER, name, timeout=time_limit)

    # --- claiming ----------------------------------------------------------------------

    async def claim(
        self, name: str, limit: int, *, lease: float, stale_after: float, max_abandons: int
    ) -> list[ClaimedMail]:
        async with self._pool.acquire() as conn:
            claimed = await limits.claim(
                conn,
                limit=limit,
                name=name,
                lease=lease,
                stale_after=stale_after,
                max_abandons=max_abandons,
                policed=self._policed,
            )
        self._policed = claimed.policed
        return [ClaimedMail.from_record(row) for row in claimed.rows]

    async def release_unknown(self, name: str, held: Collection[int]) -> int:
        rows = await self._pool.fetch(queries.RELEASE_UNKNOWN, name, list(held))
        return len(rows)

    async def next_due_in(self) -> float | None:
        due_in = await self._pool.fetchval(queries.NEXT_DUE_IN)
        return None if due_in is None else float(due_in)

    # --- recording ---------------------------------------------------------------------

    async def record(self, dispatcher: str, batch: Sequence[Outcome | Release]) -> Recorded:
        outcomes = [item for item in batch if isinstance(item, Outcome)]
        releases = [item for item in batch if isinstance(item, Release)]
        async with self._pool.acquire() as conn:
            if releases:
                async with conn.transaction():
                    await conn.execute(queries.LOCK_FOR_RECORD, [item.mail.id for item in batch])
                    recorded = (
                        await conn.fetch(queries.RECORD, *_record_args(dispatcher, outcomes))
                        if outcomes
                        else []
                    )
                    await conn.execute(
                        queries.RELEASE,
                        [r.mail.id for r in releases],
                        [r.mail.lease_token for r in releases],
                    )
            else:  # the common case: one statement, atomic by itself, one round trip
                recorded = await conn.fetch(queries.RECORD, *_record_args(dispatcher, outcomes))
            # "Slow down" replies throttle their domain (or the relay) for the whole fleet
            # (no statement at all without one).
            throttled = await limits.record_throttles(
                conn,
                (
                    limits.Reply(o.outcome, o.result.smtp_code, o.stage, o.mail.recipient_domain)
                    for o in outcomes
                ),
                self._slow_downs,
            )
        return Recorded(
            lease_lost={row["outbox_id"] for row in recorded if row["lease_lost"]},
            throttled=throttled,
        )

    # --- notifications -----------------------------------------------------------------

    async def listen(
        self, name: str, on_notify: Callable[[str], None], on_lost: Callable[[], None]
    ) -> Subscription:
        conn = await asyncpg.connect(
            asyncpg_dsn(self._database_url),
            timeout=5,
            server_settings={"application_name": f"outbox-listener:{name}"[:63]},
        )
        try:
            await conn.add_listener(
                queries.NOTIFY_CHANNEL, lambda _conn, _pid, _channel, payload: on_notify(payload)
            )
            conn.add_termination_listener(lambda _: on_lost())
        except BaseException:
            conn.terminate()
            raise
        return _PgSubscription(conn)


class _PgSubscription:
    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def probe(self, time_limit: float) -> None:
        await self._conn.fetchval(queries.PROBE, timeout=time_limit)

    def close(self) -> None:
        if not self._conn.is_closed():
            self._conn.terminate()


async def _holder_is_gone(conn: Connection, name: str) -> bool:
    """True if the name is held by a process on this host that no longer exists."""
    holder = await conn.fetchrow(queries.NAME_HOLDER, name)
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


def _record_args(dispatcher: str, outcomes: list[Outcome]) -> list[Any]:
    return [
        [o.mail.id for o in outcomes],
        [o.mail.lease_token for o in outcomes],
        [o.mail.attempts for o in outcomes],
        [o.outcome for o in outcomes],
        [o.result.smtp_code for o in outcomes],
        [_clip(o.result.smtp_reply) for o in outcomes],
        [_clip(o.error) for o in outcomes],
        [o.started_at for o in outcomes],
        [o.finished_at for o in outcomes],
        [o.retry_in for o in outcomes],
        dispatcher,
        [o.stage for o in outcomes],
    ]


def _clip(text: str | None, limit: int = 1000) -> str | None:
    # Replies are server input: bounded, and without what PostgreSQL text cannot hold
    # (NUL, and the lone surrogates that undecodable bytes become).
    if text is None:
        return None
    text = text[:limit].replace("\x00", "\ufffd")
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
