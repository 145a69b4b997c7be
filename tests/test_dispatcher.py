"""The dispatcher against a real PostgreSQL and real (fault-injecting) SMTP servers.

Every test runs twice: against a server offering PIPELINING (MAIL, RCPT and DATA go in
one write) and against one that does not (one command at a time).
"""

from __future__ import annotations

from collections.abc import Iterator

import asyncpg
import pytest

from tests.dispatching import enqueue_many, running_dispatcher, status_counts, wait_until
from tests.smtp_server import FaultyHandler, Reply, SmtpServer


@pytest.fixture(params=[True, False], ids=["pipelining", "one-by-one"])
def smtp_server(request: pytest.FixtureRequest) -> Iterator[SmtpServer]:
    """A real SMTP server (aiosmtpd) whose replies a test can script."""
    server = SmtpServer(FaultyHandler(pipelining=request.param)).start()
    try:
        yield server
    finally:
        server.stop()


async def test_happy_path_delivers_each_mail_once(
    database_url: str, db: asyncpg.Pool, smtp_server: SmtpServer
) -> None:
    queued = await enqueue_many(db, 20)
    async with running_dispatcher(database_url, smtp_server):
        await wait_until(lambda: len(smtp_server.received) >= 20, what="20 mails")
        await wait_until(lambda: _all_sent(db, 20), what="all rows recorded as sent")
    assert smtp_server.message_ids() == {q.message_id: 1 for q in queued}
    rows = await db.fetch("SELECT * FROM outbox ORDER BY id")
    for row in rows:
        assert row["status"] == "sent"
        assert row["attempts"] == 1
        assert row["sent_at"] is not None
        assert row["lease_token"] is None and row["lease_owner"] is None
        assert row["last_smtp_code"] == 250
    attempts = await db.fetch("SELECT * FROM outbox_attempts ORDER BY outbox_id")
    assert [(a["outcome"], a["smtp_code"], a["dispatcher"]) for a in attempts] == [
        ("sent", 250, "test")
    ] * 20
    first = smtp_server.received[0].data.decode()
    assert "Subject: Hello" in first and "Content-Type: multipart/alternative" in first


async def _all_sent(db: asyncpg.Pool, count: int) -> bool:
    return (await status_counts(db)).get("sent", 0) == count


async def test_transient_451_is_retried_then_sent(
    database_url: str, db: asyncpg.Pool, smtp_server: SmtpServer
) -> None:
    smtp_server.handler.data_plan = lambda rcpt, seen: (
        Reply("451 4.3.0 try again later") if seen < 2 else Reply()
    )
    [queued] = await enqueue_many(db, 1)
    async with running_dispatcher(database_url, smtp_server):
        await wait_until(lambda: _all_sent(db, 1), what="the mail to be sent")
    attempts = await db.fetch(
        "SELECT attempt, outcome, smtp_code, smtp_reply FROM outbox_attempts ORDER BY id"
    )
    assert [(a["attempt"], a["outcome"], a["smtp_code"]) for a in attempts] == [
        (1, "deferred", 451),
        (2, "deferred", 451),
        (3, "sent", 250),
    ]
    assert "try again later" in attempts[0]["smtp_reply"]
    row = await db.fetchrow("SELECT attempts, last_error FROM outbox")
    assert row["attempts"] == 3 and row["last_error"] is None
    assert smtp_server.message_ids() == {queued.message_id: 1}


async def test_permanent_550_fails_at_once_with_the_reply(
    database_url: str, db: asyncpg.Pool, smtp_server: SmtpServer
) -> None:
    smtp_server.handler.data_plan = lambda rcpt, seen: Reply("550 5.1.1 mailbox unavailable")
    await enqueue_many(db, 1)
    async with running_dispatcher(database_url, smtp_server):
        await wait_until(lambda: _status_is(db, "failed"), what="the mail to fail")
    row = await db.fetchrow("SELECT * FROM outbox")
    assert row["attempts"] == 1
    assert row["last_smtp_code"] == 550
    assert "mailbox unavailable" in row["last_error"]
    attempt = await db.fetchrow("SELECT * FROM outbox_attempts")
    assert (attempt["outcome"], attempt["smtp_code"]) == ("failed", 550)
    assert smtp_server.received == []


async def _status_is(db: asyncpg.Pool, status: str) -> bool:
    return await db.fetchval("SELECT bool_and(status = $1) FROM outbox", status) is True


