"""The start-up check of every entry point, run as real processes against a real server.

A misconfigured database (a URL that does not parse, an unknown database or role, a
schema that is not at head) is one line naming DATABASE_URL or `outbox migrate`, exit
status 2; an unreachable one is one line and status 1 for the one-shot commands, and is
waited for by the dispatcher. Never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from outbox.cli import migrate
from outbox.cli.embedded_pg import free_port
from outbox.dispatcher import startup
from tests.conftest import PgServer
from tests.dispatching import (
    ROOT,
    live_dispatchers,
    process_log,
    spawn_dispatcher,
    wait_until,
)
from tests.smtp_server import SmtpServer

#: A data folder with no `outbox dev` in it: the commands must not find a developer's one.
NO_DEV = str(Path(tempfile.gettempdir()) / "outbox-tests-no-dev-here")


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return self.err.strip().splitlines()


def outbox(*args: str, timeout: float = 60, **env: str) -> Result:
    """Run ``outbox ARGS`` with ``env`` on top of a clean environment."""
    environ = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DATABASE_URL", "SMTP_", "DISPATCHER_", "LOG_"))
    }
    environ.update(OUTBOX_DATA_DIR=NO_DEV, **env)
    proc = subprocess.run(
        [sys.executable, "-m", "outbox.cli.main", *args],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    result = Result(proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in result.err, result.err
    return result


def _with(url: str, *, user: str | None = None, port: int | None = None) -> str:
    """The URL with another user name or port."""
    parts = urlsplit(url)
    assert parts.hostname is not None
    netloc = f"{user or parts.username}@{parts.hostname}:{port or parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


@pytest.fixture
async def behind_url(empty_database_url: str) -> str:
    """A database migrated to the first revision only."""
    await asyncio.to_thread(migrate.upgrade, empty_database_url, "0001")
    return empty_database_url


@pytest.fixture
async def ahead_url(database_url: str) -> str:
    """A database migrated by a newer version of outbox (a revision this one does not know)."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("UPDATE outbox_alembic_version SET version_num = 'f00d_from_the_future'")
    finally:
        await conn.close()
    return database_url


# --- the URL --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://postgres@127.0.0.1:abc/x",
        "postgresql://postgres@127.0.0.1:70000/x",
        "postgresql://postgres@127.0.0.1/x?port=5432x",
        "mysql://root@127.0.0.1/x",
    ],
)
def test_check_url_rejects_what_would_fail_later(url: str) -> None:
    with pytest.raises(ValueError, match=r"port must be a number|must start with postgresql"):
        startup.check_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:p%40ss@db.example.com:5432/outbox",
        "postgresql+asyncpg://u@[::1]:6543/outbox",
        "postgres://u@h1:5432,h2:5433/outbox",
        "postgresql:///outbox?host=/var/run/postgresql",
        "postgresql://u@host/outbox?sslmode=verify-full",
    ],
)
def test_check_url_accepts_what_asyncpg_accepts(url: str) -> None:
    assert startup.check_url(url).startswith("postgresql://")


def test_a_bad_port_never_shows_the_password() -> None:
    with pytest.raises(ValueError) as caught:
        startup.check_url("postgresql://app:hunter2@127.0.0.1:abc/x")
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize(
    "command", [["status"], ["migrate"], ["dispatcher"], ["api", "--port", "8000"]]
)
def test_a_url_that_does_not_parse_stops_every_command(command: list[str]) -> None:
    result = outbox(*command, DATABASE_URL="postgresql://app:hunter2@127.0.0.1:abc/x")
    assert result.code == 2, result.err
    assert len(result.lines) == 1, result.err
    assert result.lines[0].startswith("invalid setting DATABASE_URL: the port must be a number")
    assert "hunter2" not in result.err


# --- the server, the role, the database, the schema ----------------------------------------


@pytest.mark.parametrize("command", ["status", "migrate", "dispatcher"])
def test_an_unknown_database_is_a_configuration_error(pg_server: PgServer, command: str) -> None:
    result = outbox(command, DATABASE_URL=pg_server.url("no_such_database"))
    server = urlsplit(pg_server.admin_url).netloc.rpartition("@")[2]
    assert result.code == 2, result.err
    assert result.lines == [
        f"outbox {command}: invalid setting DATABASE_URL: database "
        f'"no_such_database" does not exist on {server} (create it, or fix the database name)'
    ]


@pytest.mark.parametrize("command", ["status", "dispatcher"])
def test_an_unknown_role_is_a_configuration_error(database_url: str, command: str) -> None:
    result = outbox(command, DATABASE_URL=_with(database_url, user="nobody_here"))
    assert result.code == 2, result.err
    assert len(result.lines) == 1, result.err
    assert 'invalid setting DATABASE_URL: role "nobody_here" does not exist' in result.lines[0]
    assert "(fix the user name, or create the role)" in result.lines[0]


