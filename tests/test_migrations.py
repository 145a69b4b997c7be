"""The schema: migrations up, down and up again, and the constraints the product relies on."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from alembic.script import ScriptDirectory

from outbox.cli import migrate
from outbox.dispatcher.addresses import email_key
from outbox.dispatcher.db import asyncpg_dsn

PROJECT = Path(__file__).resolve().parent.parent
ALEMBIC = str(Path(sys.executable).with_name("alembic"))
TABLES = {"users", "outbox", "outbox_attempts", "dispatchers"}


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        yield connection
    finally:
        await connection.close()


async def _schema(url: str) -> dict[str, set[str]]:
    """Tables, indexes, sequences, functions and types in the public schema."""
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        tables = {
            r[0]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        }
        indexes = {
            r[0]
            for r in await conn.fetch(
                "SELECT indexname FROM pg_indexes WHERE schemaname = 'public'"
            )
        }
        sequences = {
            r[0]
            for r in await conn.fetch(
                "SELECT sequencename FROM pg_sequences WHERE schemaname = 'public'"
            )
        }
        functions = {
            r[0]
            for r in await conn.fetch(
                "SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
                "WHERE n.nspname = 'public'"
            )
        }
        types = {
            r[0]
            for r in await conn.fetch(
                "SELECT t.typname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace "
                "WHERE n.nspname = 'public' AND t.typtype IN ('e', 'd')"
            )
        }
        version = None
        if "outbox_alembic_version" in tables:
            version = await conn.fetchval("SELECT version_num FROM outbox_alembic_version")
    finally:
        await conn.close()
    return {
        "tables": tables,
        "indexes": indexes,
        "sequences": sequences,
        "functions": functions,
        "types": types,
        "version": {version} if version else set(),
    }


def _head() -> str:
    head = ScriptDirectory.from_config(
        migrate.alembic_config("postgresql://unused/x")
    ).get_current_head()
    assert head is not None
    return head


def test_the_migration_history_is_one_line() -> None:
    # Two people adding a revision on the same parent would fork the history.
    script = ScriptDirectory.from_config(migrate.alembic_config("postgresql://unused/x"))
    assert len(script.get_heads()) == 1, script.get_heads()
    revisions = list(script.walk_revisions())
    assert revisions[-1].down_revision is None
    for revision in revisions:
        assert revision.doc, f"revision {revision.revision} has no description"


async def test_upgrade_downgrade_upgrade_on_a_fresh_database(empty_database_url: str) -> None:
    url = empty_database_url
    assert (await _schema(url))["tables"] == set()

    await asyncio.to_thread(migrate.upgrade, url)
    first = await _schema(url)
    assert first["tables"] >= TABLES
    assert first["version"] == {_head()}
    assert {"users_email_key_key", "outbox_claim_idx"} <= first["indexes"]
    assert "users_email_lower_key" not in first["indexes"]

    await asyncio.to_thread(migrate.downgrade, url, "base")
    gone = await _schema(url)
    # Everything the migrations made is gone; only Alembic's (empty) bookkeeping table stays.
    assert gone["tables"] == {"outbox_alembic_version"}
    assert gone["indexes"] == {"outbox_alembic_version_pkc"}
    assert gone["sequences"] == set()
    assert gone["functions"] == set()
    assert gone["types"] == set()
    assert gone["version"] == set()

    await asyncio.to_thread(migrate.upgrade, url)
    assert await _schema(url) == first


async def test_upgrade_is_idempotent(empty_database_url: str) -> None:
    await asyncio.to_thread(migrate.upgrade, empty_database_url)
    before = await _schema(empty_database_url)
    await asyncio.to_thread(migrate.upgrade, empty_database_url)
    assert await _schema(empty_database_url) == before


def _alembic(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["DATABASE_URL"] = url
    return subprocess.run(
        [ALEMBIC, *args], cwd=PROJECT, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("scheme", ["postgresql", "postgresql+asyncpg"])
async def test_plain_alembic_upgrade_head_works_from_the_repository_root(
    empty_database_url: str, scheme: str
) -> None:
    url = scheme + empty_database_url[len("postgresql") :]
    done = await asyncio.to_thread(_alembic, "upgrade", "head", url=url)
    assert done.returncode == 0, done.stderr
    schema = await _schema(empty_database_url)
    assert schema["tables"] >= TABLES
    assert schema["version"] == {_head()}
    current = await asyncio.to_thread(_alembic, "current", url=url)
    assert current.returncode == 0, current.stderr
    assert f"{_head()} (head)" in current.stdout


async def test_claim_index_is_partial_on_live_statuses(conn: asyncpg.Connection) -> None:
    row = await conn.fetchrow(
        """
        SELECT pg_get_indexdef(i.indexrelid) AS definition,
               pg_get_expr(i.indpred, i.indrelid) AS predicate
        FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
        WHERE c.relname = 'outbox_claim_idx'
        """
    )
    assert row is not None
    assert "(priority, next_attempt_at)" in row["definition"]
    assert row["predicate"] is not None
    assert "'pending'" in row["predicate"] and "'sending'" in row["predicate"]
    for status in ("sent", "failed", "cancelled"):
        assert status not in row["predicate"]


ADD_USER = "INSERT INTO users (email, email_key, name) VALUES ($1, $2, $3) RETURNING id"


async def test_one_user_per_mailbox_key_in_the_database(conn: asyncpg.Connection) -> None:
    await conn.execute(ADD_USER, "Ada@Example.org", email_key("Ada@Example.org"), "Ada")
    for duplicate in ("ada@example.org", "ADA@EXAMPLE.ORG", "Ada@Example.org"):
        with pytest.raises(asyncpg.UniqueViolationError) as caught:
            await conn.execute(ADD_USER, duplicate, email_key(duplicate), "x")
        assert caught.value.constraint_name == "users_email_key_key"
    await conn.execute(ADD_USER, "ada2@example.org", email_key("ada2@example.org"), "Ada")
    # The key is required: a row written around the application cannot skip it.
    with pytest.raises(asyncpg.NotNullViolationError):
        await conn.execute("INSERT INTO users (email, name) VALUES ('cy@example.org', 'Cy')")
    assert await conn.fetchval("SELECT count(*) FROM users") == 2


async def test_user_columns_are_capped(conn: asyncpg.Connection) -> None:
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute(ADD_USER, "a@example.org", "a@example.org", "x" * 201)
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute(ADD_USER, "a" * 321, "a" * 321, "A")


async def _users_at_0002(url: str, emails: list[str]) -> list[int]:
    """Migrate to 0002 (before email_key) and add users as that schema took them."""
    await asyncio.to_thread(migrate.upgrade, url, "0002")
    old = await asyncpg.connect(asyncpg_dsn(url))
    try:
        return [
            await old.fetchval(
                "INSERT INTO users (email, name) VALUES ($1, 'Old') RETURNING id", email
            )
            for email in emails
        ]
    finally:
        await old.close()


async def test_0003_keys_existing_users(empty_database_url: str) -> None:
    url = empty_database_url
    emails = ["Ada@Example.org", "bob@bücher.de", "ΣΣ@example.org", "not-an-address"]
    ids = await _users_at_0002(url, emails)
    await asyncio.to_thread(migrate.upgrade, url)
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        rows = await conn.fetch("SELECT id, email, email_key FROM users ORDER BY id")
        assert [(r["id"], r["email"]) for r in rows] == list(zip(ids, emails, strict=True))
        assert [r["email_key"] for r in rows] == [
            "ada@example.org",
            "bob@xn--bcher-kva.de",
            "\u03c3\u03c3@example.org",  # two small sigmas
            "not-an-address",  # stored before addresses were checked: kept reachable
        ]
        # From now on the key decides: another spelling of an existing mailbox is refused.
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute(ADD_USER, "bob@xn--bcher-kva.de", "bob@xn--bcher-kva.de", "B")
    finally:
        await conn.close()


async def test_0003_stops_on_two_users_with_one_mailbox_naming_both(
    empty_database_url: str,
) -> None:
    url = empty_database_url
    # Different for lower(email) in any collation, one mailbox for email_key.
    first, _, second = await _users_at_0002(
        url, ["bob@bücher.de", "carol@example.org", "BOB@xn--bcher-kva.de"]
    )
    with pytest.raises(RuntimeError) as caught:
        await asyncio.to_thread(migrate.upgrade, url)
    message = str(caught.value)
    assert f"users {first} and {second} have the same mailbox" in message
    assert "bob@xn--bcher-kva.de" in message
    # Nothing of 0003 stayed: the schema is still at 0002, its index in place.
    schema = await _schema(url)
    assert schema["version"] == {"0002"}
    assert "users_email_lower_key" in schema["indexes"]
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        columns = await conn.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'users'"
        )
        assert "email_key" not in {c["column_name"] for c in columns}
    finally:
        await conn.close()

    # `outbox migrate` says so in one line, without a traceback, and exits 1.
    done = await asyncio.to_thread(
        subprocess.run,
        [str(Path(sys.executable).with_name("outbox")), "migrate"],
        env={**os.environ, "DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert f"users {first} and {second} have the same mailbox" in line
    assert "merge or delete one of them" in line

    # Once one of them is gone, the migration goes through.
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await conn.execute("DELETE FROM users WHERE id = $1", second)
    finally:
        await conn.close()
    await asyncio.to_thread(migrate.upgrade, url)
    assert (await _schema(url))["version"] == {_head()}


async def test_0008_keeps_one_copy_of_each_attempt_outcome(empty_database_url: str) -> None:
    url = empty_database_url
    await asyncio.to_thread(migrate.upgrade, url, "0007")
    attempt = """
        INSERT INTO outbox_attempts (outbox_id, attempt, dispatcher, started_at, finished_at,
                                     outcome)
        VALUES ($1, $2, 'd1', $3, now(), $4) RETURNING id
    """
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await conn.execute(_MAIL, "<old@example.org>", "pending", None, None, None)
        outbox_id = await conn.fetchval("SELECT id FROM outbox")
        started = await conn.fetchval("SELECT now() - interval '1 minute'")
        # A batch recorded again while its first commit was in progress wrote its
        # outcome twice; an abandoned attempt and the late outcome of the same one both stay.
        first = await conn.fetchval(attempt, outbox_id, 1, started, "deferred")
        await conn.fetchval(attempt, outbox_id, 1, started, "deferred")
        late = await conn.fetchval(attempt, outbox_id, 1, started, "abandoned")
        second = await conn.fetchval(attempt, outbox_id, 2, started, "sent")
    finally:
        await conn.close()

    await asyncio.to_thread(migrate.upgrade, url)
    schema = await _schema(url)
    assert "outbox_attempts_key_idx" in schema["indexes"]
    assert "outbox_attempts_outbox_id_idx" not in schema["indexes"]
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        kept = await conn.fetch("SELECT id FROM outbox_attempts ORDER BY id")
        assert [row["id"] for row in kept] == [first, late, second]
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute(attempt, outbox_id, 2, started, "sent")
    finally:
        await conn.close()

    await asyncio.to_thread(migrate.downgrade, url, "0007")
    schema = await _schema(url)
    assert "outbox_attempts_outbox_id_idx" in schema["indexes"]
    assert "outbox_attempts_key_idx" not in schema["indexes"]


_MAIL = """
INSERT INTO outbox (message_id, sender, recipient, recipient_domain, recipient_key,
                    subject, body_text, status, lease_token, lease_expires_at, sent_at)