async def test_552_at_rcpt_is_transient_but_at_data_is_permanent(
    database_url: str, db: asyncpg.Pool, smtp_server: SmtpServer
) -> None:
    smtp_server.handler.rcpt_plan = lambda rcpt, seen: (
        Reply("552 5.5.3 too many recipients")
        if rcpt.startswith("rcpt-") and seen == 0
        else Reply()
    )
    smtp_server.handler.data_plan = lambda rcpt, seen: (
        Reply("552 5.3.4 message too big") if rcpt.startswith("data-") else Reply()
    )
    [at_rcpt] = await enqueue_many(db, 1, prefix="rcpt")
    [at_data] = await enqueue_many(db, 1, prefix="data")
    async with running_dispatcher(database_url, smtp_server):
        await wait_until(
            lambda: _statuses(db, {at_rcpt.id: "sent", at_data.id: "failed"}),
            what="552 at RCPT retried and sent, 552 at DATA failed",
        )
    outcomes = await db.fetch(
        "SELECT outbox_id, outcome, smtp_code FROM outbox_attempts ORDER BY id"
    )
    by_row: dict[int, list[tuple[str, int]]] = {}
    for a in outcomes:
        by_row.setdefault(a["outbox_id"], []).append((a["outcome"], a["smtp_code"]))
    assert by_row[at_rcpt.id] == [("deferred", 552), ("sent", 250)]
    assert by_row[at_data.id] == [("failed", 552)]


async def _statuses(db: asyncpg.Pool, expected: dict[int, str]) -> bool:
    rows = await db.fetch("SELECT id, status FROM outbox")
    return {r["id"]: r["status"] for r in rows} == expected


async def test_connection_dropped_after_the_data_is_an_unknown_outcome_and_retried(
    database_url: str, db: asyncpg.Pool, smtp_server: SmtpServer
) -> None:
    # The server hangs up after it had the whole message: it may have accepted it, so the
    # attempt is 'unknown' (not a refusal), and the mail is retried with its Message-ID.
    smtp_server.handler.data_plan = lambda rcpt, seen: Reply(hang_up=True) if seen == 0 else Reply()
    [queued] = await enqueue_many(db, 1)
    async with running_dispatcher(database_url, smtp_server):
        await wait_until(lambda: _all_sent(db, 1), what="the mail to be sent after a hang-up")
    attempts = await db.fetch("SELECT outcome, error, smtp_stage FROM outbox_attempts ORDER BY id")
    assert [a["outcome"] for a in attempts] == ["unknown", "sent"]
    assert [a["smtp_stage"] for a in attempts] == ["end_of_data", "end_of_data"]
    assert "Disconnected" in attempts[0]["error"] or "lost" in attempts[0]["error"].lower()
    assert smtp_server.message_ids() == {queued.message_id: 1}


async def test_slow_reply_to_the_data_is_an_unknown_outcome_and_retried(
    database_url: str, db: asyncpg.Pool, smtp_server: SmtpServer
) -> None:
    smtp_server.handler.data_plan = lambda rcpt, seen: Reply(delay=3.0) if seen == 0 else Reply()
    await enqueue_many(db, 1)
    from tests.dispatching import smtp_config

    async with running_dispatcher(
        database_url, smtp_server, smtp=smtp_config(smtp_server, timeout=0.5)
    ):
        await wait_until(lambda: _all_sent(db, 1), what="the mail to be sent after a timeout")
    first = await db.fetchrow(
        "SELECT outcome, error, smtp_stage FROM outbox_attempts ORDER BY id LIMIT 1"
    )
    # The server had the whole message when the wait for its reply ran out.
    assert (first["outcome"], first["smtp_stage"]) == ("unknown", "end_of_data")
    assert "Timeout" in first["error"] or "timed out" in first["error"].lower()
    assert await db.fetchval("SELECT attempts FROM outbox") == 2


async def test_transient_failures_give_up_after_max_attempts(
    database_url: str, db: asyncpg.Pool, smtp_server: SmtpServer
) -> None:
    smtp_server.handler.data_plan = lambda rcpt, seen: Reply("450 4.2.1 mailbox busy")
    await enqueue_many(db, 1)
    async with running_dispatcher(database_url, smtp_server, max_attempts=3):
        await wait_until(lambda: _status_is(db, "failed"), what="the mail to be given up")
    row = await db.fetchrow("SELECT attempts, last_error, last_smtp_code FROM outbox")
    assert row["attempts"] == 3 and row["last_smtp_code"] == 450
    assert row["last_error"].startswith("gave up after 3 attempts")
    outcomes = [
        r["outcome"] for r in await db.fetch("SELECT outcome FROM outbox_attempts ORDER BY id")
    ]
    assert outcomes == ["deferred", "deferred", "failed"]
