"""The outbox in an application's database: its own version table next to the
application's Alembic history, installed without the registration tables next to the
application's own ``users``, and a history kept in ``alembic_version`` by earlier
versions adopted."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from alembic import command
from alembic.config import Config

from outbox.cli import migrate
from outbox.dispatcher import startup
from outbox.dispatcher.db import asyncpg_dsn, sqlalchemy_url
from outbox.dispatcher.outbox import Mail, enqueue
from tests.asgi import app_client

PROJECT = Path(__file__).resolve().parent.parent
OUTBOX = str(Path(sys.executable).with_name("outbox"))
ALEMBIC = str(Path(sys.executable).with_name("alembic"))
(HEAD,) = startup.head_revisions()
OUTBOX_TABLES = {"outbox", "outbox_attempts", "dispatchers", "outbox_keys"}
NO_DEV = str(Path(tempfile.gettempdir()) / "outbox-tests-no-dev-here")

# --- An application with Alembic migrations of its own ---------------------------------------

HOST_ENV = """
import asyncio

from alembic import context
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool


def run(connection):
    context.configure(connection=connection)  # the default version table, alembic_version
    with context.begin_transaction():
        context.run_migrations()


async def main():
    engine = create_async_engine(context.config.attributes["url"], poolclass=NullPool)
    async with engine.connect() as connection:
        await connection.run_sync(run)
        await connection.commit()
    await engine.dispose()


asyncio.run(main())
"""

# Its revision ids look like the outbox's on purpose: they are never taken for its history.
HOST_REVISIONS = {
    "0001": (
        None,
        [
            """
            CREATE TABLE users (
                id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
                username       text NOT NULL UNIQUE,
                email_address  text NOT NULL
            )
            """,
            "INSERT INTO users (username, email_address) VALUES ('ada', 'ada@example.org')",
        ],
        ["DROP TABLE users"],
    ),
    "0002": (
        "0001",
        ["ALTER TABLE users ADD COLUMN last_seen_at timestamptz"],
        ["ALTER TABLE users DROP COLUMN last_seen_at"],
    ),
}

HOST_SCRIPT = """
from alembic import op

revision = {revision!r}
down_revision = {down!r}


def upgrade():
    for statement in {up!r}:
        op.execute(statement)


def downgrade():
    for statement in {down_sql!r}:
        op.execute(statement)
"""


def _host_config(root: Path, url: str) -> Config:
    """The application's own Alembic project (written under ``root``)."""
    versions = root / "versions"
    if not versions.exists():
        versions.mkdir(parents=True)
        (root / "env.py").write_text(HOST_ENV)
        for revision, (down, up, down_sql) in HOST_REVISIONS.items():
            script = HOST_SCRIPT.format(revision=revision, down=down, up=up, down_sql=down_sql)
            (versions / f"{revision}_host.py").write_text(script)
    config = Config()
    config.set_main_option("script_location", str(root))
    config.attributes["url"] = sqlalchemy_url(url)
    return config


async def _host_upgrade(root: Path, url: str, revision: str) -> None:
    await asyncio.to_thread(command.upgrade, _host_config(root, url), revision)


# --- Looking at the database ------------------------------------------------------------------


