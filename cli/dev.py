"""``outbox dev``: the whole product on one machine with zero set-up.

Starts (unless configured otherwise) an embedded PostgreSQL and a local SMTP sink in a
project-local data folder, migrates, then runs ``outbox api`` and ``outbox dispatcher`` as
child processes, and prints where everything is once the API answers. Ctrl-C (or SIGTERM)
stops the children gracefully, then the sink and the database (only if it started it). A
second run reuses the same data, so pending mail survives a restart; a second run while
the first is alive (the data folder's ``dev.lock``) says so and exits 2, touching nothing.
"""

from __future__ import annotations

import argparse
import fcntl
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import asyncpg

from outbox.cli import args as types
from outbox.cli.ports import listen_problem
from outbox.dispatcher.db import asyncpg_dsn, redact
from outbox.dispatcher.settings import load_settings

GRACE_SECONDS = 30.0
#: How long the API gets to answer before `outbox dev` gives up.
STARTUP_SECONDS = 60.0


def default_data_dir() -> Path:
    """``$OUTBOX_DATA_DIR``, else ``./.outbox``."""
    return Path(os.environ.get("OUTBOX_DATA_DIR", ".outbox"))


def running_dev_database(data_dir: Path | None = None) -> str | None:
    """The URL of the database of a running ``outbox dev`` in ``data_dir``, if any."""
    from outbox.cli.embedded_pg import EmbeddedPostgres

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

    from outbox.cli import extras, migrate
    from outbox.cli.embedded_pg import EmbeddedPostgres, free_port
    from outbox.dispatcher import logs, startup

    settings = load_settings()
    # The registration service, and the embedded PostgreSQL and the sink unless
    # DATABASE_URL and SMTP_HOST point elsewhere.
    local = [
        name
        for name, used in [
            ("pgserver", not settings.database_url),
            ("aiosmtpd", settings.smtp_host is None),
        ]
        if used
    ]
    extras.require("dev", {"api": None, "local": tuple(local)})
    from outbox.cli.sink import start_sink

    log_format = settings.log_format or "console"
    logs.configure(settings.log_level, log_format)
    data_dir: Path = ns.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    api_url = f"http://{_url_host(ns.host)}:{ns.port}"
    lock = _lock(data_dir, api_url)
    if lock is None:
        holder = _holder(data_dir)
        print(
            f"outbox dev: already running at {holder.get('api', '(unknown)')}, "
            f"pid {holder.get('pid', '(unknown)')} (data in {data_dir}); "
            "stop it first, or use another --data-dir",
            file=sys.stderr,
        )
        return 2
    problem = listen_problem(ns.host, ns.port)
    if problem is not None:  # before anything is started
        print(f"outbox dev: {problem}", file=sys.stderr)
        return 2
    from outbox.api.welcome import TemplateProblem, load_templates

    try:
        load_templates(settings)  # a broken template stops everything before it starts
    except TemplateProblem as exc:
        print(f"outbox dev: {exc}", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env["LOG_FORMAT"] = log_format

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
    failed = False
    try:
        if settings.database_url:
            database_url = settings.database_url
            startup.check_or_exit(database_url, "dev", schema=False)
        else:
            pg = EmbeddedPostgres(data_dir / "postgres")
            try:
                server_url = pg.start()
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                reason = " ".join(str(exc).split())[:300]
                print(
                    f"outbox dev: cannot start PostgreSQL in {pg.pgdata}: {reason}", file=sys.stderr
                )
                return 1
            if not pg.started:
                print(
                    f"outbox dev: using the PostgreSQL already running on {pg.pgdata} "
                    "(it is left running at exit)",
                    file=sys.stderr,
                )
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

        python = [sys.executable, "-m", "outbox.cli.main"]
        commands = [
            [*python, "api", "--host", ns.host, "--port", str(ns.port)],
            [*python, "dispatcher", "--name", "dev"],
        ]
        for command in commands:
            # Own session: a terminal's Ctrl-C reaches only us, and we hand each child
            # exactly one SIGTERM, which it treats as a graceful stop.
            children.append(subprocess.Popen(command, env=env, start_new_session=True))

        trouble = _wait_until_listening(ns.host, ns.port, children, stop)
        if trouble:
            print(f"outbox dev: {trouble}; stopping", file=sys.stderr)
            failed = True
        elif not stop.is_set():
            _banner(ns, database_url, mail_dir, env)
        while not failed and not stop.wait(0.2):
            if any(child.poll() is not None for child in children):
                print("outbox dev: a child process exited; stopping", file=sys.stderr)
                failed = True
    finally:
        _stop_children(children, signals_seen)
        if sink is not None:
            sink.stop()
        if pg is not None and pg.started:  # never one it did not start
            pg.stop()
        os.close(lock)
    return 1 if failed and not signals_seen else 0


LOCK_FILE = "dev.lock"


def _lock(data_dir: Path, api_url: str) -> int | None:
    """Hold ``data_dir/dev.lock`` while this process lives; None if another process does.

    The lock is an flock, which the kernel releases when its holder dies however it dies,
    so a stale file never blocks a new run. The file says who holds it, for the message.
    """
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "api": api_url}).encode())
    return fd


def _holder(data_dir: Path) -> dict[str, object]:
    """What the lock file says about the process holding it (empty if unreadable)."""
    try:
        holder = json.loads((data_dir / LOCK_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _url_host(host: str) -> str:
    """Where to reach a server bound to ``host``."""
    if host in ("", "0.0.0.0"):  # noqa: S104 - a bind address, not binding here
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _wait_until_listening(
    host: str, port: int, children: list[subprocess.Popen[bytes]], stop: threading.Event
) -> str | None:
    """Wait until the API answers ``/healthz``; else say why not (None: it answers, or a
    stop was requested)."""
    names = ("the API", "the dispatcher")
    deadline = time.monotonic() + STARTUP_SECONDS
    while not stop.is_set():
        for name, child in zip(names, children, strict=False):
            code = child.poll()
            if code is not None:
                why = f"{name} exited with status {code} before the API was listening"
                problem = listen_problem(host, port)
                return f"{why} ({problem})" if problem else why
        if _answers(_url_host(host).strip("[]"), port):
            return None
        if time.monotonic() > deadline:
            return f"the API did not answer on port {port} within {STARTUP_SECONDS:.0f} s"
        stop.wait(0.1)
    return None


def _answers(host: str, port: int) -> bool:
    """True if an HTTP server on host:port answers GET /healthz with 200 (no proxy)."""
    connection = http.client.HTTPConnection(host, port, timeout=1)
    try:
        connection.request("GET", "/healthz")
        return connection.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


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
    base = f"http://{_url_host(ns.host)}:{ns.port}"
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