@pytest.mark.parametrize("command", ["status", "dispatcher"])
def test_a_database_never_migrated_says_to_migrate(empty_database_url: str, command: str) -> None:
    result = outbox(command, DATABASE_URL=empty_database_url)
    assert result.code == 2, result.err
    assert result.lines == [
        f"outbox {command}: DATABASE_URL points to a database without the outbox schema: "
        "run `outbox migrate`"
    ]


def test_a_schema_behind_head_says_to_migrate_then_migrate_fixes_it(behind_url: str) -> None:
    result = outbox("dispatcher", DATABASE_URL=behind_url)
    assert result.code == 2, result.err
    assert len(result.lines) == 1, result.err
    assert "the schema is at revision 0001, this version of outbox needs" in result.lines[0]
    assert result.lines[0].endswith("run `outbox migrate`")

    assert outbox("migrate", DATABASE_URL=behind_url).code == 0
    assert outbox("status", DATABASE_URL=behind_url).code == 0


@pytest.mark.parametrize("command", ["dispatcher", "migrate"])
def test_a_schema_from_a_newer_version_says_to_upgrade(ahead_url: str, command: str) -> None:
    result = outbox(command, DATABASE_URL=ahead_url)
    assert result.code == 2, result.err
    assert len(result.lines) == 1, result.err
    assert "f00d_from_the_future" in result.lines[0]
    assert "upgrade outbox" in result.lines[0]


@pytest.mark.parametrize("command", ["status", "migrate"])
def test_an_unreachable_database_is_one_line_and_exit_1(command: str) -> None:
    url = f"postgresql://app:hunter2@127.0.0.1:{free_port()}/outbox"
    result = outbox(command, DATABASE_URL=url)
    assert result.code == 1, result.err
    assert len(result.lines) == 1, result.err
    assert result.lines[0].startswith(f"outbox {command}: cannot reach the database at ")
    assert "(DATABASE_URL)" in result.lines[0]
    assert "hunter2" not in result.err


def test_a_taken_port_is_named_with_the_flag(database_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = outbox("api", "--port", str(port), DATABASE_URL=database_url)
    assert result.code == 2, result.err
    assert len(result.lines) == 1, result.err
    assert f"outbox api: port {port} on 127.0.0.1 is already in use" in result.lines[0]
    assert "choose another with --port" in result.lines[0]


@pytest.mark.parametrize(("name", "value"), [("LOG_LEVEL", "chatty"), ("LOG_FORMAT", "xml")])
def test_bad_log_settings_are_named(database_url: str, name: str, value: str) -> None:
    result = outbox("status", DATABASE_URL=database_url, **{name: value})
    assert result.code == 2, result.err
    assert result.lines[0].startswith(f"invalid setting {name}: ")


# --- the dispatcher waits for an unreachable database, and only for that ---------------------


@contextlib.asynccontextmanager
async def _tcp_proxy(port: int, target: tuple[str, int]) -> AsyncIterator[None]:
    """Forward 127.0.0.1:port to ``target`` for the duration of the block."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    try:
        yield
    finally:
        server.close()


@contextlib.contextmanager
def _stopped(proc: subprocess.Popen[bytes]) -> Iterator[None]:
    try:
        yield
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_the_dispatcher_waits_for_an_unreachable_database_then_starts(
    database_url: str, db: asyncpg.Pool, smtp_server: SmtpServer
) -> None:
    real = urlsplit(database_url)
    assert real.hostname is not None and real.port is not None
    port = free_port()
    proc = spawn_dispatcher(_with(database_url, port=port), smtp_server, "patient")
    with _stopped(proc):
        await wait_until(
            lambda: process_log(proc).count('"database.unreachable"') >= 2,
            what="two unreachable database log lines",
        )
        assert proc.poll() is None, process_log(proc)
        line = next(x for x in process_log(proc).splitlines() if "database.unreachable" in x)
        assert '"setting": "DATABASE_URL"' in line and f":{port}/" in line

        async with _tcp_proxy(port, (real.hostname, real.port)):
            await wait_until(
                lambda: _has(db, "patient"), timeout=30, what="the dispatcher to register"
            )
            assert '"database.reachable"' in process_log(proc)
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(proc.wait, 30)
    assert code == 0, process_log(proc)
    assert "Traceback" not in process_log(proc)


async def _has(db: asyncpg.Pool, name: str) -> bool:
    return name in await live_dispatchers(db)


async def test_sigterm_while_waiting_is_a_graceful_stop_with_log_settings(
    smtp_server: SmtpServer,
) -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/outbox"
    proc = spawn_dispatcher(url, smtp_server, "waiting", LOG_LEVEL="warning", LOG_FORMAT="console")
    with _stopped(proc):
        await wait_until(lambda: "database.unreachable" in process_log(proc), what="a log line")
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 15)
    log = process_log(proc)
    assert code == 0, log
    lines = log.strip().splitlines()
    assert lines and all(" WARNING " in line for line in lines), log  # console, >= warning
    assert not any(line.startswith("{") for line in lines)
    assert "dispatcher.signal" not in log  # an info line
