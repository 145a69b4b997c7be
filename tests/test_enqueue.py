"""dispatcher.outbox: enqueue and enqueue_with, the only ways mail enters the outbox."""

from __future__ import annotations

import asyncio
from email.headerregistry import Address

import asyncpg
import pytest

from outbox.dispatcher.addresses import email_key
from outbox.dispatcher.outbox import Mail, enqueue, enqueue_with
from outbox.dispatcher.queries import NOTIFY_CHANNEL

SENDER = Address("Outbox", "noreply", "example.org")
INSERT_USER = (
    "INSERT INTO users (email, email_key, name) VALUES ($1, $2, $3) RETURNING id, created_at"
)
ADD_USER = "INSERT INTO users (email, email_key, name) VALUES ($1, $2, $3)"


def _user(email: str, name: str) -> tuple[str, str, str]:
    """INSERT_USER's arguments: the address, its mailbox key and the name."""
    return email, email_key(email), name


def _mail(addr: str = "ada@example.org", name: str = "Ada") -> Mail:
    local, _, domain = addr.partition("@")
    return Mail(
        recipient=Address(name, local, domain),
        subject="Hello",
        body_text="Hi there",
        body_html="<p>Hi there</p>",
    )


async def _counts(conn: asyncpg.Connection) -> tuple[int, int]:
    users = await conn.fetchval("SELECT count(*) FROM users")
    mails = await conn.fetchval("SELECT count(*) FROM outbox")
    return users, mails


async def test_enqueue_with_writes_both_rows_in_one_statement(db: asyncpg.Pool) -> None:
    async with db.acquire() as conn:
        written = await enqueue_with(
            conn, INSERT_USER, _user("ada@example.org", "Ada"), _mail(), sender=SENDER
        )
        assert written is not None
        user, queued = written
        assert await _counts(conn) == (1, 1)
        row = await conn.fetchrow("SELECT * FROM outbox WHERE id = $1", queued.id)
    assert user["id"] == await db.fetchval("SELECT id FROM users")
    assert row["message_id"] == queued.message_id
    assert row["created_at"] == queued.created_at == user["created_at"]
    assert row["sender"] == "Outbox <noreply@example.org>"
    assert (row["recipient"], row["recipient_name"]) == ("ada@example.org", "Ada")
    assert (row["subject"], row["body_text"], row["body_html"]) == (
        "Hello",
        "Hi there",
        "<p>Hi there</p>",
    )
    assert row["status"] == "pending"
    assert row["next_attempt_at"] == row["created_at"]


async def test_enqueue_with_a_failing_write_stores_nothing(db: asyncpg.Pool) -> None:
    await db.execute(ADD_USER, *_user("ada@example.org", "Ada"))
    async with db.acquire() as conn:
        with pytest.raises(asyncpg.UniqueViolationError) as caught:
            await enqueue_with(
                conn, INSERT_USER, _user("ADA@example.org", "Ada"), _mail(), sender=SENDER
            )
        assert caught.value.constraint_name == "users_email_key_key"
        assert await _counts(conn) == (1, 0)


async def test_enqueue_with_a_write_that_stores_nothing_queues_nothing(
    db: asyncpg.Pool,
) -> None:
    await db.execute(ADD_USER, *_user("ada@example.org", "Ada"))
    upsert = (
        "INSERT INTO users (email, email_key, name) VALUES ($1, $2, $3) "
        "ON CONFLICT (email_key) DO NOTHING RETURNING id"
    )
    async with db.acquire() as conn:
        assert (
            await enqueue_with(conn, upsert, _user("ÄDA@example.org", "A"), _mail(), sender=SENDER)
            is not None
        )
        assert (
            await enqueue_with(conn, upsert, _user("Ada@example.org", "A"), _mail(), sender=SENDER)
            is None
        )
        assert await _counts(conn) == (2, 1)
        written = await enqueue_with(
            conn, upsert, _user("bob@example.org", "B"), _mail(), sender=SENDER
        )
        assert written is not None
        assert await _counts(conn) == (3, 2)


async def test_enqueue_with_a_multi_row_write_fails_and_stores_nothing(
    db: asyncpg.Pool,
) -> None:
    two_rows = (
        "INSERT INTO users (email, email_key, name) VALUES ($1, $1, 'A'), ($2, $2, 'B') "
        "RETURNING id"
    )
    async with db.acquire() as conn:
        with pytest.raises(asyncpg.UniqueViolationError):  # one Message-ID, two mails
            await enqueue_with(
                conn, two_rows, ("a@example.org", "b@example.org"), _mail(), sender=SENDER
            )
        assert await _counts(conn) == (0, 0)


async def test_enqueue_with_joins_the_callers_transaction(db: asyncpg.Pool) -> None:
    async with db.acquire() as conn:
        transaction = conn.transaction()
        await transaction.start()
        await enqueue_with(conn, INSERT_USER, _user("ada@example.org", "A"), _mail(), sender=SENDER)
        await enqueue(conn, _mail("extra@example.org"), sender=SENDER)
        assert await _counts(conn) == (1, 2)
        await transaction.rollback()
        assert await _counts(conn) == (0, 0)


async def test_enqueue_notifies_only_at_commit(db: asyncpg.Pool, database_url: str) -> None:
    listener = await asyncpg.connect(database_url)
    received: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener(NOTIFY_CHANNEL, lambda *args: received.put_nowait(args[1]))
    try:
        async with db.acquire() as conn:
            async with conn.transaction():
                await enqueue_with(
                    conn, INSERT_USER, _user("ada@example.org", "A"), _mail(), sender=SENDER
                )
                await asyncio.sleep(0.2)
                assert received.empty()  # not before the commit
            await asyncio.wait_for(received.get(), timeout=5)
            # A rolled-back mail wakes nobody.
            transaction = conn.transaction()
            await transaction.start()
            await enqueue(conn, _mail("bob@example.org"), sender=SENDER)
            await transaction.rollback()
            # Autocommit: the statement is its own transaction.
            await enqueue_with(
                conn, INSERT_USER, _user("cy@example.org", "C"), _mail(), sender=SENDER
            )
            await asyncio.wait_for(received.get(), timeout=5)
            assert received.empty()
    finally:
        await listener.close()


def test_mail_refuses_header_injection() -> None:
    with pytest.raises(ValueError, match="subject"):
        Mail(recipient=Address("A", "a", "example.org"), subject="Hi\r\nBcc: x@y.z", body_text="")
    with pytest.raises(ValueError, match="recipient name"):
        Mail(recipient=Address("A\tB", "a", "example.org"), subject="Hi", body_text="")
    with pytest.raises(ValueError, match="full address"):
        Mail(recipient=Address("A", "a", ""), subject="Hi", body_text="")
