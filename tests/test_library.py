"""The library entry: ``enqueue`` in the caller's transaction, on asyncpg or SQLAlchemy, with
permanent idempotency keys. Real PostgreSQL, real concurrent transactions."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from email.headerregistry import Address

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from outbox.cli import migrate
from outbox.dispatcher import operations as ops
from outbox.dispatcher.db import asyncpg_dsn, sqlalchemy_url
from outbox.dispatcher.outbox import (
    MAX_KEY_LENGTH,
    Enqueued,
    Executor,
    Mail,
    default_sender,
    enqueue,
    set_default_sender,
)
from outbox.dispatcher.queries import NOTIFY_CHANNEL
from tests.audit_seed import backdate, set_status

DAY = timedelta(days=1)
KINDS = ["asyncpg", "session", "connection"]


def _mail(to: str = "Ada Lovelace <ada@example.org>") -> Mail:
    return Mail(to, "Welcome", "Hello Ada\n", "<p>Hello Ada</p>")


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """A SQLAlchemy engine on the test's database (asyncpg driver)."""
    engine = create_async_engine(sqlalchemy_url(database_url))
    try:
        yield engine
    finally:
        await engine.dispose()


@dataclass
class Tx:
    """A transaction of one kind, as an application holds it."""

    executor: Executor
    commit: Callable[[], Awaitable[None]]
    rollback: Callable[[], Awaitable[None]]


@asynccontextmanager
async def begun(kind: str, db: asyncpg.Pool, engine: AsyncEngine) -> AsyncIterator[Tx]:
    """A transaction on asyncpg (begun explicitly), or an AsyncSession or AsyncConnection
    in which nothing ran yet: enqueue is the first statement, so it begins the transaction
    (SQLAlchemy's autobegin). Left without commit, it rolls back."""
    if kind == "asyncpg":
        async with db.acquire() as conn:
            transaction = conn.transaction()
            await transaction.start()
            try:
                yield Tx(conn, transaction.commit, transaction.rollback)
            finally:
                if conn.is_in_transaction():  # the test did not end it
                    await transaction.rollback()
    elif kind == "session":
        async with AsyncSession(engine) as session:
            yield Tx(session, session.commit, session.rollback)
    else:
        async with engine.connect() as connection:
            yield Tx(connection, connection.commit, connection.rollback)


async def _count(db: asyncpg.Pool, table: str = "outbox") -> int:
    count: int = await db.fetchval(f"SELECT count(*) FROM {table}")
    return count


@pytest.fixture
async def notices(database_url: str) -> AsyncIterator[asyncio.Queue[str]]:
    """Payloads of NOTIFY outbox_mail, as a dispatcher's LISTEN connection receives them."""
    listener = await asyncpg.connect(asyncpg_dsn(database_url))
    received: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener(NOTIFY_CHANNEL, lambda *args: received.put_nowait(args[3]))
    try:
        yield received
    finally:
        await listener.close()


async def _next_notice(db: asyncpg.Pool, received: asyncio.Queue[str]) -> str:
    """The next payload; a marker sent now arrives after anything committed before it."""
    await db.execute("SELECT pg_notify($1, 'marker')", NOTIFY_CHANNEL)
    return await asyncio.wait_for(received.get(), timeout=5)


# --- One transaction, three kinds of connection ---------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_committed_mail_is_stored_and_wakes_the_dispatchers_at_commit(
    kind: str, db: asyncpg.Pool, engine: AsyncEngine, notices: asyncio.Queue[str]
) -> None:
    async with begun(kind, db, engine) as tx:
        queued = await enqueue(tx.executor, _mail())
        await asyncio.sleep(0.2)
        assert notices.empty()  # not before the commit
        assert await _count(db) == 0  # nor visible to anyone else
        await tx.commit()
    # The payload is the mail's priority (the default, 5).
    assert await asyncio.wait_for(notices.get(), timeout=5) == "5"
    row = await db.fetchrow("SELECT * FROM outbox")
    assert (row["id"], row["message_id"]) == (queued.id, queued.message_id)
    assert (row["recipient"], row["recipient_name"]) == ("ada@example.org", "Ada Lovelace")
    assert row["sender"] == str(default_sender())
    assert row["idempotency_key"] is None
    assert not queued.existed


@pytest.mark.parametrize("kind", KINDS)
async def test_rolled_back_mail_leaves_nothing_and_wakes_nobody(
    kind: str, db: asyncpg.Pool, engine: AsyncEngine, notices: asyncio.Queue[str]
) -> None:
    async with begun(kind, db, engine) as tx:
        await enqueue(tx.executor, _mail(), key="welcome:1")
        await enqueue(tx.executor, _mail("bob@example.org"))
        await tx.rollback()
    assert await _next_notice(db, notices) == "marker"
    assert await _count(db) == 0
    assert await _count(db, "outbox_keys") == 0


