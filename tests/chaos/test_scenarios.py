"""Prove no mail is lost: crashes and faults under load, with real processes.

Every scenario runs ``outbox api``, several ``outbox dispatcher`` processes, aiosmtpd
servers and its own database, offers registrations at a steady rate, breaks something on
purpose, and ends by comparing every user row, every 201 and every message the SMTP
servers accepted, by Message-ID (:meth:`Rig.reconcile`). The figures are printed at the
end of the run. Liveness settings are the product's defaults (heartbeat 2 s, poll 2 s).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import email
import itertools
import json
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email import policy
from email.header import decode_header, make_header
from typing import Any

import pytest

from outbox.dispatcher.addresses import email_key
from outbox.dispatcher.settings import parse_address
from tests.chaos import figures
from tests.chaos.conftest import RATE, SEED
from tests.chaos.load import Hostile, HostileLoad, Load, hostile_round
from tests.chaos.procs import Proc
from tests.chaos.rig import STALE_AFTER, Ledger, Rig
from tests.chaos.smtp import ChaosSmtp, Delivery
from tests.dispatching import wait_until

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(300)]

MakeRig = Callable[[str], Awaitable[Rig]]

#: Recovery target after a kill, with the default heartbeat (2 s; presumed dead after 6 s).
RECOVERY_TARGET = 10.0


@dataclass
class Kill:
    name: str
    at: float  # wall clock
    leased: set[int]  # outbox rows it held a lease on when it died
    pair: bool  # killed together with another one


def _message_ids(by_id: dict[int, str], ids: set[int]) -> set[str]:
    return {by_id[i] for i in ids if i in by_id}


async def _outbox_message_ids(rig: Rig) -> dict[int, str]:
    rows = await rig.db.fetch("SELECT id, message_id FROM outbox")
    return {r["id"]: r["message_id"] for r in rows}


async def _finish(rig: Rig, load: Load, drain: float = 90.0) -> tuple[Ledger, dict[str, int]]:
    """Stop the load, let the outbox drain, stop every process gracefully, reconcile.

    Returns the ledger and the processes that did not exit cleanly (name -> exit code).
    """
    await load.stop()
    await rig.drain(drain)
    alive = [p.name for p in rig.procs.running("dispatcher")]
    problems = await rig.stop_all()
    ledger = await rig.reconcile(load)
    assert alive, "no dispatcher was running at the end"
    return ledger, problems


def _assert_clean_exits(rig: Rig, problems: dict[str, int]) -> None:
    assert not problems, f"unclean exits: {problems}"
    assert not rig.procs.crashes(), "\n".join(rig.procs.crashes())


# --- 1. kill -9 -----------------------------------------------------------------------------


async def test_dispatchers_killed_with_sigkill_at_random_moments(
    make_rig: MakeRig, calm: float
) -> None:
    rng = random.Random(SEED + 1)
    rig = await make_rig("s1")
    # 0.25 s of processing keeps mail in flight; a kill in the 0.05 s between queueing
    # and the 250 reaching the dispatcher makes a duplicate.
    servers = [
        rig.smtp(delay=0.25, reply_delay=0.05, label="smtp-a"),
        rig.smtp(delay=0.25, reply_delay=0.05, label="smtp-b"),
    ]
    await rig.start_api()
    await rig.start_dispatchers(3)
    smtp_of: dict[str, ChaosSmtp] = {name: servers[i % 2] for i, name in enumerate(rig.dispatchers)}
    load = Load(rig.api_url, "s1", RATE).start()
    kills: list[Kill] = []
    for event in itertools.count():
        if len(kills) >= 20:
            break
        await asyncio.sleep(rng.uniform(0.3, 2.5))  # a random moment
        ready = await rig.registered()
        if not ready:
            continue
        pair = len(ready) >= 2 and (rng.random() < 0.25 or event % 4 == 3)
        victims = rng.sample(ready, 2 if pair else 1)
        at = {v.name: v.kill() for v in victims}
        for victim in victims:
            # A statement sent just before the kill may still commit: wait for its end.
            await rig.backends_gone(victim.name)
            kills.append(Kill(victim.name, at[victim.name], await rig.leased_by(victim.name), pair))
            server = smtp_of[victim.name]
            smtp_of[rig.spawn_dispatcher(server).name] = server  # restart, as a new name
    await asyncio.sleep(3)  # registrations keep coming after the last kill
    ledger, problems = await _finish(rig, load)

    ids = await _outbox_message_ids(rig)
    recovery = []
    for kill in kills:
        if not kill.leased:
            continue
        reclaimed = dict(ledger.abandoned_by.get(kill.name, []))
        assert kill.leased <= set(reclaimed), f"{kill.name}: rows never reclaimed"
        recovery.append(max(reclaimed.values()) - kill.at)
    in_flight = set().union(*(k.leased for k in kills))
    bound = sum(len(k.leased) for k in kills)
    figures.record(
        "1. dispatchers killed with -9 at random moments under load (restarted at once)",
        ledger,
        duplicates=f"(bound: {bound} rows in flight at the kills; every copy identical)",
        extra={
            "kills": f"{len(kills)} ({sum(k.pair for k in kills)} of them two at once), "
            f"{len(recovery)} left leased rows",
            "recovery after a kill p50/max": figures.p50_max(recovery),
        },
    )
    figures.assert_no_loss(ledger)
    assert len(kills) >= 20
    assert any(k.pair for k in kills)
    assert ledger.duplicate_ids <= _message_ids(ids, in_flight)
    assert ledger.duplicates <= bound
    assert len(recovery) >= 5, "too few kills caught a dispatcher holding mail"
    assert sorted(recovery)[(len(recovery) - 1) // 2] <= RECOVERY_TARGET
    assert max(recovery) <= RECOVERY_TARGET
    _assert_clean_exits(rig, problems)


# --- 2. rolling deploy ----------------------------------------------------------------------


async def test_rolling_deploy_with_sigterm_duplicates_nothing(
    make_rig: MakeRig, calm: float
) -> None:
    rig = await make_rig("s2")
    servers = [rig.smtp(delay=0.2, label="smtp-a"), rig.smtp(delay=0.2, label="smtp-b")]
    await rig.start_api()
    # Two workers each: claims queue up behind the sends, so a stop has rows to hand back.
    current = await rig.start_dispatchers(3, DISPATCHER_CONCURRENCY="2")
    load = Load(rig.api_url, "s2", RATE).start()
    exits, handed_back, stop_times = [], 0, []
    for _ in range(3):  # three full rollouts
        for slot, old in enumerate(list(current)):
            new = rig.spawn_dispatcher(servers[slot % 2], DISPATCHER_CONCURRENCY="2")
            await rig.wait_registered(new)  # surge: the new one is up before the old goes
            started = time.monotonic()
            exits.append(await rig.terminate(old))
            stop_times.append(time.monotonic() - started)
            for line in old.log().splitlines():
                if '"dispatcher.drained"' in line:
                    handed_back += json.loads(line)["handed_back"]
            current[slot] = new
            await asyncio.sleep(2.0)  # the deploy's pace
    ledger, problems = await _finish(rig, load)
    figures.record(
        "2. rolling deploy: dispatchers replaced with SIGTERM one at a time, 3 rollouts",
        ledger,
        duplicates="(must be 0)",
        extra={
            "replacements": f"{len(exits)} (exit codes {sorted(set(exits))}), "
            f"{handed_back} claimed rows handed back unsent",
            "SIGTERM -> exit p50/max": figures.p50_max(stop_times),
        },
    )
    figures.assert_no_loss(ledger)
    assert exits == [0] * 9
    assert ledger.duplicates == 0
    assert ledger.attempts["abandoned"] == 0, "a graceful stop left a lease behind"
    assert ledger.lease_lost == 0
    _assert_clean_exits(rig, problems)


# --- 3. the API killed ----------------------------------------------------------------------


async def test_api_killed_with_sigkill_under_load(make_rig: MakeRig, calm: float) -> None:
    rng = random.Random(SEED + 3)
    rig = await make_rig("s3")
    rig.smtp(delay=0.05)
    await rig.start_api()
    await rig.start_dispatchers(3)
    load = Load(rig.api_url, "s3", RATE).start()
    kills: list[float] = []
    for _ in range(4):
        await asyncio.sleep(rng.uniform(2.0, 5.0))  # a random moment
        assert rig.api is not None
        rig.api.kill()
        kills.append(time.monotonic())
        await rig.start_api()  # the same port, like a supervisor would
    await asyncio.sleep(3)
    ledger, problems = await _finish(rig, load)
    downtime = [(load.first_created_after(at) or float("inf")) - at for at in kills]
    figures.record(
        "3. the API killed with -9 under load (and restarted)",
        ledger,
        duplicates="(must be 0)",
        extra={
            "API kills": len(kills),
            "kill -> next 201 p50/max": figures.p50_max(downtime),
            "users without mail / mail without user": f"{ledger.orphan_users} / "
            f"{ledger.orphan_mails}",
        },
    )
    figures.assert_no_loss(ledger)
    assert ledger.duplicates == 0
    assert ledger.in_doubt > 0, "no request was caught by a kill"
    _assert_clean_exits(rig, problems)


# --- 4. PostgreSQL restarted, connections terminated ---------------------------------------


async def test_postgres_restart_and_terminated_connections(make_rig: MakeRig, calm: float) -> None:
    rig = await make_rig("s4")
    rig.smtp(delay=0.05)
    await rig.start_api()
    await rig.start_dispatchers(3)
    load = Load(rig.api_url, "s4", RATE).start()
    terminated, restarts, down_for = [], [], []
    for hold_down in (3.0, 0.0):
        await asyncio.sleep(4)
        await rig.wait_for_sessions(6)  # 3 pools + 3 listeners, back after the last restart
        terminated.append(await rig.terminate_backends())
        await asyncio.sleep(4)
        stopping = time.monotonic()
        await rig.pg.stop()
        await asyncio.sleep(hold_down)  # PostgreSQL stays down this long
        await rig.pg.start()
        restarts.append(time.monotonic())
        down_for.append(restarts[-1] - stopping)
    await asyncio.sleep(6)
    ledger, problems = await _finish(rig, load, drain=150)

    first_at: dict[str, float] = {}
    for d in rig.mailbox.snapshot():
        first_at.setdefault(d.message_id, d.at)
    api_back, mail_back = [], []
    for at in restarts:
        api_back.append((load.first_created_after(at) or float("inf")) - at)
        after = [
            first_at[r.message_id]
            for r in load.created
            if r.sent_at >= at and r.message_id in first_at
        ]
        mail_back.append(min(after, default=float("inf")) - at)
    figures.record(
        "4. PostgreSQL restarted twice (pg_ctl stop -m fast; down 3 s, then 0 s), "
        "dispatcher sessions terminated twice",
        ledger,
        duplicates="(each explained by an abandoned or lease-lost attempt)",
        extra={
            "sessions terminated": " + ".join(map(str, terminated)),
            "PostgreSQL stop -> up again": ", ".join(figures.seconds(s) for s in down_for),
            "PostgreSQL up -> first 201": ", ".join(figures.seconds(s) for s in api_back),
            "PostgreSQL up -> first new mail delivered": ", ".join(
                figures.seconds(s) for s in mail_back
            ),
        },
    )
    figures.assert_no_loss(ledger)
    assert all(n >= 6 for n in terminated), terminated  # 3 pools + 3 listeners at least
    # No claim went astray: nothing waited for its 120 s lease to expire.
    assert max(ledger.latencies) < 60, "a mail waited for its lease to expire"
    assert ledger.http_status.get(503, 0) > 0, "the restart never showed (no 503)"
    _assert_clean_exits(rig, problems)


# --- 5. SMTP down, slow, flaky, healthy -------------------------------------------------------


async def test_smtp_down_then_slow_then_flaky_then_healthy(make_rig: MakeRig, calm: float) -> None:
    rig = await make_rig("s5")
    smtp = rig.smtp(delay=0.0)
    await rig.start_api()
    await rig.start_dispatchers(3)
    load = Load(rig.api_url, "s5", RATE).start()
    phases: list[tuple[str, float]] = []

    async def phase(name: str, seconds: float) -> None:
        phases.append((name, time.monotonic()))
        await asyncio.sleep(seconds)  # hold the phase

    await phase("healthy", 3)
    await asyncio.to_thread(smtp.down)
    await phase("down", 30)
    smtp.set_mode("slow")
    await asyncio.to_thread(smtp.up)
    back = time.monotonic()
    phases.append(("slow", back))
    # The dispatchers come back when their SMTP back-off pause (up to 30 s) ends; the
    # slow phase lasts 10 s from the first delivery, so that it carries mail.
    await wait_until(
        lambda: any(d.at >= back for d in rig.mailbox.snapshot()),
        timeout=60,
        interval=0.1,
        what="the first delivery after the outage",
    )
    await asyncio.sleep(10)  # hold the slow phase
    smtp.set_mode("flaky")
    await phase("flaky", 10)
    smtp.set_mode("healthy")
    await phase("healthy again", 3)
    await load.stop()
    drained = await rig.drain(120)
    ledger, problems = await _finish(rig, load)

    deliveries = rig.mailbox.snapshot()
    ends = [t for _, t in phases[1:]] + [float("inf")]
    per_phase = ", ".join(
        f"{name} {min(end, load.stopped_at) - start:.0f} s: "
        f"{sum(1 for d in deliveries if start <= d.at < end)}"
        for (name, start), end in zip(phases, ends, strict=True)
    )
    first_back = min((d.at for d in deliveries if d.at >= back), default=float("inf")) - back
    first_at: dict[str, float] = {}
    for d in deliveries:
        first_at.setdefault(d.message_id, d.at)
    backlog = [
        first_at[r.message_id]
        for r in load.created
        if r.sent_at < back and r.message_id in first_at
    ]
    figures.record(
        "5. SMTP down 30 s, then slow (1 s per mail) until 10 s after it delivers again, "
        "then 451 to every third mail 10 s, then healthy",
        ledger,
        duplicates="(must be 0)",
        extra={
            "phase length: deliveries": per_phase,
            "SMTP up -> first delivery": figures.seconds(first_back),
            "SMTP up -> all mail registered before it delivered": figures.seconds(
                max(backlog, default=back) - back
            )
            + f" ({len(backlog)} mails)",
            "drain after the load stopped": figures.seconds(drained),
            "451 replies": smtp.handler.refused,
            "most attempts for one mail": ledger.max_attempts,
        },
    )
    figures.assert_no_loss(ledger)
    assert ledger.duplicates == 0
    assert ledger.attempts["failed"] == 0
    assert smtp.handler.refused > 0
    assert ledger.attempts["deferred"] > 0
    _assert_clean_exits(rig, problems)


# --- 6. SIGSTOP past the lease ---------------------------------------------------------------


@dataclass
class Freeze:
    name: str
    leased: set[int]
    takeover: float  # SIGSTOP -> its rows reclaimed by others


async def test_frozen_dispatcher_never_overwrites_the_new_owner(
    make_rig: MakeRig, calm: float
) -> None:
    rng = random.Random(SEED + 6)
    rig = await make_rig("s6")
    fast = rig.smtp(delay=0.5)  # every dispatcher always has sends in flight
    slow = rig.smtp(delay=8.0, label="smtp-slow")
    await rig.start_api()
    dispatchers = await rig.start_dispatchers(3, [fast])
    # One dispatcher behind a slow relay, with 2 workers: its sends outlast a freeze, and
    # holding 3 rows means at least one claim waits in its queue behind them.
    behind_slow = rig.spawn_dispatcher(slow, DISPATCHER_CONCURRENCY="2")
    await rig.wait_registered(behind_slow)
    load = Load(rig.api_url, "s6", RATE).start()
    freezes: list[Freeze] = []
    for _ in range(3):
        await asyncio.sleep(rng.uniform(1.0, 3.0))
        freezes.append(await _freeze_one(rig, dispatchers, at_least=2, until_resent=True))
    # Thawed as soon as its rows are taken over: its own sends finish after the thaw.
    freezes.append(await _freeze_one(rig, [behind_slow], at_least=3, until_resent=False))
    await asyncio.sleep(10)  # the thawed one's sends (8 s each) finish under load
    ledger, problems = await _finish(rig, load)

    frozen = {f.name for f in freezes}
    holders = await rig.db.fetch(
        "SELECT outbox_id, dispatcher FROM outbox_attempts "
        "WHERE outcome = 'sent' AND NOT lease_lost AND outbox_id = ANY($1)",
        list(set().union(*(f.leased for f in freezes))),
    )
    lease_lost_by = await rig.db.fetch(
        "SELECT DISTINCT dispatcher FROM outbox_attempts WHERE lease_lost"
    )
    ids = await _outbox_message_ids(rig)
    in_flight = set().union(*(f.leased for f in freezes))
    figures.record(
        "6. a dispatcher frozen with SIGSTOP past its heartbeat staleness, then SIGCONT "
        "(3 times after its rows were re-sent, once right after they were reclaimed)",
        ledger,
        duplicates="(sends the server accepted from the frozen one; "
        f"bound {len(in_flight)} rows it held)",
        extra={
            "rows taken over from the frozen one": sum(len(f.leased) for f in freezes),
            "SIGSTOP -> rows reclaimed p50/max": figures.p50_max([f.takeover for f in freezes]),
            "outcomes recorded after losing the lease": f"{ledger.lease_lost} (changed no row)",
        },
    )
    figures.assert_no_loss(ledger)
    assert all(f.leased for f in freezes)
    assert max(f.takeover for f in freezes) <= STALE_AFTER + RECOVERY_TARGET
    # The final outcome of every row a frozen dispatcher held came from its new owner.
    owner = {r["outbox_id"]: r["dispatcher"] for r in holders}
    for f in freezes:
        for row in f.leased:
            assert owner[row] != f.name, f"outbox {row}: outcome recorded by the frozen one"
    assert ledger.lease_lost > 0, "the frozen dispatcher never reported a lost lease"
    assert {r["dispatcher"] for r in lease_lost_by} <= frozen
    assert ledger.duplicate_ids <= _message_ids(ids, in_flight)
    _assert_clean_exits(rig, problems)


async def _freeze_one(
    rig: Rig, candidates: list[Proc], at_least: int, until_resent: bool
) -> Freeze:
    """SIGSTOP a dispatcher holding mail until others took its rows over, then SIGCONT.

    With ``until_resent`` it stays frozen until the new owners have sent those rows.
    """
    holding: list[str] = []

    async def someone_holds_mail() -> bool:
        for proc in candidates:
            if len(await rig.leased_by(proc.name)) >= at_least:
                holding.append(proc.name)
                return True
        return False

    await wait_until(someone_holds_mail, timeout=30, interval=0.05, what="leased rows")
    victim = rig.dispatchers[holding[0]]
    frozen_at = time.monotonic()
    victim.freeze()
    await _idle_sessions(rig, victim.name)
    leased = await rig.leased_by(victim.name)

    async def taken_over() -> bool:
        return not await rig.leased_by(victim.name)

    await wait_until(taken_over, timeout=30, interval=0.05, what="the rows to be reclaimed")
    takeover = time.monotonic() - frozen_at

    async def resent() -> bool:
        return not await rig.db.fetchval(
            "SELECT count(*) FROM outbox WHERE id = ANY($1) AND status <> 'sent'", list(leased)
        )

    if until_resent:
        await wait_until(resent, timeout=30, interval=0.1, what="the new owners to send")
    thawed_at = time.time()
    victim.thaw()

    async def beating() -> bool:
        return bool(
            await rig.db.fetchval(
                "SELECT count(*) FROM dispatchers WHERE name = $1 "
                "AND last_beat_at > to_timestamp($2)",
                victim.name,
                thawed_at,
            )
        )

    await wait_until(beating, timeout=15, interval=0.1, what="the thawed one's heartbeat")
    return Freeze(victim.name, leased, takeover)


async def _idle_sessions(rig: Rig, name: str, timeout: float = 5.0) -> None:
    """Wait until none of ``name``'s sessions is running a statement (it is frozen)."""

    async def idle() -> bool:
        return not await rig.db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = ANY($1) "
            "AND state = 'active'",
            [f"outbox-dispatcher:{name}"[:63], f"outbox-listener:{name}"[:63]],
        )

    await wait_until(idle, timeout=timeout, interval=0.02, what=f"{name}'s statements to end")


