"""Helpers for dispatcher tests: enqueue mail, run dispatchers, wait for conditions."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from email.headerregistry import Address
from pathlib import Path
from typing import Any

import asyncpg
from opentelemetry.trace import TracerProvider

from outbox.dispatcher.daemon import Dispatcher, DispatcherConfig
from outbox.dispatcher.outbox import Enqueued, Mail, enqueue
from outbox.dispatcher.smtp import SmtpConfig
from tests.smtp_server import SmtpServer

SENDER = Address("Outbox Tests", "noreply", "example.org")
ROOT = Path(__file__).resolve().parent.parent

#: Fast settings for tests: quick polls, retries and liveness checks.
FAST = {
    "poll_interval": 0.2,
    "retry_base": 0.05,
    "retry_cap": 0.2,
    "heartbeat_interval": 0.5,
    "lease": 30.0,
}


async def enqueue_many(pool: asyncpg.Pool, count: int, prefix: str = "user") -> list[Enqueued]:
    """Enqueue ``count`` mails to prefix-N@example.com, one transaction each."""
    out = []
    async with pool.acquire() as conn:
        for i in range(count):
            async with conn.transaction():
                mail = Mail(
                    recipient=Address(f"User {i}", f"{prefix}-{i}", "example.com"),
                    subject=f"Hello {i}",
                    body_text=f"Hello number {i}\n",
                    body_html=f"<p>Hello number {i}</p>",
                )
                out.append(await enqueue(conn, mail, sender=SENDER))
    return out


async def wait_until(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool],
    timeout: float = 20.0,
    interval: float = 0.05,
    what: str = "condition",
) -> float:
    """Poll ``check`` until it is true; return the seconds it took. Fails after ``timeout``."""
    start = time.monotonic()
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def status_counts(pool: asyncpg.Pool) -> dict[str, int]:
    rows = await pool.fetch("SELECT status, count(*) AS n FROM outbox GROUP BY status")
    return {row["status"]: row["n"] for row in rows}


def smtp_config(server: SmtpServer, **overrides: Any) -> SmtpConfig:
    return SmtpConfig(host="127.0.0.1", port=server.port, **{"timeout": 5.0, **overrides})


@asynccontextmanager
async def running_dispatcher(
    database_url: str,
    server: SmtpServer,
    name: str = "test",
    smtp: SmtpConfig | None = None,
    tracer_provider: TracerProvider | None = None,
    **overrides: Any,
) -> AsyncIterator[Dispatcher]:
    """Run an in-process dispatcher for the duration of the block, then stop it gracefully."""
    config = DispatcherConfig(name=name, **{**FAST, **overrides})
    dispatcher = Dispatcher(config, database_url, smtp or smtp_config(server), tracer_provider)
    task = asyncio.create_task(dispatcher.run())
    started = asyncio.ensure_future(dispatcher.started.wait())
    done, _ = await asyncio.wait({task, started}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        started.cancel()
        task.result()  # raise what made it stop
        raise AssertionError("dispatcher stopped before starting")
    assert started in done, "dispatcher did not start within 15 s"
    try:
        yield dispatcher
    finally:
        dispatcher.request_stop()
        await asyncio.wait_for(task, 30)
    assert not dispatcher.crashed


def spawn_dispatcher(
    database_url: str, server: SmtpServer, name: str, *args: str, **env: str
) -> subprocess.Popen[bytes]:
    """Start a real ``outbox dispatcher`` process."""
    environ = {
        **os.environ,
        "DATABASE_URL": database_url,
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(server.port),
        "SMTP_SECURITY": "none",
        "DISPATCHER_HEARTBEAT_INTERVAL": "0.5",
        "DISPATCHER_RETRY_BASE": "0.05",
        "DISPATCHER_RETRY_CAP": "0.2",
        "DISPATCHER_POLL_INTERVAL": "0.2",
        **env,
    }
    # Logs go to a file, never to an unread pipe (a full pipe would block the process).
    with tempfile.NamedTemporaryFile(
        prefix=f"dispatcher-{name}-", suffix=".log", delete=False
    ) as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "outbox.cli.main", "dispatcher", "--name", name, *args],
            env=environ,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    proc.log_path = Path(log.name)  # type: ignore[attr-defined]
    return proc


def process_log(proc: subprocess.Popen[bytes]) -> str:
    """What a process started by :func:`spawn_dispatcher` logged so far."""
    path: Path = proc.log_path  # type: ignore[attr-defined]
    return path.read_text()


async def live_dispatchers(pool: asyncpg.Pool) -> set[str]:
    rows = await pool.fetch(
        "SELECT name FROM dispatchers WHERE last_beat_at > now() - interval '3 seconds'"
    )
    return {row["name"] for row in rows}
