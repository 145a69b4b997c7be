"""SMTP over implicit TLS and STARTTLS with verified certificates, and AUTH."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import trustme
from aiosmtpd.smtp import AuthResult, LoginPassword

from tests.dispatching import enqueue_many, running_dispatcher, smtp_config, wait_until
from tests.smtp_server import FaultyHandler, SmtpServer


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def _authenticator(server, session, envelope, mechanism, auth_data) -> AuthResult:  # type: ignore[no-untyped-def]
    ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (
        b"mailer",
        b"s3cret-password",
    )
    return AuthResult(success=ok, handled=False)


@pytest.fixture
def tls_server(server_tls: ssl.SSLContext) -> Iterator[SmtpServer]:
    server = SmtpServer(FaultyHandler(), ssl_context=server_tls).start()
    yield server
    server.stop()


@pytest.fixture
def starttls_server(server_tls: ssl.SSLContext) -> Iterator[SmtpServer]:
    server = SmtpServer(
        FaultyHandler(),
        tls_context=server_tls,
        require_starttls=True,
        authenticator=_authenticator,
        auth_require_tls=True,
    ).start()
    yield server
    server.stop()


async def test_implicit_tls_with_a_trusted_ca_delivers(
    database_url: str, db: asyncpg.Pool, tls_server: SmtpServer, ca_file: str
) -> None:
    await enqueue_many(db, 2)
    smtp = smtp_config(tls_server, security="tls", ca_file=ca_file)
    async with running_dispatcher(database_url, tls_server, smtp=smtp):
        await wait_until(lambda: len(tls_server.received) == 2, what="delivery over TLS")


async def test_an_untrusted_certificate_is_refused(
    database_url: str, db: asyncpg.Pool, tls_server: SmtpServer
) -> None:
    await enqueue_many(db, 1)
    smtp = smtp_config(tls_server, security="tls")  # no CA file: the test CA is unknown
    async with running_dispatcher(database_url, tls_server, smtp=smtp):
        await wait_until(_attempted(db), what="a failed attempt")
    attempt = await db.fetchrow("SELECT outcome, error FROM outbox_attempts")
    assert attempt["outcome"] == "deferred"
    assert "CERTIFICATE_VERIFY_FAILED" in attempt["error"]
    assert tls_server.received == []


def _attempted(db: asyncpg.Pool):  # type: ignore[no-untyped-def]
    async def check() -> bool:
        return bool(await db.fetchval("SELECT count(*) FROM outbox_attempts"))

    return check


async def test_starttls_with_auth_delivers(
    database_url: str, db: asyncpg.Pool, starttls_server: SmtpServer, ca_file: str
) -> None:
    await enqueue_many(db, 2)
    smtp = smtp_config(
        starttls_server,
        security="starttls",
        ca_file=ca_file,
        username="mailer",
        password="s3cret-password",
    )
    async with running_dispatcher(database_url, starttls_server, smtp=smtp):
        await wait_until(lambda: len(starttls_server.received) == 2, what="delivery")


async def test_wrong_credentials_defer_and_never_fail_the_mail(
    database_url: str, db: asyncpg.Pool, starttls_server: SmtpServer, ca_file: str
) -> None:
    await enqueue_many(db, 1)
    smtp = smtp_config(
        starttls_server, security="starttls", ca_file=ca_file, username="mailer", password="wrong"
    )
    async with running_dispatcher(database_url, starttls_server, smtp=smtp, max_attempts=50):
        await wait_until(_attempted(db), what="a failed attempt")
    attempt = await db.fetchrow("SELECT outcome, smtp_code, error FROM outbox_attempts")
    assert (attempt["outcome"], attempt["smtp_code"]) == ("deferred", 535)
    assert "wrong" not in (attempt["error"] or "")  # the password never lands in the record
    assert starttls_server.received == []
