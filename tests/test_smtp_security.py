"""SMTP over implicit TLS and STARTTLS with verified certificates, and AUTH."""

from __future__ import annotations

import asyncio
import signal
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import trustme
from aiosmtpd.smtp import AuthResult, LoginPassword

from tests.dispatching import (
    enqueue_many,
    process_log,
    running_dispatcher,
    smtp_config,
    spawn_dispatcher,
    wait_until,
)
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
        error = await _reported_smtp_error(db)
    assert "CERTIFICATE_VERIFY_FAILED" in error
    # Not the mail's fault: it keeps its attempts and waits, pending.
    assert await db.fetchval("SELECT count(*) FROM outbox_attempts") == 0
    row = await db.fetchrow("SELECT status, attempts FROM outbox")
    assert tuple(row.values()) == ("pending", 0)
    assert tls_server.received == []


async def _reported_smtp_error(db: asyncpg.Pool) -> str:
    """Wait for the dispatcher's heartbeat to say why it cannot reach the server."""

    async def reported() -> bool:
        return bool(await db.fetchval("SELECT count(smtp_error) FROM dispatchers"))

    await wait_until(reported, what="the dispatcher to report the SMTP server unreachable")
    error: str = await db.fetchval("SELECT smtp_error FROM dispatchers")
    return error


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
    async with running_dispatcher(database_url, starttls_server, smtp=smtp, max_attempts=1):
        error = await _reported_smtp_error(db)
    assert "535" in error
    assert "wrong" not in error  # the password never lands in the record
    # Even with max_attempts=1 the mail is not failed: AUTH trouble is the dispatcher's.
    row = await db.fetchrow("SELECT status, attempts FROM outbox")
    assert tuple(row.values()) == ("pending", 0)
    assert starttls_server.received == []


class RecordingAuthenticator:
    """Accepts mailer/s3cret-password and records every login attempt, TLS or not."""

    def __init__(self) -> None:
        self.logins: list[tuple[str, bytes, bytes, bool]] = []

    def __call__(self, server, session, envelope, mechanism, auth_data) -> AuthResult:  # type: ignore[no-untyped-def]
        assert isinstance(auth_data, LoginPassword)
        encrypted = server.transport.get_extra_info("sslcontext") is not None
        self.logins.append((mechanism, auth_data.login, auth_data.password, encrypted))
        return _authenticator(server, session, envelope, mechanism, auth_data)


CREDENTIALS = {"SMTP_USERNAME": "mailer", "SMTP_PASSWORD": "s3cret-password"}


async def _stopped(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    return await asyncio.to_thread(proc.wait, 30)


async def test_auth_over_cleartext_is_refused_at_start_up(
    database_url: str, db: asyncpg.Pool, smtp_server: SmtpServer
) -> None:
    await enqueue_many(db, 1)
    for extra in ({}, {"SMTP_ALLOW_INSECURE_AUTH": "false"}):
        proc = spawn_dispatcher(database_url, smtp_server, "cleartext", **CREDENTIALS, **extra)
        assert await asyncio.to_thread(proc.wait, 30) == 2
        assert process_log(proc).splitlines() == [
            "invalid setting SMTP_SECURITY: AUTH would send SMTP_PASSWORD in cleartext; "
            "use starttls or tls, or set SMTP_ALLOW_INSECURE_AUTH=true for a local relay"
        ]
    assert await db.fetchval("SELECT count(*) FROM outbox_attempts") == 0
    assert smtp_server.received == []


async def test_auth_over_cleartext_to_a_local_relay_when_allowed(
    database_url: str, db: asyncpg.Pool
) -> None:
    authenticator = RecordingAuthenticator()
    server = SmtpServer(
        FaultyHandler(), authenticator=authenticator, auth_require_tls=False
    ).start()
    try:
        queued = await enqueue_many(db, 2)
        proc = spawn_dispatcher(
            database_url, server, "relay", **CREDENTIALS, SMTP_ALLOW_INSECURE_AUTH="true"
        )
        try:
            await wait_until(lambda: len(server.received) == 2, what="delivery after AUTH")
        finally:
            assert await _stopped(proc) == 0, process_log(proc)
    finally:
        server.stop()
    assert {r.message_id for r in server.received} == {q.message_id for q in queued}
    assert authenticator.logins
    for mechanism, login, password, encrypted in authenticator.logins:
        assert (login, password, encrypted) == (b"mailer", b"s3cret-password", False)
        assert mechanism in ("PLAIN", "LOGIN")
    assert "s3cret-password" not in process_log(proc)


async def test_without_a_username_nothing_is_refused_and_no_auth_is_tried(
    database_url: str, db: asyncpg.Pool
) -> None:
    authenticator = RecordingAuthenticator()
    server = SmtpServer(
        FaultyHandler(), authenticator=authenticator, auth_require_tls=False
    ).start()
    try:
        await enqueue_many(db, 1)
        # A password alone never leads to AUTH, so there is nothing to refuse.
        proc = spawn_dispatcher(database_url, server, "anonymous", SMTP_PASSWORD="unused")
        try:
            await wait_until(lambda: len(server.received) == 1, what="delivery without AUTH")
        finally:
            assert await _stopped(proc) == 0, process_log(proc)
    finally:
        server.stop()
    assert authenticator.logins == []