@pytest.fixture
async def conn(empty_database_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(asyncpg_dsn(empty_database_url))
    try:
        yield connection
    finally:
        await connection.close()


async def _tables(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {row["tablename"] for row in rows}


async def _versions(conn: asyncpg.Connection, table: str) -> set[str]:
    if await conn.fetchval("SELECT to_regclass($1)", table) is None:
        return set()
    return {row[0] for row in await conn.fetch(f"SELECT version_num FROM {table}")}


async def _columns(conn: asyncpg.Connection, table: str) -> list[str]:
    rows = await conn.fetch(
        "SELECT column_name FROM information_schema.columns WHERE table_name = $1 "
        "ORDER BY ordinal_position",
        table,
    )
    return [row["column_name"] for row in rows]


async def _schema(conn: asyncpg.Connection) -> dict[str, list[tuple[object, ...]]]:
    """Every table's columns and every index's definition, but the outbox's version table."""
    columns = await conn.fetch(
        "SELECT table_name, column_name, data_type, is_nullable, column_default "
        "FROM information_schema.columns "
        "WHERE table_schema = 'public' AND table_name <> 'outbox_alembic_version' "
        "ORDER BY table_name, ordinal_position"
    )
    indexes = await conn.fetch(
        "SELECT indexname, indexdef FROM pg_indexes "
        "WHERE schemaname = 'public' AND tablename <> 'outbox_alembic_version' ORDER BY 1"
    )
    return {"columns": [tuple(c) for c in columns], "indexes": [tuple(i) for i in indexes]}


def _outbox(*args: str, url: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The installed ``outbox`` command, run from ``cwd``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DATABASE_URL", "SMTP_", "DISPATCHER_", "LOG_"))
    }
    env.update(DATABASE_URL=url, OUTBOX_DATA_DIR=NO_DEV)
    done = subprocess.run(
        [OUTBOX, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done


# --- Installing next to an application -------------------------------------------------------


async def test_an_app_with_its_own_history_and_users_gets_the_outbox_tables(
    empty_database_url: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    url = empty_database_url
    host = tmp_path / "host_migrations"
    await _host_upgrade(host, url, "0001")
    users = await conn.fetch("SELECT * FROM users")
    user_columns = await _columns(conn, "users")

    done = await asyncio.to_thread(
        _outbox, "migrate", "--without-registration", url=url, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert "schema is at head" in done.stdout

    tables = await _tables(conn)
    assert tables >= OUTBOX_TABLES | {"users", "alembic_version", "outbox_alembic_version"}
    assert "registration_keys" not in tables
    # Two histories, side by side; the application's table is as it was.
    assert await _versions(conn, "alembic_version") == {"0001"}
    assert await _versions(conn, "outbox_alembic_version") == {HEAD}
    assert await _columns(conn, "users") == user_columns
    assert await conn.fetch("SELECT * FROM users") == users
    note = await conn.fetchval("SELECT obj_description('outbox_alembic_version'::regclass)")
    assert note == startup.WITHOUT_REGISTRATION

    # The application migrates on; the outbox migrates again, without the option: the
    # choice made at installation holds, and neither touches the other's history.
    await _host_upgrade(host, url, "head")
    again = await asyncio.to_thread(_outbox, "migrate", url=url, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert await _versions(conn, "alembic_version") == {"0002"}
    assert await _versions(conn, "outbox_alembic_version") == {HEAD}
    assert await _columns(conn, "users") == [*user_columns, "last_seen_at"]
    assert "registration_keys" not in await _tables(conn)

    # The library, the dispatcher's check and the audit commands work on it.
    async with conn.transaction():
        await enqueue(conn, Mail("ada@example.org", "Hi", "Hello"), key="welcome:ada")
    assert await startup.check(url) == HEAD
    status = await asyncio.to_thread(_outbox, "status", url=url, cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    pruned = await asyncio.to_thread(_outbox, "prune", "--older-than", "30d", url=url, cwd=tmp_path)
    assert pruned.returncode == 0, pruned.stderr
    assert "registration keys" not in pruned.stdout

    # The registration service's check says what is missing.
    with pytest.raises(startup.StartupError) as caught:
        await startup.check_schema(conn, registration=True)
    assert caught.value.exit_code == startup.CONFIGURATION
    assert "--without-registration" in str(caught.value)
    assert "users and registration_keys" in str(caught.value)


async def test_the_registration_service_reports_the_missing_tables(
    empty_database_url: str,
) -> None:
    from outbox.api.app import create_app
    from outbox.dispatcher.settings import Settings

    await asyncio.to_thread(migrate.upgrade, empty_database_url, registration=False)
    app = create_app(Settings(database_url=empty_database_url))
    async with app_client(app) as http:
        ready = await http.get("/readyz")
        register = await http.post("/register", json={"email": "a@example.org", "name": "A"})
    assert ready.status_code == 503
    assert ready.json()["database"] == "misconfigured"
    assert "--without-registration" in ready.json()["reason"]
    assert register.status_code == 503


async def test_round_trips_leave_the_apps_tables_alone(
    empty_database_url: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    url = empty_database_url
    await _host_upgrade(tmp_path / "host_migrations", url, "head")
    before = await _schema(conn)

    await asyncio.to_thread(migrate.upgrade, url, "0002", registration=False)
    await asyncio.to_thread(migrate.upgrade, url)  # the choice holds without the option
    installed = await _schema(conn)
    for revision in ("0004", "0002", "0001", "base"):  # down step by step
        await asyncio.to_thread(migrate.downgrade, url, revision)
        assert await _versions(conn, "outbox_alembic_version") == (
            set() if revision == "base" else {revision}
        )
    # All of the outbox is gone (its empty version table stays, as Alembic leaves it).
    assert await _schema(conn) == before
    assert await conn.fetchval("SELECT obj_description('outbox_alembic_version'::regclass)") is None
    assert await _versions(conn, "alembic_version") == {"0002"}

    await asyncio.to_thread(migrate.upgrade, url, registration=False)
    assert await _schema(conn) == installed


async def test_the_choice_is_made_anew_on_an_empty_history(
    empty_database_url: str, conn: asyncpg.Connection
) -> None:
    url = empty_database_url
    await asyncio.to_thread(migrate.upgrade, url, registration=False)
    await asyncio.to_thread(migrate.downgrade, url, "base")
    await asyncio.to_thread(migrate.upgrade, url)
    assert {"users", "registration_keys"} <= await _tables(conn)
    await startup.check_schema(conn, registration=True)


async def test_without_registration_is_refused_for_a_database_that_has_it(
    database_url: str, tmp_path: Path
) -> None:
    done = await asyncio.to_thread(
        _outbox, "migrate", "--without-registration", url=database_url, cwd=tmp_path
    )
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line == (
        "outbox migrate: this database was migrated with the registration tables "
        "(users, registration_keys): migrate it without --without-registration"
    )


@pytest.mark.parametrize("option", ["without-registration", "without-registration=true"])
async def test_plain_alembic_takes_the_option_too(
    empty_database_url: str, conn: asyncpg.Connection, option: str
) -> None:
    env = {**os.environ, "DATABASE_URL": empty_database_url}
    done = await asyncio.to_thread(
        subprocess.run,
        [ALEMBIC, "-x", option, "upgrade", "head"],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    tables = await _tables(conn)
    assert tables >= OUTBOX_TABLES
    assert not {"users", "registration_keys"} & tables
    assert await _versions(conn, "outbox_alembic_version") == {HEAD}


# --- A history kept in alembic_version by an earlier version ----------------------------------


async def _legacy(conn: asyncpg.Connection, url: str, revision: str) -> None:
    """A database as an earlier version left it: at ``revision``, in ``alembic_version``."""
    await asyncio.to_thread(migrate.upgrade, url, revision)
    await conn.execute("ALTER TABLE outbox_alembic_version RENAME TO alembic_version")
    await conn.execute("ALTER INDEX outbox_alembic_version_pkc RENAME TO alembic_version_pkc")
    await conn.execute(
        "INSERT INTO users (email, name) VALUES ('ada@example.org', 'Ada')"
        if revision < "0003"
        else "INSERT INTO users (email, email_key, name) "
        "VALUES ('ada@example.org', 'ada@example.org', 'Ada')"
    )
    await conn.execute(
        "INSERT INTO outbox (message_id, sender, recipient, subject, body_text) "
        "VALUES ('<old@example.org>', 'Outbox <noreply@example.org>', 'ada@example.org', "
        "'Hi', 'Hello')"
        if revision < "0007"
        else "INSERT INTO outbox (message_id, sender, recipient, subject, body_text, "
        "recipient_domain, recipient_key) VALUES ('<old@example.org>', "
        "'Outbox <noreply@example.org>', 'ada@example.org', 'Hi', 'Hello', 'example.org', "
        "'ada@example.org')"
    )


@pytest.mark.parametrize("revision", ["0001", "0003", HEAD])
async def test_a_history_in_alembic_version_is_adopted(
    empty_database_url: str, conn: asyncpg.Connection, tmp_path: Path, revision: str
) -> None:
    url = empty_database_url
    await _legacy(conn, url, revision)
    with pytest.raises(startup.StartupError) as caught:
        await startup.check_schema(conn)
    assert str(caught.value) == (
        f"the schema is at revision {revision} (recorded in alembic_version by an earlier "
        f"version of outbox), this version of outbox needs {HEAD}: run `outbox migrate`"
    )

    done = await asyncio.to_thread(_outbox, "migrate", url=url, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert await _versions(conn, "outbox_alembic_version") == {HEAD}
    tables = await _tables(conn)
    assert "alembic_version" not in tables
    assert "registration_keys" in tables
    assert await conn.fetchval("SELECT count(*) FROM users") == 1
    assert await conn.fetchval("SELECT message_id FROM outbox") == "<old@example.org>"
    await startup.check_schema(conn, registration=True)
    # Its primary key follows the table's new name; down and up again as usual.
    indexes = {r[0] for r in await conn.fetch("SELECT indexname FROM pg_indexes")}
    assert "outbox_alembic_version_pkc" in indexes
    await asyncio.to_thread(migrate.downgrade, url, "0002")
    await asyncio.to_thread(migrate.upgrade, url)
    assert await _versions(conn, "outbox_alembic_version") == {HEAD}


async def test_an_alembic_version_that_is_not_the_outboxs_stays(
    empty_database_url: str, conn: asyncpg.Connection
) -> None:
    url = empty_database_url
    # One of our revision ids, but no outbox tables: an application's history.
    await conn.execute(
        "CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY);"
        "INSERT INTO alembic_version VALUES ('0003')"
    )
    await asyncio.to_thread(migrate.upgrade, url)
    assert await _versions(conn, "alembic_version") == {"0003"}
    assert await _versions(conn, "outbox_alembic_version") == {HEAD}
    assert {"users", "registration_keys"} <= await _tables(conn)