@pytest.mark.parametrize("kind", ["session", "connection"])
async def test_a_sqlalchemy_transaction_left_without_commit_leaves_nothing(
    kind: str, db: asyncpg.Pool, engine: AsyncEngine
) -> None:
    async with begun(kind, db, engine) as tx:
        await enqueue(tx.executor, _mail(), key="welcome:1")
    assert await _count(db) == 0
    assert await _count(db, "outbox_keys") == 0


ADD_USER = text(
    "INSERT INTO users (email, email_key, name) VALUES (:email, :email, :name) RETURNING id"
)


class _Abort(Exception):
    pass


@pytest.mark.parametrize("commit", [True, False])
async def test_mail_and_business_write_share_a_session_transaction(
    commit: bool, db: asyncpg.Pool, engine: AsyncEngine
) -> None:
    async with AsyncSession(engine) as session:
        with contextlib.suppress(_Abort):
            async with session.begin():
                user = await session.execute(ADD_USER, {"email": "ada@example.org", "name": "A"})
                await enqueue(session, _mail(), key=f"welcome:{user.scalar_one()}")
                if not commit:
                    raise _Abort  # an error in the request: the whole transaction goes
    assert await _count(db, "users") == await _count(db) == int(commit)


async def test_a_session_in_autocommit_stores_at_once(
    db: asyncpg.Pool, engine: AsyncEngine
) -> None:
    # No transaction to join: the caller asked for none, so the statement is its own.
    autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
    async with autocommit.connect() as connection:
        await enqueue(connection, _mail())
        await connection.rollback()
    assert await _count(db) == 1


async def test_enqueue_refuses_what_it_cannot_run_on(engine: AsyncEngine) -> None:
    with pytest.raises(TypeError, match="asyncpg connection or a SQLAlchemy"):
        await enqueue(object(), _mail())  # type: ignore[arg-type]
    sync_engine = engine.sync_engine
    with pytest.raises(TypeError, match="AsyncSession"):
        await enqueue(sync_engine, _mail())  # type: ignore[arg-type]


# --- Idempotency keys -------------------------------------------------------------------------


@pytest.mark.parametrize(("first", "second"), [(k, k) for k in KINDS] + [("asyncpg", "session")])
async def test_a_key_used_again_later_returns_the_first_mail(
    first: str,
    second: str,
    db: asyncpg.Pool,
    engine: AsyncEngine,
    notices: asyncio.Queue[str],
) -> None:
    async with begun(first, db, engine) as tx:
        made = await enqueue(tx.executor, _mail(), key="welcome:42", priority=1)
        await tx.commit()
    assert await asyncio.wait_for(notices.get(), timeout=5) == "1"
    assert made.key == "welcome:42" and not made.existed

    async with begun(second, db, engine) as tx:
        again = await enqueue(tx.executor, _mail("someone@example.org"), key="welcome:42")
        await tx.commit()
    assert again == Enqueued(made.id, made.message_id, made.created_at, "welcome:42", True)
    assert await _next_notice(db, notices) == "marker"  # the repeat woke nobody
    assert await _count(db) == await _count(db, "outbox_keys") == 1
    row = await db.fetchrow("SELECT recipient, idempotency_key FROM outbox")
    assert tuple(row) == ("ada@example.org", "welcome:42")


async def test_a_key_used_twice_in_one_transaction_stores_one_mail(db: asyncpg.Pool) -> None:
    async with db.acquire() as conn, conn.transaction():
        made = await enqueue(conn, _mail(), key="k")
        again = await enqueue(conn, _mail(), key="k")
        other = await enqueue(conn, _mail(), key="K")  # keys are compared exactly
    assert again.existed and again.id == made.id and again.message_id == made.message_id
    assert not other.existed and other.id != made.id
    assert await _count(db) == 2


async def _blocked_on_a_lock(db: asyncpg.Pool) -> None:
    """Until one backend of this database waits for a lock."""
    for _ in range(500):
        waiting = await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        if waiting:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the second enqueue never waited for the first")


