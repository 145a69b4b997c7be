"""The sending policy, proven on real dispatcher processes against a real SMTP server.

The server (aiosmtpd) notes when each mail arrives and how many mails of each domain it
holds at once (from RCPT to the reply to the data). Limits are set with the operators'
own commands. Bounds are checked against the time the limit's bucket was last full
(before any dispatcher started), so a slow machine can only make them easier to meet.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from email.headerregistry import Address

import asyncpg
import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from outbox.dispatcher.outbox import Mail, enqueue
from tests.dispatching import ROOT, SENDER, spawn_dispatcher, wait_until
from tests.smtp_server import FaultyHandler, SmtpServer


@dataclass
class DomainHandler(FaultyHandler):
    """Holds ``slow`` domains' data replies ``delay`` seconds, counts mail in flight per
    domain, answers 421 to a ``provider_limit`` domain beyond its rate, and 550 to
    ``unknown`` mailboxes."""

    delay: dict[str, float] = field(default_factory=dict)
    provider_limit: dict[str, int] = field(default_factory=dict)
    unknown: set[str] = field(default_factory=set)
    inflight: Counter[str] = field(default_factory=Counter)
    inflight_max: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)
    recent: dict[str, deque[float]] = field(default_factory=dict)

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        domain = address.rpartition("@")[2].lower()
        with self.lock:
            self.rcpt_seen[address.lower()] += 1
            if address.lower() in self.unknown:
                return "550 5.1.1 no such user"
            limit = self.provider_limit.get(domain)
            if limit is not None:
                now = time.monotonic()
                recent = self.recent.setdefault(domain, deque())
                while recent and recent[0] <= now - 1.0:
                    recent.popleft()
                if len(recent) >= limit:
                    self.refused[domain] += 1
                    return "421 4.7.0 too many messages, slow down"
                recent.append(now)
            self.inflight[domain] += 1
            self.inflight_max[domain] = max(self.inflight_max[domain], self.inflight[domain])
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        domain = envelope.rcpt_tos[0].rpartition("@")[2].lower()
        try:
            if self.delay.get(domain):
                await asyncio.sleep(self.delay[domain])
            return await super().handle_DATA(server, session, envelope)
        finally:
            with self.lock:
                self.inflight[domain] -= 1

    def arrivals(self, domain: str | None = None) -> list[float]:
        """When each accepted mail (of ``domain``) arrived, in order (time.monotonic)."""
        with self.lock:
            return sorted(
                r.at
                for r in self.received
                if domain is None or r.recipient.rpartition("@")[2].lower() == domain
            )


@pytest.fixture
def domains() -> Iterator[SmtpServer]:
    server = SmtpServer(DomainHandler()).start()
    yield server
    server.stop()


def handler(server: SmtpServer) -> DomainHandler:
    assert isinstance(server.handler, DomainHandler)
    return server.handler


def outbox(database_url: str, *args: str) -> str:
    """Run ``outbox ARGS`` as an operator would; its output (it must succeed)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMTP_", "OUTBOX_"))}
    env["DATABASE_URL"] = database_url
    done = subprocess.run(
        [sys.executable, "-m", "outbox.cli.main", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


async def enqueue_to(
    pool: asyncpg.Pool, recipients: list[str], priority: int = 5
) -> dict[str, str]:
    """One mail per address; Message-ID -> recipient."""
    queued = {}
    async with pool.acquire() as conn, conn.transaction():
        for i, recipient in enumerate(recipients):
            local, _, domain = recipient.partition("@")
            mail = Mail(Address(f"User {i}", local, domain), f"Hello {i}", f"Hello {i}\n")
            done = await enqueue(conn, mail, sender=SENDER, priority=priority)
            queued[done.message_id] = recipient
    return queued


def within_rate(times: list[float], start: float, rate: float, burst: float) -> float:
    """The most by which the arrivals exceed ``burst + rate * (t - start)`` (<= 0: never)."""
    return max(n + 1 - burst - rate * (t - start) for n, t in enumerate(times))


async def sent(pool: asyncpg.Pool, domain: str | None = None) -> int:
    return int(
        await pool.fetchval(
            "SELECT count(*) FROM outbox WHERE status = 'sent' "
            "AND ($1::text IS NULL OR recipient_domain = $1)",
            domain,
        )
    )


def sent_at_least(
    pool: asyncpg.Pool, count: int, domain: str | None = None
) -> Callable[[], Awaitable[bool]]:
    """A check for :func:`wait_until`: at least ``count`` mails (to ``domain``) sent."""

    async def check() -> bool:
        return await sent(pool, domain) >= count

    return check


async def others_sent(pool: asyncpg.Pool, count: int) -> bool:
    return await sent(pool) - await sent(pool, "slow.example") >= count


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        proc.wait(30)


async def test_a_global_rate_holds_across_three_dispatchers(
    db: asyncpg.Pool, database_url: str, domains: SmtpServer
) -> None:
    outbox(database_url, "limit", "set", "--rate", "20/s")
    await enqueue_to(db, [f"user{i}@d{i % 7}.example" for i in range(100)])
    await asyncio.sleep(1.0)  # the bucket is full (20) from here on, and not fuller
    start = time.monotonic()
    procs = [
        spawn_dispatcher(database_url, domains, f"g{i}", "--concurrency", "8") for i in range(3)
    ]
    try:
        await wait_until(sent_at_least(db, 100), timeout=60, what="100 mails sent under 20/s")
    finally:
        stop_all(procs)
    times = handler(domains).arrivals()
    assert len(times) == 100
    # One token per mail of 20 per second, 20 at most at once: never more than that,
    # counted from before the dispatchers started (when the bucket was already full) ...
    assert within_rate(times, start, 20, 20) <= 1e-6
    # ... and from the first arrival, allowing for the first mail's own way there (a
    # fleet that ignored the limit would be ahead by about 80).
    assert within_rate(times, times[0], 20, 20) <= 10


async def test_a_slow_domain_never_holds_up_the_others(
    db: asyncpg.Pool, database_url: str, domains: SmtpServer
) -> None:
    handler(domains).delay["slow.example"] = 0.3
    outbox(
        database_url, "limit", "set", "--domain", "SLOW.example", "--rate", "5/s",
        "--concurrency", "2",
    )  # fmt: skip
    # The slow domain's mail first: ahead of all the rest in claim order.
    await enqueue_to(db, [f"s{i}@slow.example" for i in range(60)])
    await enqueue_to(db, [f"f{i}@fast{i % 5}.example" for i in range(120)])
    await asyncio.sleep(1.0)
    start = time.monotonic()
    procs = [
        spawn_dispatcher(database_url, domains, f"d{i}", "--concurrency", "8") for i in range(2)
    ]
    try:
        await wait_until(
            lambda: others_sent(db, 120), timeout=60, what="the other domains' 120 mails"
        )
        slow_done = await sent(db, "slow.example")
    finally:
        stop_all(procs)
    # The other domains were not made to wait for slow.example's 60 mails.
    assert slow_done < 60
    slow = handler(domains).arrivals("slow.example")
    assert within_rate(slow, start, 5, 5) <= 1e-6
    assert within_rate(slow, slow[0], 5, 5) <= 3
    assert handler(domains).inflight_max["slow.example"] <= 2
    assert handler(domains).inflight_max["slow.example"] == 2  # and it is used


async def test_a_throttling_provider_slows_only_its_own_domain(
    db: asyncpg.Pool, database_url: str, domains: SmtpServer
) -> None:
    handler(domains).provider_limit["busy.example"] = 3
    await enqueue_to(db, [f"b{i}@busy.example" for i in range(40)])
    await enqueue_to(db, [f"o{i}@other.example" for i in range(40)])
    proc = spawn_dispatcher(database_url, domains, "adaptive", "--concurrency", "8")
    try:
        await wait_until(sent_at_least(db, 80), timeout=90, what="all 80 mails sent")
        shown = outbox(database_url, "limit", "list")
    finally:
        stop_all([proc])
    assert handler(domains).refused["busy.example"] > 0
    throttled = await db.fetchrow(
        "SELECT throttle_rate, throttle_base FROM outbox_policies WHERE domain = 'busy.example'"
    )
    assert throttled is not None and throttled["throttle_rate"] is not None
    assert "busy.example" in shown
    # The other domain was never slowed: one attempt each, no throttle of its own.
    assert (
        await db.fetchval(
            "SELECT max(attempts) FROM outbox WHERE recipient_domain = 'other.example'"
        )
        == 1
    )
    assert not await db.fetchval(
        "SELECT count(*) FROM outbox_policies WHERE domain IN ('other.example', '')"
    )


async def test_pause_and_resume_one_domain_and_all_mail(
    db: asyncpg.Pool, database_url: str, domains: SmtpServer
) -> None:
    outbox(database_url, "pause", "--domain", "held.example")
    proc = spawn_dispatcher(database_url, domains, "pauser")
    try:
        await enqueue_to(db, [f"h{i}@held.example" for i in range(5)])
        await enqueue_to(db, [f"o{i}@open.example" for i in range(5)])
        await wait_until(sent_at_least(db, 5, "open.example"), what="open mail sent")
        assert "held.example" in outbox(database_url, "status")
        # Paused mail is not claimed at all: no attempt is used while it waits.
        assert (
            await db.fetchval(
                "SELECT max(attempts) FROM outbox WHERE recipient_domain = 'held.example'"
            )
            == 0
        )

        outbox(database_url, "pause")
        outbox(database_url, "resume", "--domain", "held.example")
        await enqueue_to(db, [f"late{i}@open.example" for i in range(3)])
        await asyncio.sleep(1.0)  # five poll intervals: nothing may move meanwhile
        assert await sent(db) == 5
        assert await db.fetchval("SELECT max(attempts) FROM outbox WHERE status = 'pending'") == 0

        outbox(database_url, "resume")
        await wait_until(sent_at_least(db, 13), what="everything sent after resume")
    finally:
        stop_all([proc])


async def test_a_refused_recipient_is_suppressed_until_lifted(
    db: asyncpg.Pool, database_url: str, domains: SmtpServer
) -> None:
    handler(domains).unknown.add("gone@example.net")
    proc = spawn_dispatcher(database_url, domains, "suppressor")
    try:
        await enqueue_to(db, ["gone@example.net"])
        await wait_until(
            lambda: db.fetchval("SELECT count(*) FROM outbox_suppressions"),
            what="the 550 at RCPT to suppress the address",
        )
        # Later mail to the same mailbox, in another spelling, is never sent.
        await enqueue_to(db, ["GONE@example.net"])
        await wait_until(
            lambda: db.fetchval("SELECT count(*) FROM outbox WHERE status = 'suppressed'"),
            what="the second mail to be suppressed",
        )
        assert handler(domains).rcpt_seen["gone@example.net"] == 1
        outcomes = await db.fetch(
            "SELECT a.outcome FROM outbox_attempts a JOIN outbox o ON o.id = a.outbox_id "
            "WHERE o.status = 'suppressed'"
        )
        assert [r["outcome"] for r in outcomes] == ["suppressed"]

        handler(domains).unknown.clear()
        outbox(database_url, "unsuppress", "Gone@Example.NET")
        await enqueue_to(db, ["gone@example.net"])
        await wait_until(sent_at_least(db, 1), what="mail after unsuppress sent")
    finally:
        stop_all([proc])


async def test_priority_zero_overtakes_a_backlog(
    db: asyncpg.Pool, database_url: str, domains: SmtpServer
) -> None:
    handler(domains).delay["bulk.example"] = 0.02
    proc = spawn_dispatcher(database_url, domains, "prio", "--concurrency", "2")
    try:
        await enqueue_to(db, [f"b{i}@bulk.example" for i in range(300)])
        await wait_until(sent_at_least(db, 10), what="the bulk drain to begin")
        urgent = await enqueue_to(db, ["reset@urgent.example"], priority=0)
        await wait_until(sent_at_least(db, 1, "urgent.example"), what="urgent mail sent")
        bulk_sent = await sent(db, "bulk.example")
    finally:
        stop_all([proc])
    # Claimed at the next claim: only what was already claimed went before it.
    assert bulk_sent < 100, bulk_sent
    assert list(urgent.values()) == ["reset@urgent.example"]


async def test_kill_9_during_a_throttled_drain_loses_nothing_and_keeps_the_limit(
    db: asyncpg.Pool, database_url: str, domains: SmtpServer
) -> None:
    outbox(database_url, "limit", "set", "--rate", "15/s")
    queued = await enqueue_to(db, [f"k{i}@k{i % 3}.example" for i in range(90)])
    await asyncio.sleep(1.0)
    start = time.monotonic()
    procs = [spawn_dispatcher(database_url, domains, f"k{i}") for i in range(2)]
    try:
        await wait_until(sent_at_least(db, 30), timeout=30, what="a third sent")
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(10)
        procs.append(spawn_dispatcher(database_url, domains, "k-new"))
        await wait_until(sent_at_least(db, 90), timeout=60, what="all 90 sent")
    finally:
        stop_all(procs)
    received = {r.message_id for r in handler(domains).received}
    assert received == set(queued)  # nothing lost
    # A killed dispatcher's claims are taken again, with new tokens: at most one burst
    # more than the limit, and in practice none.
    assert within_rate(handler(domains).arrivals(), start, 15, 15) <= 15
