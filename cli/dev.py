"""``outbox dev``: the whole product on one machine with zero set-up.

Starts (unless configured otherwise) an embedded PostgreSQL and a local SMTP sink in a
project-local data folder, migrates, then runs ``outbox api`` and ``outbox dispatcher`` as
child processes. Ctrl-C (or SIGTERM) stops the children gracefully, then the sink and the
database. A second run reuses the same data, so pending mail survives a restart.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import asyncpg

from cli import args as types
from dispatcher.db import asyncpg_dsn, redact
from dispatcher.settings import load_settings

GRACE_SECONDS = 30.0


def default_data_dir() -> Path:
    """``$OUTBOX_DATA_DIR``, else ``./.outbox``."""
    return Path(os.environ.get("OUTBOX_DATA_DIR", ".outbox"))


def running_dev_database(data_dir: Path | None = None) -> str | None:
    """The URL of the database of a running ``outbox dev`` in ``data_dir``, if any."""
    from cli.embedded_pg import EmbeddedPostgres

    pg = EmbeddedPostgres((data_dir or default_data_dir()) / "postgres")
    if not (pg.pgdata / "postmaster.pid").exists() or not pg.running():
        return None
    pg.port = pg.running_port() or 0
    return pg.url("outbox") if pg.port else None


def register(sub: Any) -> None:
    """Add the ``dev`` command to the parser."""
    parser = sub.add_parser("dev", help="run everything locally with zero set-up")
    parser.add_argument("--host", default="127.0.0.1", help="API bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=types.port, default=8000, help="API port (default 8000)")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=default_data_dir(),
        help="where the embedded database and received mail live (default ./.outbox)",
    )
    parser.set_defaults(handler=run)


async def _ensure_database(server_url: str, name: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(server_url))
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            # Identifiers cannot be parameters; `name` is our own constant, never input.
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


def run(ns: argparse.Namespace) -> int:
    """Start the stack and supervise it until Ctrl-C or SIGTERM."""
    import asyncio

    from cli import migrate
    from cli.embedded_pg import EmbeddedPostgres, free_port
    from cli.sink import start_sink
    from dispatcher import logs

    logs.configure()
    settings = load_settings()
    data_dir: Path = ns.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)

    stop = threading.Event()
    signals_seen: list[int] = []
    children: list[subprocess.Popen[bytes]] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        signals_seen.append(signum)
        stop.set()
        if len(signals_seen) > 1:  # a second Ctrl-C: the children stop at once too
            for child in children:
                if child.poll() is None:
                    child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    pg: EmbeddedPostgres | None = None
    sink = None
    try:
        if settings.database_url:
            database_url = settings.database_url
        else:
            pg = EmbeddedPostgres(data_dir / "postgres")
            server_url = pg.start()
            asyncio.run(_ensure_database(server_url, "outbox"))
            database_url = pg.url("outbox")
            env["DATABASE_URL"] = database_url
        migrate.upgrade_or_exit(database_url, "outbox dev")

        mail_dir = None
        if settings.smtp_host is None:
            mail_dir = data_dir / "mail"
            smtp_port = free_port(2525)
            sink = start_sink(mail_dir, smtp_port)
            env.update(SMTP_HOST="127.0.0.1", SMTP_PORT=str(smtp_port), SMTP_SECURITY="none")

        python = [sys.executable, "-m", "cli.main"]
        commands = [
            [*python, "api", "--host", ns.host, "--port", str(ns.port)],
            [*python, "dispatcher", "--name", "dev"],
        ]
        for command in commands:
            # Own session: a terminal's Ctrl-C reaches only us, and we hand each child
            # exactly one SIGTERM, which it treats as a graceful stop.
            children.append(subprocess.Popen(command, env=env, start_new_session=True))

        _banner(ns, database_url, mail_dir, env)
        while not stop.wait(0.2):
            if any(child.poll() is not None for child in children):
                print("outbox dev: a child process exited; stopping", file=sys.stderr)
                break
    finally:
        _stop_children(children, signals_seen)
        if sink is not None:
            sink.stop()
        if pg is not None:
            pg.stop()
    failed = any(child.returncode not in (0, None) for child in children) and not signals_seen
    return 1 if failed else 0


def _stop_children(children: list[subprocess.Popen[bytes]], signals_seen: list[int]) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for child in children:
        try:
            child.wait(timeout=GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _banner(
    ns: argparse.Namespace, database_url: str, mail_dir: Path | None, env: dict[str, str]
) -> None:
    base = f"http://{ns.host}:{ns.port}"
    mail = f"files in {mail_dir}" if mail_dir else f"SMTP {env.get('SMTP_HOST')}"
    lines = [
        "",
        "outbox dev is running (Ctrl-C stops everything)",
        f"  API        {base}   (docs: {base}/docs)",
        f"  database   {redact(database_url)}",
        f"  mail       {mail}",
        "  try it:",
        f"    curl -s -X POST {base}/register -H 'content-type: application/json' \\",
        '         -d \'{"email": "ada@example.com", "name": "Ada Lovelace"}\'',
        "",
    ]
    print("\n".join(lines), flush=True)