async def _enqueue_and_commit(tx: Tx, mail: Mail, key: str) -> Enqueued:
    queued = await enqueue(tx.executor, mail, key=key)
    await tx.commit()
    return queued


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("outcome", ["commit", "rollback"])
async def test_concurrent_enqueues_of_one_key_make_one_mail(
    kind: str, outcome: str, db: asyncpg.Pool, engine: AsyncEngine
) -> None:
    async with begun(kind, db, engine) as one, begun(kind, db, engine) as two:
        first = await enqueue(one.executor, _mail(), key="welcome:7")
        second = asyncio.create_task(_enqueue_and_commit(two, _mail("b@example.org"), "welcome:7"))
        await _blocked_on_a_lock(db)  # on the first one's uncommitted key
        assert not second.done()
        await (one.commit if outcome == "commit" else one.rollback)()
        result = await asyncio.wait_for(second, timeout=10)
    assert await _count(db) == await _count(db, "outbox_keys") == 1
    stored = await db.fetchrow("SELECT id, message_id, recipient FROM outbox")
    if outcome == "commit":
        assert result.existed
        assert (result.id, result.message_id) == (first.id, first.message_id)
        assert stored["recipient"] == "ada@example.org"
    else:
        assert not result.existed
        assert result.id != first.id
        assert stored["recipient"] == "b@example.org"
    assert (stored["id"], stored["message_id"]) == (result.id, result.message_id)


async def test_a_key_outlives_its_mail_and_goes_only_with_its_own_window(
    db: asyncpg.Pool,
) -> None:
    async with db.acquire() as conn:
        made = await enqueue(conn, _mail(), key="welcome:1")
        kept = await enqueue(conn, _mail(), key="welcome:2")  # a failed mail, never pruned
        await set_status(db, made.id, "sent")
        await set_status(db, kept.id, "failed")
        for outbox_id in (made.id, kept.id):
            await backdate(db, outbox_id, 40 * DAY)
        await conn.execute("UPDATE outbox_keys SET created_at = created_at - interval '40 days'")

        pruned = await ops.prune(conn, older_than=30 * DAY, keys_older_than=400 * DAY)
        assert pruned.total == 1 and pruned.keys_deleted == 0
        assert await _count(db) == 1 and await _count(db, "outbox_keys") == 2
        # The mail is gone; its key still answers, with what the first enqueue returned.
        again = await enqueue(conn, _mail(), key="welcome:1")
        assert (again.existed, again.id, again.message_id) == (True, made.id, made.message_id)
        assert again.created_at == made.created_at - 40 * DAY
        assert await _count(db) == 1

        # Past its own window the key goes, unless its mail is still there.
        await conn.execute("UPDATE outbox_keys SET created_at = created_at - interval '1 year'")
        dry = await ops.prune(conn, older_than=30 * DAY, keys_older_than=400 * DAY, dry_run=True)
        assert (dry.total, dry.keys_deleted) == (0, 1)
        steps: list[ops.PruneResult] = []
        pruned = await ops.prune(
            conn,
            older_than=30 * DAY,
            keys_older_than=400 * DAY,
            batch_size=1,
            progress=steps.append,
        )
        assert (pruned.total, pruned.keys_deleted) == (0, 1)
        assert steps[-1] == pruned
        assert [r["key"] for r in await conn.fetch("SELECT key FROM outbox_keys")] == ["welcome:2"]
        # A freed key makes a new mail.
        fresh = await enqueue(conn, _mail(), key="welcome:1")
        assert not fresh.existed and fresh.id not in (made.id, kept.id)


async def test_prune_refuses_a_key_window_shorter_than_the_mails(db: asyncpg.Pool) -> None:
    async with db.acquire() as conn:
        with pytest.raises(ValueError, match="keys_older_than"):
            await ops.prune(conn, older_than=30 * DAY, keys_older_than=7 * DAY)


async def test_keys_show_in_show_and_filter_list(db: asyncpg.Pool) -> None:
    async with db.acquire() as conn:
        made = await enqueue(conn, _mail(), key="receipt:9")
        await enqueue(conn, _mail())
        detail = await ops.show(conn, made.id)
        assert detail is not None and detail.row.idempotency_key == "receipt:9"
        page = await ops.list_mail(conn, key="receipt:9")
        assert [r.id for r in page.items] == [made.id]
        assert (await ops.list_mail(conn, key="receipt:10")).items == ()
        assert len((await ops.list_mail(conn)).items) == 2


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("", "1 to 200 characters"),
        ("x" * (MAX_KEY_LENGTH + 1), "1 to 200 characters"),
        ("a\x00b", "control characters"),
        ("a\ud800b", "lone surrogates"),
        ("a\nb", "control characters"),
        ("a\u202eb", "bidirectional"),
    ],
)
async def test_unstorable_keys_are_refused_before_any_sql(
    key: str, message: str, db: asyncpg.Pool
) -> None:
    async with db.acquire() as conn:
        with pytest.raises(ValueError, match=message):
            await enqueue(conn, _mail(), key=key)
    assert await _count(db) == 0


async def test_the_longest_key_and_any_plain_unicode_are_fine(db: asyncpg.Pool) -> None:
    async with db.acquire() as conn:
        for key in ("x" * MAX_KEY_LENGTH, "bienvenue:Zoë:🙂", "=?utf-8?q?x?="):
            assert not (await enqueue(conn, _mail(), key=key)).existed
    assert await _count(db, "outbox_keys") == 3


