"""The example app (examples/signup): an application's own tables and endpoints, its mail
put in the outbox in the same SQLAlchemy transaction as its write, on a database migrated
with ``--without-registration``."""

from __future__ import annotations

import asyncio
import email
import itertools
import os
import re
from collections.abc import AsyncIterator, Iterator
from email.policy import default as default_policy

import asyncpg
import httpx
import pytest
from signup import accounts
from signup.app import create_app, engine_url
from signup.models import create_tables
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from outbox.cli import migrate
from outbox.dispatcher import startup
from outbox.dispatcher.db import asyncpg_dsn
from tests.asgi import app_client
from tests.conftest import PgServer, _admin
from tests.dispatching import running_dispatcher, wait_until
from tests.smtp_server import SmtpServer

APP_URL = "https://app.example.org"
_numbers = itertools.count()


@pytest.fixture(scope="module")
def app_template(pg_server: PgServer) -> Iterator[str]:
    """A database as the app runs on: the outbox without registration, the app's tables."""
    name = f"signup_template_{os.getpid()}"
    asyncio.run(
        _admin(
            pg_server.admin_url,
            f"DROP DATABASE IF EXISTS {name} WITH (FORCE)",
            f"CREATE DATABASE {name}",
        )
    )
    url = pg_server.url(name)
    migrate.upgrade(url, registration=False)

    async def tables() -> None:
        engine = create_async_engine(engine_url(url))
        try:
            await create_tables(engine)
        finally:
            await engine.dispose()

    asyncio.run(tables())
    try:
        yield name
    finally:
        asyncio.run(_admin(pg_server.admin_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture
async def app_database(pg_server: PgServer, app_template: str) -> AsyncIterator[str]:
    name = f"signup_{os.getpid()}_{next(_numbers)}"
    await _admin(pg_server.admin_url, f"CREATE DATABASE {name} TEMPLATE {app_template}")
    try:
        yield pg_server.url(name)
    finally:
        await _admin(pg_server.admin_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
async def db(app_database: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(asyncpg_dsn(app_database), min_size=1, max_size=3)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
async def client(app_database: str) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(app_database, APP_URL)
    async with app_client(app) as http:
        yield http


@pytest.fixture
async def engine(app_database: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(engine_url(app_database))
    try:
        yield engine
    finally:
        await engine.dispose()


async def _count(db: asyncpg.Pool, table: str) -> int:
    count: int = await db.fetchval(f"SELECT count(*) FROM {table}")
    return count


async def test_the_apps_users_table_is_its_own(db: asyncpg.Pool) -> None:
    columns = await db.fetch(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'users' "
        "ORDER BY ordinal_position"
    )
    assert [c[0] for c in columns] == ["id", "email", "display_name", "signed_up_at"]
    assert await db.fetchval("SELECT to_regclass('registration_keys')") is None
    assert await db.fetchval("SELECT version_num FROM outbox_alembic_version") == max(
        startup.head_revisions()
    )


async def test_signup_commits_the_user_and_the_welcome_mail(
    client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    response = await client.post(
        "/signup", json={"email": "ada@example.org", "display_name": "Ada Lovelace"}
    )
    assert response.status_code == 201, response.text
    body = response.json()
    mail = await db.fetchrow("SELECT * FROM outbox")
    assert mail is not None
    assert (mail["id"], mail["message_id"]) == (body["welcome_mail_id"], body["message_id"])
    assert (mail["recipient"], mail["recipient_name"]) == ("ada@example.org", "Ada Lovelace")
    assert mail["idempotency_key"] == f"welcome:{body['id']}"
    assert mail["status"] == "pending"
    user = await db.fetchrow("SELECT * FROM users")
    assert (user["id"], user["email"], user["display_name"]) == (
        body["id"],
        "ada@example.org",
        "Ada Lovelace",
    )


async def test_signing_up_again_gives_the_same_user_and_one_mail(
    client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    first = await client.post("/signup", json={"email": "ada@example.org", "display_name": "Ada"})
    again = await client.post("/signup", json={"email": "ADA@example.org", "display_name": "A"})
    assert (first.status_code, again.status_code) == (201, 200), again.text
    assert again.json() == first.json()
    assert await _count(db, "users") == await _count(db, "outbox") == 1


async def test_concurrent_first_signups_make_one_user_and_one_mail(
    client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    signup = {"email": "bob@example.org", "display_name": "Bob"}
    responses = await asyncio.gather(*(client.post("/signup", json=signup) for _ in range(5)))
    assert sorted(r.status_code for r in responses) == [200, 200, 200, 200, 201]
    assert len({r.json()["message_id"] for r in responses}) == 1
    assert await _count(db, "users") == await _count(db, "outbox") == 1


class _Abort(Exception):
    pass


@pytest.mark.parametrize("write", ["signup", "password reset"])
async def test_a_rolled_back_transaction_leaves_no_write_and_no_mail(
    write: str, engine: AsyncEngine, db: asyncpg.Pool
) -> None:
    async with AsyncSession(engine) as session, session.begin():
        await accounts.sign_up(session, "ada@example.org", "Ada")
    async with AsyncSession(engine) as session:
        with pytest.raises(_Abort):
            async with session.begin():
                if write == "signup":
                    await accounts.sign_up(session, "bob@example.org", "Bob")
                else:
                    queued = await accounts.request_password_reset(
                        session, "ada@example.org", f"{APP_URL}/reset-password"
                    )
                    assert queued is not None
                raise _Abort  # anything failing later in the request
    assert await _count(db, "users") == await _count(db, "outbox") == 1
    assert await _count(db, "password_resets") == 0


async def test_a_bad_address_is_refused_before_anything_is_written(
    client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    for bad in ("not an address", "ada@", "ada@example.org\r\nBcc: eve@example.org"):
        response = await client.post("/signup", json={"email": bad, "display_name": "Ada"})
        assert response.status_code == 422, (bad, response.text)
    line_break = await client.post(
        "/signup", json={"email": "ada@example.org", "display_name": "Ada\nBcc: x"}
    )
    assert line_break.status_code == 422, line_break.text
    assert await _count(db, "users") == await _count(db, "outbox") == 0


async def test_password_reset_mails_a_link_that_works_once_stored(
    client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    await client.post("/signup", json={"email": "ada@example.org", "display_name": "Ada"})
    asked = await client.post("/password-reset", json={"email": "Ada@Example.org"})
    nobody = await client.post("/password-reset", json={"email": "eve@example.org"})
    assert asked.status_code == nobody.status_code == 202
    assert asked.json() == nobody.json()  # tells nobody who has an account
    mail = await db.fetchrow("SELECT * FROM outbox WHERE idempotency_key IS NULL")
    assert mail["recipient"] == "ada@example.org"
    assert await _count(db, "outbox") == 2 and await _count(db, "password_resets") == 1
    found = re.search(re.escape(APP_URL) + r"/reset-password\?token=([\w-]+)", mail["body_text"])
    assert found is not None, mail["body_text"]
    token = found.group(1)
    assert token not in str(await db.fetch("SELECT * FROM password_resets"))  # only its hash
    good = await client.get("/reset-password", params={"token": token})
    assert good.status_code == 200 and good.json() == {"email": "ada@example.org"}
    bad = await client.get("/reset-password", params={"token": token[:-1]})
    assert bad.status_code == 404


async def test_the_welcome_mail_is_delivered(
    app_database: str, client: httpx.AsyncClient, smtp_server: SmtpServer
) -> None:
    response = await client.post(
        "/signup", json={"email": "grace@example.org", "display_name": "Grace Hopper"}
    )
    assert response.status_code == 201, response.text
    async with running_dispatcher(app_database, smtp_server):
        await wait_until(lambda: len(smtp_server.received) == 1, what="the welcome mail")
        await asyncio.sleep(0.3)  # and no second one
    (received,) = smtp_server.received
    assert received.message_id == response.json()["message_id"]
    message = email.message_from_bytes(received.data, policy=default_policy)
    assert str(message["To"]) == "Grace Hopper <grace@example.org>"
    assert message["Subject"] == "Welcome to Signup example"
    body = message.get_body(("plain",))
    assert body is not None and "Hello Grace Hopper," in body.get_content()