# --- 7. hostile data -------------------------------------------------------------------------

#: How long ordinary registrations and the hostile stream run side by side (seconds).
HOSTILE_SECONDS = 20.0
#: Rows written with SQL, past every check of the API and of enqueue(): no server can take
#: them. Each must fail at once, with the reason, and hold up nothing else.
POISON: list[dict[str, str]] = [
    {"sender": "not an address"},
    {"sender": "Eve <>"},
    {"sender": "noreply@"},
    {"sender": "a@example.com, b@example.com"},
    {"recipient": "nobody"},
    {"recipient": "x@"},
    {"recipient": "@example.com"},
    {"recipient": "victim@example.com\r\nBcc: x@evil.example"},
    {"recipient": "x@xn--zz"},
    {"recipient": "=?utf-8?q?a?=@example.com"},
    {"subject": "Hi\r\nBcc: x@evil.example"},
    {"recipient_name": "Eve\u2028Bcc: x@evil.example"},
    {"message_id": "not a message id"},
]
#: The header fields of every mail, in this order: nothing added (Bcc, Reply-To, ...).
HEADERS = ["From", "To", "Subject", "Date", "Message-ID", "MIME-Version", "Content-Type"]
#: A display name written as encoded-words only (the writer's form for any non-plain text).
_WORD = r"=\?utf-8\?b\?[A-Za-z0-9+/]*={0,2}\?="
_WORDS = re.compile(rf"{_WORD}(?:\s+{_WORD})*")
#: Ordinary mails' latency (201 -> inbox) may be this many times the calm baseline's,
#: plus this much for the p50 and the p99 (seconds): the machine is shared, and a p99 of
#: 0.1 s is noisy. A stall caused by a hostile row (a poll interval of 2 s, an SMTP pause
#: of 0.5 s or more, a retry) is well beyond that.
LATENCY_FACTOR = 2.0
LATENCY_SLACK = {50: 0.25, 99: 0.5}