async def test_the_database_bounds_keys_too(db: asyncpg.Pool) -> None:
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute(
            "INSERT INTO outbox_keys (key, outbox_id, message_id) VALUES ($1, 1, '<x@y>')",
            "x" * (MAX_KEY_LENGTH + 1),
        )


# --- Mail and sender -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("to", "expected"),
    [
        ("ada@example.com", ("", "ada", "example.com")),
        ("Ada Lovelace <ada@example.com>", ("Ada Lovelace", "ada", "example.com")),
        ('"Lovelace, Ada" <ada@example.com>', ("Lovelace, Ada", "ada", "example.com")),
        ("Jürgen <jürgen@bücher.de>", ("Jürgen", "jürgen", "bücher.de")),
        (
            Address("=?utf-8?q?Eve?=", "eve", "example.com"),
            ("=?utf-8?q?Eve?=", "eve", "example.com"),
        ),
    ],
)
def test_mail_takes_an_address_or_a_string(
    to: str | Address, expected: tuple[str, str, str]
) -> None:
    mail = Mail(to, "Hi", "Hello")
    assert isinstance(mail.recipient, Address)
    found = mail.recipient
    assert (found.display_name, found.username, found.domain) == expected
    assert mail == Mail(recipient=to, subject="Hi", body_text="Hello", body_html=None)


@pytest.mark.parametrize(
    ("to", "message"),
    [
        ("a@example.com, b@example.com", "not one address"),
        ("Ada", "not one address"),
        ("Ada <ada@>", "not one address"),
        ("friends: a@example.com;", "not one address"),
        ("=?utf-8?q?Eve?= <eve@example.com>", "encoded word"),
        ("Ada\r\nBcc: x@example.com <ada@example.com>", "control characters"),
        ("Ada <ada@xn--a.example>", "domain"),
        ("Eve <a=?b@example.com>", "encoded"),
    ],
)
def test_mail_refuses_a_string_that_is_not_one_sendable_address(to: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Mail(to, "Hi", "Hello")


async def test_the_default_sender_is_configurable(
    db: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAIL_FROM", "Shop <orders@shop.example>")
    set_default_sender(None)  # read again from MAIL_FROM
    try:
        async with db.acquire() as conn:
            from_env = await enqueue(conn, _mail())
            set_default_sender("Billing <billing@example.net>")
            configured = await enqueue(conn, _mail())
            await enqueue(conn, _mail(), sender=Address("Me", "me", "example.com"))
            with pytest.raises(ValueError, match="sender"):
                await enqueue(conn, _mail(), sender="not an address")
        assert from_env.message_id.endswith("@shop.example>")
        assert configured.message_id.endswith("@example.net>")
        senders = [r["sender"] for r in await db.fetch("SELECT sender FROM outbox ORDER BY id")]
        assert senders == [
            "Shop <orders@shop.example>",
            "Billing <billing@example.net>",
            "Me <me@example.com>",
        ]
    finally:
        set_default_sender(None)


# --- Migration 0004 -------------------------------------------------------------------------


async def test_0004_up_and_down_keeps_the_mail(empty_database_url: str) -> None:
    url = empty_database_url
    await asyncio.to_thread(migrate.upgrade, url, "0003")
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await conn.execute(
            "INSERT INTO outbox (message_id, sender, recipient, subject, body_text) "
            "VALUES ('<old@example.org>', 'Outbox <noreply@example.org>', 'ada@example.org', "
            "'Hi', 'Hello')"
        )
        await asyncio.to_thread(migrate.upgrade, url, "0004")
        assert await conn.fetchval("SELECT idempotency_key FROM outbox") is None
        # (SQL of its own: enqueue's statements follow the head of the schema.)
        add_key = "INSERT INTO outbox_keys (key, outbox_id, message_id) VALUES ($1, $2, $3)"
        await conn.execute(add_key, "welcome:1", 1, "<old@example.org>")
        await conn.execute("UPDATE outbox SET idempotency_key = 'welcome:1'")
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute(add_key, "welcome:1", 2, "<new@example.org>")

        await asyncio.to_thread(migrate.downgrade, url, "0003")
        assert await conn.fetchval("SELECT to_regclass('outbox_keys')") is None
        columns = await conn.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'outbox'"
        )
        assert "idempotency_key" not in {c["column_name"] for c in columns}
        assert await conn.fetchval("SELECT count(*) FROM outbox") == 1  # the mail stays

        await asyncio.to_thread(migrate.upgrade, url, "0004")
        assert await conn.fetchval("SELECT count(*) FROM outbox_keys") == 0
    finally:
        await conn.close()
