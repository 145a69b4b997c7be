"""Test harness: a real PostgreSQL, a template database migrated once, a fresh database per test.

By default an embedded server (the pgserver wheel) is started for the session in a
temporary folder. Set TEST_DATABASE_URL to a server where the user may CREATE DATABASE to
use that instead.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest

from outbox.cli import migrate
from outbox.cli.embedded_pg import EmbeddedPostgres
from outbox.dispatcher.db import asyncpg_dsn
from tests.asgi import ADMIN_TOKEN, admin_client
from tests.smtp_server import SmtpServer

TEMPLATE = "outbox_test_template"


@dataclass
class PgServer:
    """The session's PostgreSQL server; ``embedded`` is None for an external one."""

    admin_url: str
    embedded: EmbeddedPostgres | None

    def url(self, database: str) -> str:
        parts = urlsplit(asyncpg_dsn(self.admin_url))
        return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, ""))


async def _admin(url: str, *statements: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """A PostgreSQL server with a migrated template database."""
    external = os.environ.get("TEST_DATABASE_URL")
    root = None
    embedded = None
    if external:
        admin_url = external
    else:
        root = Path(tempfile.mkdtemp(prefix="outbox-test-pg-"))
        embedded = EmbeddedPostgres(
            root,
            # A throwaway cluster: durability is not under test, speed is welcome.
            settings={
                "fsync": "off",
                "synchronous_commit": "off",
                "full_page_writes": "off",
                "max_connections": "300",
            },
        )
        admin_url = embedded.start()
    server = PgServer(admin_url, embedded)
    asyncio.run(
        _admin(
            admin_url,
            f"DROP DATABASE IF EXISTS {TEMPLATE} WITH (FORCE)",
            f"CREATE DATABASE {TEMPLATE}",
        )
    )
    migrate.upgrade(server.url(TEMPLATE))
    try:
        yield server
    finally:
        if embedded is not None:
            embedded.stop("immediate")
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)


_counter = itertools.count()


@pytest.fixture
async def database_url(pg_server: PgServer) -> AsyncIterator[str]:
    """A fresh, migrated database for this test alone (dropped afterwards)."""
    name = f"outbox_test_{os.getpid()}_{next(_counter)}"
    await _admin(pg_server.admin_url, f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
    try:
        yield pg_server.url(name)
    finally:
        await _admin(pg_server.admin_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A connection pool on the test's database."""
    pool = await asyncpg.create_pool(asyncpg_dsn(database_url), min_size=1, max_size=5)
    assert pool is not None
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
def smtp_server() -> Iterator[SmtpServer]:
    """A real SMTP server (aiosmtpd) whose replies a test can script."""
    server = SmtpServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def smtputf8_server() -> Iterator[SmtpServer]:
    """A real SMTP server that offers SMTPUTF8 (RFC 6531)."""
    server = SmtpServer(enable_SMTPUTF8=True).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def empty_database_url(pg_server: PgServer) -> AsyncIterator[str]:
    """A fresh database with no schema at all (for migration and start-up tests)."""
    name = f"outbox_empty_{os.getpid()}_{next(_counter)}"
    await _admin(pg_server.admin_url, f"CREATE DATABASE {name}")
    try:
        yield pg_server.url(name)
    finally:
        await _admin(pg_server.admin_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
async def admin(database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client of an app with ADMIN_TOKEN configured (requests still need ``AUTH``)."""
    async with admin_client(database_url, ADMIN_TOKEN) as client:
        yield client


@pytest.fixture
async def no_token(database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client of an app without ADMIN_TOKEN: its admin endpoints are closed."""
    async with admin_client(database_url, None) as client:
        yield client