async def test_hostile_data_is_delivered_exactly_or_refused(make_rig: MakeRig, calm: float) -> None:
    rng = random.Random(SEED + 7)
    rig = await make_rig("s7")
    # The same product behind a relay without SMTPUTF8, with its own database (a queue
    # is shared by all its dispatchers, so only its own queue reaches that relay for sure).
    plain = await make_rig("s7b")
    rig.smtp(delay=0.05, label="smtp-utf8", smtputf8=True)
    plain.smtp(delay=0.05, label="smtp-ascii")
    await asyncio.gather(rig.start_api(), plain.start_api())
    dispatchers, plain_dispatchers = await asyncio.gather(
        rig.start_dispatchers(3), plain.start_dispatchers(2)
    )
    streams: list[list[list[Hostile]]] = [[], []]
    for stream, rounds in zip(streams, ((1, 2), (3,)), strict=True):
        for round_no in rounds:  # each round: every case once, new addresses, random order
            cases = hostile_round(round_no)
            rng.shuffle(cases)
            stream += cases
    load = Load(rig.api_url, "s7", RATE).start()
    hostile = HostileLoad(rig.api_url, streams[0], HOSTILE_SECONDS).start()
    plain_hostile = HostileLoad(plain.api_url, streams[1], HOSTILE_SECONDS).start()
    poison: dict[int, dict[str, str]] = {}
    for batch in range(3):  # written in three batches while the load runs
        await asyncio.sleep(HOSTILE_SECONDS / 4)
        poison.update(await _write_poison(rig, POISON[batch::3], batch))
    await asyncio.gather(hostile.wait(), plain_hostile.wait())
    await load.stop()
    drained = await rig.drain(90)
    await plain.drain(90)
    procs = {rig: dispatchers, plain: plain_dispatchers}
    everyone = {(p.name, p.pid) for p in dispatchers + plain_dispatchers}
    alive = {(p.name, p.pid) for group in procs.values() for p in group if p.alive}
    started = {(p.name, p.pid) for r in procs for p in r.procs.all if p.kind == "dispatcher"}
    beating = {
        (b["name"], b["pid"])
        for r in procs
        for b in await r.db.fetch("SELECT name, pid FROM dispatchers")
    }
    problems, plain_problems = await asyncio.gather(rig.stop_all(), plain.stop_all())
    ledger = await rig.reconcile(load)
    ours = await _judge(rig, hostile, poison)
    theirs = await _judge(plain, plain_hostile, {})

    p50, p99 = ledger.latency(50), ledger.latency(99)
    calm50, calm99 = figures.CALM.get("latency p50"), figures.CALM.get("latency p99")
    requests = hostile.requests + plain_hostile.requests
    answers = Counter(h.request.status for h in requests)
    figures.record(
        "7. hostile data: IDN and non-ASCII addresses, encoded-word, long, RTL and emoji "
        "names, requests that must be refused and rows no server can take, among ordinary "
        "registrations; the same product behind a relay without SMTPUTF8 alongside",
        dataclasses.replace(ledger, lost=ledger.lost - ours.failed),  # failed: not lost
        duplicates="(must be 0)",
        extra={
            "hostile requests (both products)": f"{len(requests)} ("
            + ", ".join(f"{s}: {n}" for s, n in sorted(answers.items(), key=str))
            + "): "
            + ", ".join(f"{k} {n}" for k, n in Counter(h.case.kind for h in requests).items()),
            "answered otherwise than they must be": len(ours.wrong) + len(theirs.wrong),
            "refused requests that stored something": f"{len(ours.stored) + len(theirs.stored)}"
            f" of {ours.refused + theirs.refused}",
            "non-ASCII local parts": f"{ours.utf8['sent']} sent with SMTPUTF8; behind the "
            f"relay without it {theirs.utf8['failed']} failed at MAIL with the reason",
            "rows written with SQL no server can take": f"{len(poison)}: "
            f"{ours.poison_failed} failed at render after 1 attempt, with the reason",
            "rows failed, each with its reason": f"{len(ours.failed)} + {len(theirs.failed)} "
            "behind the relay without SMTPUTF8",
            "hostile rows not sent or failed as they must be": len(ours.unsettled)
            + len(theirs.unsettled),
            "mails read back (email package)": f"{ours.faithful + theirs.faithful} of "
            f"{ours.deliveries + theirs.deliveries} exact: one recipient = stored, name and "
            "Subject = stored text, no header added",
            f"names CPython {sys.version_info.major}.{sys.version_info.minor} reads with "
            "other spaces": f"{ours.reread + theirs.reread} (python/cpython gh-128110; "
            "each exact by RFC 2047)",
            "ordinary 201 -> inbox p50 / p99 vs calm": f"{figures.seconds(p50)} / "
            f"{figures.seconds(p99)} (calm {figures.seconds(calm50)} / {figures.seconds(calm99)})",
            "dispatchers": f"{len(dispatchers)} + {len(plain_dispatchers)}, "
            f"{len(alive)} alive at the end, {len(started - everyone)} restarts",
            "drain after the load stopped": figures.seconds(drained),
        },
    )
    for verdict in (ours, theirs):
        assert not verdict.wrong, "\n".join(verdict.wrong)
        assert not verdict.stored, f"refused requests stored rows: {verdict.stored}"
        assert not verdict.unsettled, "\n".join(verdict.unsettled[:10])
        assert not verdict.unfaithful, "\n".join(verdict.unfaithful[:10])
    assert alive == started == beating == everyone, "a dispatcher exited or was restarted"
    assert ours.utf8["sent"] > 0 and ours.utf8["failed"] == 0, ours.utf8
    assert theirs.utf8["failed"] > 0 and theirs.utf8["sent"] == 0, theirs.utf8
    assert ours.poison_failed == len(poison) == len(POISON)
    # Every ordinary mail delivered once; nothing stored beyond the 201s and the SQL rows.
    assert load.count(201) == len(load.requests), ledger.http_status
    assert ledger.committed == len(load.created) + ours.accepted, "users beyond the 201s"
    assert ledger.outbox_rows == ledger.committed + len(poison), "mails beyond the 201s"
    assert set(ledger.status) <= {"sent", "failed"}, ledger.status
    assert ledger.lost == ours.failed, "a mail that did not fail was never delivered"
    assert not ledger.stray and ledger.duplicates == 0
    assert ledger.orphan_users == 0 and ledger.missing_201 == 0
    assert not ledger.holder_violations and ledger.lost_lease_sends == 0
    # ... with no extra delay.
    assert p50 is not None and p99 is not None and calm50 is not None and calm99 is not None
    assert p50 <= LATENCY_FACTOR * calm50 + LATENCY_SLACK[50], (p50, calm50)
    assert p99 <= LATENCY_FACTOR * calm99 + LATENCY_SLACK[99], (p99, calm99)
    _assert_clean_exits(rig, problems)
    _assert_clean_exits(plain, plain_problems)


