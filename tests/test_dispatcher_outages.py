"""Outages: PostgreSQL restarts under a running dispatcher; the SMTP server goes away."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from outbox.cli import migrate
from outbox.cli.embedded_pg import EmbeddedPostgres
from outbox.dispatcher import operations as ops
from outbox.dispatcher.db import asyncpg_dsn
from outbox.dispatcher.smtp import SmtpConfig
from tests.dispatching import enqueue_many, running_dispatcher, status_counts, wait_until
from tests.smtp_server import SmtpServer


@pytest.fixture
async def own_postgres() -> AsyncIterator[EmbeddedPostgres]:
    """A PostgreSQL server of this test's own, free to be restarted."""
    root = Path(tempfile.mkdtemp(prefix="outbox-restart-pg-"))
    pg = EmbeddedPostgres(root, settings={"fsync": "off"})
    await asyncio.to_thread(pg.start)
    await asyncio.to_thread(pg.create_database, "outbox")
    await asyncio.to_thread(migrate.upgrade, pg.url("outbox"))
    try:
        yield pg
    finally:
        await asyncio.to_thread(pg.stop, "immediate")
        shutil.rmtree(root, ignore_errors=True)


async def _sent(url: str) -> int:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        return int(await conn.fetchval("SELECT count(*) FROM outbox WHERE status = 'sent'"))
    finally:
        await conn.close()


async def _enqueue(url: str, count: int, prefix: str) -> None:
    pool = await asyncpg.create_pool(asyncpg_dsn(url), min_size=1, max_size=1)
    assert pool is not None
    try:
        await enqueue_many(pool, count, prefix=prefix)
    finally:
        await pool.close()


async def test_dispatcher_survives_a_postgres_restart(
    own_postgres: EmbeddedPostgres, smtp_server: SmtpServer
) -> None:
    url = own_postgres.url("outbox")
    async with running_dispatcher(url, smtp_server, poll_interval=0.5) as dispatcher:
        await _enqueue(url, 5, "before")
        await wait_until(lambda: _is(url, 5), what="5 mails before the restart")
        await asyncio.to_thread(own_postgres.stop, "fast")
        await asyncio.sleep(1.0)  # the dispatcher now runs against a dead database
        await asyncio.to_thread(own_postgres.start)
        await _enqueue(url, 5, "after")
        await wait_until(lambda: _is(url, 10), timeout=30, what="5 mails after the restart")
        assert not dispatcher.crashed
    assert len(smtp_server.received) == 10


async def _is(url: str, count: int) -> bool:
    try:
        return await _sent(url) == count
    except (OSError, asyncpg.PostgresError):
        return False


async def test_smtp_outage_pauses_without_burning_attempts_then_delivers(
    database_url: str, db: asyncpg.Pool
) -> None:
    down = SmtpServer()  # a port nobody listens on until the server starts
    queued = await enqueue_many(db, 10)
    async with running_dispatcher(database_url, down, concurrency=2):
        # The dispatcher says it cannot reach the server (for `outbox status`) ...
        await wait_until(lambda: _smtp_error(db), what="the dispatcher to report the outage")
        async with db.acquire() as conn:
            summary = await ops.status_summary(conn)
        [info] = summary.dispatchers
        assert info.smtp_error is not None and "connect" in info.smtp_error.lower()
        assert info.smtp_unreachable_since is not None
        # ... and uses no mail's attempts on it: the mail was handed back, not deferred.
        assert await db.fetchval("SELECT count(*) FROM outbox_attempts") == 0
        assert await db.fetchval("SELECT max(attempts) FROM outbox WHERE status = 'pending'") == 0
        down.start()
        try:
            await wait_until(
                lambda: _all_sent(db, 10), timeout=60, what="delivery after the outage"
            )
            await wait_until(
                lambda: _smtp_ok(db), what="the dispatcher to report the server reachable"
            )
        finally:
            down.stop()
    assert {r.message_id for r in down.received} == {q.message_id for q in queued}
    assert await db.fetchval("SELECT max(attempts) FROM outbox") == 1


async def test_a_refusal_postgresql_cannot_store_as_it_is_never_stops_the_dispatcher(
    database_url: str, db: asyncpg.Pool
) -> None:
    # A relay that refuses us at the greeting with a NUL and a byte that is not UTF-8 in
    # its reply: the error reaches `outbox status` through the heartbeat, cleaned, and
    # the dispatcher beats on (it used to die on the heartbeat's write, at every restart).
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"554 no\x00thanks caf\xe9\r\n")
        await writer.drain()
        writer.close()

    relay = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = relay.sockets[0].getsockname()[1]
    await enqueue_many(db, 2)
    try:
        smtp = SmtpConfig("127.0.0.1", port, timeout=2.0)
        async with running_dispatcher(database_url, SmtpServer(), smtp=smtp) as dispatcher:
            await wait_until(lambda: _smtp_error(db), what="the dispatcher to report the refusal")
            error, beat = await db.fetchrow("SELECT smtp_error, last_beat_at FROM dispatchers")
            assert "554 no\ufffdthanks caf" in error
            await wait_until(
                lambda: _beat_since(db, beat), what="the dispatcher to heartbeat again"
            )
            assert not dispatcher.crashed
    finally:
        relay.close()
    # The mail was handed back unattempted, as for any server it cannot get through to.
    assert await db.fetchval("SELECT count(*) FROM outbox_attempts") == 0
    assert await status_counts(db) == {"pending": 2}


async def _beat_since(db: asyncpg.Pool, beat: object) -> bool:
    return bool(await db.fetchval("SELECT last_beat_at > $1 FROM dispatchers", beat))


async def _smtp_error(db: asyncpg.Pool) -> bool:
    return bool(await db.fetchval("SELECT count(*) FROM dispatchers WHERE smtp_error IS NOT NULL"))


async def _smtp_ok(db: asyncpg.Pool) -> bool:
    return bool(await db.fetchval("SELECT count(*) FROM dispatchers WHERE smtp_error IS NULL"))


async def _attempted(db: asyncpg.Pool) -> bool:
    return bool(await db.fetchval("SELECT count(*) FROM outbox_attempts"))


async def _all_sent(db: asyncpg.Pool, count: int) -> bool:
    return (await status_counts(db)).get("sent", 0) == count
