"""Prove no mail is lost: crashes and faults under load, with real processes.

Every scenario runs ``outbox api``, several ``outbox dispatcher`` processes, aiosmtpd
servers and its own database, offers registrations at a steady rate, breaks something on
purpose, and ends by comparing every user row, every 201 and every message the SMTP
servers accepted, by Message-ID (:meth:`Rig.reconcile`). The figures are printed at the
end of the run. Liveness settings are the product's defaults (heartbeat 2 s, poll 2 s).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest

from tests.chaos import figures
from tests.chaos.conftest import RATE, SEED
from tests.chaos.load import Load
from tests.chaos.procs import Proc
from tests.chaos.rig import STALE_AFTER, Ledger, Rig
from tests.chaos.smtp import ChaosSmtp
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