@dataclass
class HostileVerdict:
    """What came of one product's hostile requests, rows and mails."""

    wrong: list[str]  # requests that did not get the status they must get
    refused: int  # requests that must get a 4xx
    stored: list[str]  # tokens of refused requests found in a row
    accepted: int  # 201s
    unsettled: list[str]  # rows not sent or failed as their server allows
    utf8: Counter[str]  # non-ASCII local parts: "sent" (with SMTPUTF8) or "failed" at MAIL
    poison_failed: int  # SQL rows failed at render after one attempt, with the reason
    failed: set[str]  # Message-IDs of the failed rows
    deliveries: int
    faithful: int  # deliveries that say exactly what their row says
    unfaithful: list[str]
    reread: int  # display names CPython reads with other spaces (gh-128110)


async def _judge(
    rig: Rig, hostile: HostileLoad, poison: dict[int, dict[str, str]]
) -> HostileVerdict:
    """Check a product's hostile requests, its rows and every mail its servers received."""
    outbox = await rig.db.fetch(
        "SELECT id, message_id, sender, recipient, recipient_name, subject, body_text, "
        "body_html, status, attempts, last_error FROM outbox"
    )
    last = {
        r["outbox_id"]: r
        for r in await rig.db.fetch(
            "SELECT DISTINCT ON (outbox_id) outbox_id, dispatcher, outcome, smtp_stage "
            "FROM outbox_attempts ORDER BY outbox_id, id DESC"
        )
    }
    by_id = {r["id"]: r for r in outbox}
    by_message = {r["message_id"]: r for r in outbox}
    smtputf8 = rig.smtps[0].smtputf8  # every dispatcher of a product uses this server

    # Every request got the answer it must get; the refused ones stored nothing.
    wrong = [
        f"{h.case.kind}: {h.case.email!r:.60} {h.case.name!r:.60} got {h.request.status} "
        f"({h.request.error}), must get {h.case.expect}"
        for h in hostile.requests
        if h.request.status != h.case.expect
    ]
    refused = [h.case.token for h in hostile.requests if h.case.expect != 201]
    stored = await rig.db.fetch(
        "SELECT t FROM unnest($1::text[]) AS t WHERE EXISTS (SELECT 1 FROM users "
        "WHERE strpos(email, t) > 0 OR strpos(name, t) > 0) OR EXISTS (SELECT 1 FROM outbox "
        "WHERE strpos(recipient, t) > 0 OR strpos(recipient_name, t) > 0 "
        "OR strpos(subject, t) > 0)",
        refused,
    )
    accepted = [h for h in hostile.requests if h.request.status == 201]

    # Every hostile row ended sent, or failed with its reason where its server cannot take
    # it: a non-ASCII local part fails at MAIL behind a server without SMTPUTF8.
    unsettled: list[str] = []
    utf8 = Counter[str]()
    for h in accepted:
        row = by_id.get(h.request.outbox_id)
        if row is None:
            unsettled.append(f"no row for {h.case.kind} {h.case.email!r}")
            continue
        attempt = dict(last.get(row["id"]) or {})
        utf8_local = not row["recipient"].rpartition("@")[0].isascii()
        if utf8_local and not smtputf8:
            kind, ok = (
                "failed",
                (
                    row["status"] == "failed"
                    and "SMTPUTF8" in (row["last_error"] or "")
                    and attempt.get("smtp_stage") == "mail"
                    and row["attempts"] == 1
                ),
            )
        else:
            kind, ok = "sent", row["status"] == "sent"
        if utf8_local and ok:
            utf8[kind] += 1
        if not ok:
            unsettled.append(f"{dict(row)} {attempt}")
    poison_failed = 0
    for outbox_id in poison:
        row, attempt = by_id[outbox_id], dict(last.get(outbox_id) or {})
        if (
            row["status"] == "failed"
            and (row["last_error"] or "").startswith("cannot render the message")
            and attempt.get("smtp_stage") == "render"
            and row["attempts"] == 1
        ):
            poison_failed += 1
        else:
            unsettled.append(f"{dict(row)} {attempt}")
    for row in outbox:
        if row["status"] not in ("sent", "failed") or (
            row["status"] == "failed" and not row["last_error"]
        ):
            unsettled.append(f"{dict(row)}")

    # Every delivered mail says exactly what its row says.
    unfaithful: list[str] = []
    faithful = reread = 0
    deliveries = rig.mailbox.snapshot()
    copies = Counter(d.message_id for d in deliveries)
    unfaithful += [f"{m}: received {n} times" for m, n in copies.items() if n > 1]
    for delivery in deliveries:
        if delivery.message_id not in by_message:
            unfaithful.append(f"{delivery.message_id}: received, but no row has it")
            continue
        wrongs, artefact = _read_delivery(delivery, by_message[delivery.message_id])
        unfaithful += wrongs
        faithful += not wrongs
        reread += artefact
    return HostileVerdict(
        wrong=wrong,
        refused=len(refused),
        stored=[r["t"] for r in stored],
        accepted=len(accepted),
        unsettled=unsettled,
        utf8=utf8,
        poison_failed=poison_failed,
        failed={r["message_id"] for r in outbox if r["status"] == "failed"},
        deliveries=len(deliveries),
        faithful=faithful,
        unfaithful=unfaithful,
        reread=reread,
    )