VALUES ($1, 'Outbox <noreply@example.org>', 'ada@example.org', 'example.org',
        'ada@example.org', 'Hi', 'Hello', $2, $3, $4, $5)
"""


async def test_status_check_accepts_only_the_documented_statuses(
    conn: asyncpg.Connection,
) -> None:
    now = await conn.fetchval("SELECT now()")
    token = "00000000-0000-0000-0000-000000000001"
    for n, status in enumerate(["pending", "failed", "cancelled"]):
        await conn.execute(_MAIL, f"<{n}@example.org>", status, None, None, None)
    await conn.execute(_MAIL, "<s@example.org>", "sending", token, now, None)
    await conn.execute(_MAIL, "<t@example.org>", "sent", None, None, now)
    for bogus in ("done", "PENDING", "queued", "", "sent "):
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(_MAIL, f"<bogus-{bogus}@example.org>", bogus, None, None, None)
    assert await conn.fetchval("SELECT count(*) FROM outbox") == 5


async def test_state_invariants_are_enforced(conn: asyncpg.Connection) -> None:
    now = await conn.fetchval("SELECT now()")
    token = "00000000-0000-0000-0000-000000000001"
    # 'sending' needs a lease; a lease needs 'sending'.
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute(_MAIL, "<a@example.org>", "sending", None, None, None)
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute(_MAIL, "<b@example.org>", "pending", token, now, None)
    # sent_at is set exactly when the mail is sent.
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute(_MAIL, "<c@example.org>", "sent", None, None, None)
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute(_MAIL, "<d@example.org>", "pending", None, None, now)
    # The Message-ID is unique.
    await conn.execute(_MAIL, "<e@example.org>", "pending", None, None, None)
    with pytest.raises(asyncpg.UniqueViolationError):
        await conn.execute(_MAIL, "<e@example.org>", "pending", None, None, None)
    # Attempts belong to a mail, with a documented outcome.
    outbox_id = await conn.fetchval("SELECT id FROM outbox")
    attempt = """
        INSERT INTO outbox_attempts (outbox_id, attempt, dispatcher, started_at, finished_at,
                                     outcome)
        VALUES ($1, 1, 'd1', now(), now(), $2)
    """
    await conn.execute(attempt, outbox_id, "sent")
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute(attempt, outbox_id, "exploded")
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await conn.execute(attempt, outbox_id + 1000, "sent")
