"""Real dispatcher processes: many at once, kill -9, SIGTERM, NOTIFY, lost connections."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections import Counter

import asyncpg

from tests.dispatching import (
    enqueue_many,
    live_dispatchers,
    process_log,
    running_dispatcher,
    spawn_dispatcher,
    status_counts,
    wait_until,
)
from tests.smtp_server import Reply, SmtpServer


async def _stop(proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
    proc.send_signal(signal.SIGTERM)
    return await asyncio.to_thread(proc.wait, timeout)


def _assert_exactly_once(server: SmtpServer, message_ids: list[str]) -> None:
    assert server.message_ids() == Counter({m: 1 for m in message_ids})


async def test_two_in_process_dispatchers_deliver_1000_rows_exactly_once(
    database_url: str, db: asyncpg.Pool, smtp_server: SmtpServer
) -> None:
    queued = await enqueue_many(db, 1000)
    async with (
        running_dispatcher(database_url, smtp_server, name="one"),
        running_dispatcher(database_url, smtp_server, name="two"),
    ):
        await wait_until(lambda: _count(db, "sent", 1000), timeout=120, what="1000 rows sent")
    _assert_exactly_once(smtp_server, [q.message_id for q in queued])
    per_dispatcher = await db.fetch(
        "SELECT dispatcher, count(*) AS n FROM outbox_attempts GROUP BY dispatcher"
    )
    assert {r["dispatcher"] for r in per_dispatcher} == {"one", "two"}
    assert await db.fetchval("SELECT count(*) FROM outbox_attempts") == 1000


async def _count(db: asyncpg.Pool, status: str, expected: int) -> bool:
    return (await status_counts(db)).get(status, 0) == expected


async def test_four_dispatcher_processes_deliver_1000_rows_exactly_once(
    database_url: str, db: asyncpg.Pool, smtp_server: SmtpServer
) -> None:
    queued = await enqueue_many(db, 1000)
    procs = [spawn_dispatcher(database_url, smtp_server, f"proc-{i}") for i in range(4)]
    try:
        await wait_until(lambda: _count(db, "sent", 1000), timeout=120, what="1000 rows sent")
    finally:
        codes = [await _stop(p) for p in procs]
    assert codes == [0, 0, 0, 0]
    _assert_exactly_once(smtp_server, [q.message_id for q in queued])
    assert (
        await db.fetchval(
            "SELECT count(*) FROM outbox_attempts WHERE outcome <> 'sent' OR lease_lost"
        )
        == 0
    )
    assert await db.fetchval("SELECT count(*) FROM dispatchers") == 0  # all deregistered


async def test_kill_9_mid_batch_loses_nothing_and_recovers_within_10_seconds(
    database_url: str, db: asyncpg.Pool, smtp_server: SmtpServer
) -> None:
    smtp_server.handler.data_plan = lambda rcpt, seen: Reply(delay=0.2)
    queued = await enqueue_many(db, 40)
    # Default liveness settings: the 10-second recovery budget is the product's default.
    defaults = {"DISPATCHER_HEARTBEAT_INTERVAL": "2", "DISPATCHER_POLL_INTERVAL": "2"}
    victim = spawn_dispatcher(
        database_url,
        smtp_server,
        "victim",
        "--concurrency",
        "4",
        "--batch-size",
        "8",
        **defaults,
    )
    await wait_until(lambda: len(smtp_server.received) >= 8, what="the victim to send")
    victim.kill()
    victim.wait()
    killed_at = await db.fetchval("SELECT now()")
    in_flight = {
        r["message_id"]
        for r in await db.fetch(
            "SELECT message_id FROM outbox WHERE status = 'sending' AND lease_owner = 'victim'"
        )
    }
    assert in_flight, "the kill should have left leased rows behind"
    rescuer = spawn_dispatcher(database_url, smtp_server, "rescuer", **defaults)
    try:
        await wait_until(lambda: _count(db, "sent", 40), timeout=60, what="all 40 sent")
    finally:
        assert await _stop(rescuer) == 0

    counts = smtp_server.message_ids()
    assert set(counts) == {q.message_id for q in queued}, "a mail was lost"
    duplicates = {m for m, n in counts.items() if n > 1}
    assert duplicates <= in_flight
    assert len(duplicates) <= 4 + 8  # at most what was sent or queued when it died
    assert all(n <= 2 for n in counts.values())
    recovered_at = await db.fetchval(
        "SELECT max(finished_at) FROM outbox_attempts WHERE outcome = 'abandoned'"
    )
    assert recovered_at is not None
    assert (recovered_at - killed_at).total_seconds() <= 10.0


async def test_sigterm_mid_batch_hands_back_unstarted_rows_and_duplicates_nothing(
    database_url: str, db: asyncpg.Pool, smtp_server: SmtpServer
) -> None:
    smtp_server.handler.data_plan = lambda rcpt, seen: Reply(delay=0.3)
    queued = await enqueue_many(db, 30)
    first = spawn_dispatcher(
        database_url, smtp_server, "first", "--concurrency", "4", "--batch-size", "8"
    )
    await wait_until(lambda: len(smtp_server.received) >= 4, what="the first sends")
    assert await _stop(first) == 0
    counts = await status_counts(db)
    assert "sending" not in counts, counts
    assert counts.get("sent", 0) == len(smtp_server.received)
    # Rows handed back unsent did not use up an attempt.
    assert (
        await db.fetchval("SELECT count(*) FROM outbox WHERE status = 'pending' AND attempts <> 0")
        == 0
    )
    second = spawn_dispatcher(database_url, smtp_server, "second")
    try:
        await wait_until(lambda: _count(db, "sent", 30), timeout=60, what="all 30 sent")
    finally:
        assert await _stop(second) == 0
    _assert_exactly_once(smtp_server, [q.message_id for q in queued])


async def test_second_signal_exits_at_once(
    database_url: str, db: asyncpg.Pool, smtp_server: SmtpServer
) -> None:
    smtp_server.handler.data_plan = lambda rcpt, seen: Reply(delay=30)
    await enqueue_many(db, 2)
    proc = spawn_dispatcher(database_url, smtp_server, "stubborn")
    await wait_until(lambda: _count(db, "sending", 2), what="the sends to start")
    proc.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.2)  # let the first signal be handled before the second
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(proc.wait, 10)
    assert code == 1
    assert time.monotonic() - started < 5


async def test_notify_wakes_an_idle_dispatcher_long_before_its_poll(
    database_url: str, db: asyncpg.Pool, smtp_server: SmtpServer
) -> None:
    async with running_dispatcher(database_url, smtp_server, poll_interval=60):
        await wait_until(lambda: _listening(db, "test"), what="the listener")
        await asyncio.sleep(0.3)  # let the start-up claim pass, so the claimer is idle
        started = time.monotonic()
        [queued] = await enqueue_many(db, 1)
        await wait_until(lambda: len(smtp_server.received) == 1, timeout=5, what="delivery")
        assert time.monotonic() - started < 2.0
    assert smtp_server.received[0].message_id == queued.message_id


async def _listener_pid(db: asyncpg.Pool, name: str) -> int | None:
    pid: int | None = await db.fetchval(
        "SELECT pid FROM pg_stat_activity WHERE application_name = $1 "
        "AND datname = current_database()",
        f"outbox-listener:{name}",
    )
    return pid


async def _listening(db: asyncpg.Pool, name: str) -> bool:
    return await _listener_pid(db, name) is not None


async def test_a_terminated_listener_is_rebuilt(
    database_url: str, db: asyncpg.Pool, smtp_server: SmtpServer
) -> None:
    async with running_dispatcher(database_url, smtp_server, poll_interval=60):
        await wait_until(lambda: _listening(db, "test"), what="the listener")
        old = await _listener_pid(db, "test")
        assert await db.fetchval("SELECT pg_terminate_backend($1)", old)

        async def rebuilt() -> bool:
            pid = await _listener_pid(db, "test")
            return pid is not None and pid != old

        await wait_until(rebuilt, timeout=10, what="a new listener connection")
        await asyncio.sleep(0.3)
        started = time.monotonic()
        await enqueue_many(db, 1)
        await wait_until(lambda: len(smtp_server.received) == 1, timeout=5, what="delivery")
        assert time.monotonic() - started < 2.0


async def test_a_dispatcher_name_in_use_is_refused(
    database_url: str, db: asyncpg.Pool, smtp_server: SmtpServer
) -> None:
    async with running_dispatcher(database_url, smtp_server, name="taken"):
        proc = spawn_dispatcher(database_url, smtp_server, "taken")
        code = await asyncio.to_thread(proc.wait, 30)
        err = process_log(proc)
        assert code == 2
        assert "--name taken is in use" in err
        assert await live_dispatchers(db) == {"taken"}


async def test_metrics_port_serves_delivery_and_queue_metrics(
    database_url: str, db: asyncpg.Pool, smtp_server: SmtpServer
) -> None:
    import httpx

    from outbox.cli.embedded_pg import free_port

    port = free_port()
    await enqueue_many(db, 3)
    proc = spawn_dispatcher(database_url, smtp_server, "metered", "--metrics-port", str(port))
    try:
        await wait_until(lambda: _count(db, "sent", 3), what="3 mails sent")

        async def scraped() -> bool:
            try:
                async with httpx.AsyncClient() as http:
                    text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
            except httpx.HTTPError:
                return False
            return (
                'outbox_mails_total{outcome="sent"} 3.0' in text
                and 'outbox_rows{status="sent"} 3.0' in text
                and "outbox_live_dispatchers 1.0" in text
                and "outbox_database_up 1.0" in text
            )

        await wait_until(scraped, timeout=15, interval=0.5, what="the metrics to show 3 sent")
    finally:
        assert await _stop(proc) == 0