async def _write_poison(
    rig: Rig, rows: list[dict[str, str]], batch: int
) -> dict[int, dict[str, str]]:
    """Insert ``rows`` (changes to a valid mail) straight into outbox; wake the dispatchers."""
    written = {}
    for i, changes in enumerate(rows):
        row = {
            "message_id": f"<poison-{batch}-{i}.{SEED}@chaos.example>",
            "sender": "Outbox <noreply@example.com>",
            "recipient": f"poison-{batch}-{i}@example.com",
            "recipient_name": "Poison",
            "subject": "Poison",
            **changes,
        }
        outbox_id = await rig.db.fetchval(
            "INSERT INTO outbox (message_id, sender, recipient, recipient_name, subject, "
            "body_text, recipient_domain, recipient_key) VALUES ($1, $2, $3, $4, $5, 'Poison', "
            "coalesce(lower(substring($3 from '@([^@]*)$')), ''), lower($3)) RETURNING id",
            row["message_id"],
            row["sender"],
            row["recipient"],
            row["recipient_name"],
            row["subject"],
        )
        written[outbox_id] = changes
    await rig.db.fetch("SELECT pg_notify('outbox_mail', '')")
    return written


def _read_delivery(delivery: Delivery, row: Any) -> tuple[list[str], bool]:
    """What is wrong with a delivered mail, read by the email package, against its row.

    Also says whether CPython read the display name with other spaces than RFC 2047 gives
    (it keeps a space between adjacent encoded-words of a phrase and collapses runs of
    spaces: python/cpython gh-128110); the name must then still decode exactly by RFC 2047
    (the email package's ``decode_header``), and CPython's reading must be that artefact.
    """
    wrong: list[str] = []

    def bad(what: str) -> None:
        wrong.append(f"{row['message_id']} to {row['recipient']!r}: {what}")

    key = email_key(row["recipient"])
    needs_utf8 = not row["recipient"].rpartition("@")[0].isascii()
    if len(delivery.recipients) != 1 or email_key(delivery.recipients[0]) != key:
        bad(f"envelope recipients {delivery.recipients}")
    elif not delivery.recipients[0].rpartition("@")[2].isascii():
        bad(f"envelope domain not as A-labels: {delivery.recipients[0]!r}")
    if email_key(delivery.mail_from) != email_key(parse_address(row["sender"]).addr_spec):
        bad(f"envelope sender {delivery.mail_from!r}")
    if delivery.smtputf8 != needs_utf8:
        bad(f"SMTPUTF8 {delivery.smtputf8}, needed {needs_utf8}")
    content = delivery.content
    if content.isascii():
        msg = email.message_from_bytes(content, policy=policy.default)
    elif needs_utf8:  # RFC 6532: an SMTPUTF8 mail's header fields are UTF-8
        msg = email.message_from_string(content.decode("utf-8"), policy=policy.default)
    else:
        bad("8-bit content without SMTPUTF8")
        return wrong, False
    if msg.keys() != HEADERS:
        bad(f"header fields {msg.keys()}")
        return wrong, False
    allowed = {"NonASCIILocalPartDefect"} if needs_utf8 else set()
    defects = [type(d).__name__ for d in msg.defects]
    for name in ("From", "To", "Subject", "Message-ID"):
        defects += [type(d).__name__ for d in msg[name].defects]
    if set(defects) - allowed:
        bad(f"defects {defects}")
    sender = parse_address(row["sender"])
    senders = msg["From"].addresses
    if len(senders) != 1 or (senders[0].display_name, senders[0].addr_spec) != (
        sender.display_name,
        sender.addr_spec,
    ):
        bad(f"From {msg['From']!r}")
    to = msg["To"]
    artefact = False
    if len(to.groups) != 1 or len(to.addresses) != 1:
        bad(f"To {to!r}")
    else:
        address = to.addresses[0]
        if not address.domain.isascii():
            bad(f"To domain not as A-labels: {address.domain!r}")
        if email_key(f"{address.username}@{address.domain}") != key:
            bad(f"To address {address.addr_spec!r}")
        name, expected = address.display_name, row["recipient_name"]
        if name != expected:
            # The To field as written (unfolded), up to the address.
            head = content.split(b"\r\n\r\n", 1)[0].decode("utf-8")
            field = re.sub(r"\r\n(?=[ \t])", "", head).split("\r\nTo: ", 1)[1].split("\r\n")[0]
            phrase = field[: field.rindex("<")].rstrip()
            words = _WORDS.fullmatch(phrase) and [
                base64.b64decode(w[10:-2]).decode() for w in phrase.split()
            ]
            cpython = " ".join(re.sub(" +", " ", w) for w in words or [])
            decoded = str(make_header(decode_header(phrase))) if words else None
            artefact = decoded == expected and name == cpython
            if not artefact:
                bad(f"display name {name!r} (RFC 2047: {decoded!r}), stored {expected!r}")
    if str(msg["Subject"]) != row["subject"]:
        bad(f"Subject {str(msg['Subject'])!r}, stored {row['subject']!r}")
    if msg["Message-ID"] != row["message_id"]:
        bad(f"Message-ID {msg['Message-ID']!r}")
    bodies = {"text/plain": row["body_text"], "text/html": row["body_html"]}
    parts = list(msg.iter_parts()) if row["body_html"] is not None else [msg]
    types = [part.get_content_type() for part in parts]
    if types != [t for t, body in bodies.items() if body is not None]:
        bad(f"parts {types}")
    for part in parts:
        if part is not msg and part.keys() != ["Content-Type", "Content-Transfer-Encoding"]:
            bad(f"part header fields {part.keys()}")
        text = part.get_content().replace("\r\n", "\n")
        if text != (bodies.get(part.get_content_type()) or "").replace("\r\n", "\n"):
            bad(f"{part.get_content_type()} part differs from the row")
    return wrong, artefact
