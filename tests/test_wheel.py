"""The built wheel, installed without extras into a fresh virtualenv outside the checkout:
what it carries, and the whole path of a mail through it (migrate, enqueue in an
application's SQLAlchemy transaction, dispatch to a real SMTP server, stop)."""

from __future__ import annotations

import asyncio
import email
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import asyncpg
import pytest

from outbox.dispatcher.db import asyncpg_dsn
from tests.smtp_server import SmtpServer

PROJECT = Path(__file__).resolve().parent.parent
#: Left out of the copy the wheel is built from: caches, environments, earlier builds.
NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    "*.pyc",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    ".hypothesis",
    ".outbox",
)
#: What only the extras bring (`api`, `local`), as import names.
EXTRA_MODULES = ("fastapi", "fastapi_offline", "uvicorn", "jinja2", "pgserver", "aiosmtpd")

# An application's code, run by the installed package: one mail rolled back, one committed.
APP_SCRIPT = """
import asyncio, json, os

import outbox
from outbox import Mail, enqueue
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine


class Abort(Exception):
    pass


async def main():
    url = os.environ["DATABASE_URL"].replace("postgresql://", "postgresql+asyncpg://", 1)
    engine = create_async_engine(url)
    try:
        async with AsyncSession(engine) as session:
            try:
                async with session.begin():
                    gone = Mail("Gone <gone@example.org>", "Never", "Rolled back\\n")
                    await enqueue(session, gone, key="smoke:rolled-back")
                    raise Abort
            except Abort:
                pass
        async with AsyncSession(engine) as session, session.begin():
            mail = Mail("Ada <ada@example.org>", "From the wheel", "Hello from the wheel\\n")
            queued = await enqueue(session, mail, key="smoke:1")
    finally:
        await engine.dispose()
    print(json.dumps({"message_id": queued.message_id, "package": outbox.__file__}))


asyncio.run(main())
"""


def _run(*args: str | Path, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        stdin=subprocess.DEVNULL,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done


def _spawn(*args: str | Path, cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """A long-running command, its stderr (the log) to ``log``."""
    with log.open("wb") as stderr:
        return subprocess.Popen(
            [str(a) for a in args],
            cwd=cwd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
        )


def _build_wheel(tmp: Path) -> Path:
    """``pip wheel`` of a clean copy of the checkout (no stale build/ of its own)."""
    source = tmp / "source"
    shutil.copytree(PROJECT, source, symlinks=True, ignore=NOT_SOURCE)
    dist = tmp / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", dist, source],
        check=True,
        timeout=180,
        stdin=subprocess.DEVNULL,
    )
    (wheel,) = dist.glob("mail_outbox-*.whl")
    return wheel


def _check_contents(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA")))
    tops = {name.split("/")[0] for name in names}
    assert tops == {"outbox", wheel.name.split("-py3")[0] + ".dist-info"}, tops
    versions = {p.name for p in (PROJECT / "migrations" / "versions").glob("[0-9]*.py")}
    assert {f"outbox/migrations/versions/{v}" for v in versions} <= names
    for shipped in (
        "outbox/__init__.py",
        "outbox/py.typed",
        "outbox/migrations/env.py",
        "outbox/migrations/script.py.mako",
        "outbox/api/templates/welcome.txt",
        "outbox/api/templates/welcome.html",
        "outbox/api/templates/welcome.subject.txt",
        "outbox/api/admin_site/static/admin.css",
        "outbox/api/admin_site/templates/base.html",
    ):
        assert shipped in names, shipped
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith("/LICENSE") for n in names)
    assert not [n for n in names if "/tests/" in n or "/bench/" in n or "examples" in n]
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    # Without extras, none of the registration service's or `outbox dev`'s packages.
    required = [
        line.split(":", 1)[1].strip()
        for line in metadata.decode().splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    ]
    for package in ("fastapi", "uvicorn", "jinja2", "pgserver", "aiosmtpd", "fastapi-offline"):
        assert not [r for r in required if r.lower().startswith(package)], required


@pytest.mark.timeout(300)
async def test_the_wheel_without_extras_migrates_enqueues_and_dispatches(
    empty_database_url: str, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    started = time.monotonic()
    wheel = await asyncio.to_thread(_build_wheel, tmp_path)
    _check_contents(wheel)

    venv = tmp_path / "venv"
    await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "venv", venv], check=True, timeout=120
    )
    python, outbox = venv / "bin" / "python", venv / "bin" / "outbox"
    work = tmp_path / "elsewhere"  # no checkout, no alembic.ini, no .outbox here
    work.mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DATABASE_URL", "SMTP_", "DISPATCHER_", "LOG_", "PYTHON", "VIRTUAL"))
    }
    # Dependencies from the package index (pip's cache makes that quick), no extras.
    install = await asyncio.to_thread(
        _run, python, "-m", "pip", "install", "--quiet", wheel, cwd=work, env=env
    )
    assert install.returncode == 0, install.stderr
    present = await asyncio.to_thread(
        _run,
        python,
        "-c",
        "import importlib.util, json, sys; "
        "print(json.dumps([m for m in sys.argv[1:] if importlib.util.find_spec(m)]))",
        *EXTRA_MODULES,
        cwd=work,
        env=env,
    )
    assert json.loads(present.stdout) == [], present.stdout

    # The commands that need an extra say which, in one line.
    for command, extras in (("api", "api"), ("dev", "api,local")):
        refused = await asyncio.to_thread(_run, outbox, command, cwd=work, env=env)
        assert refused.returncode == 2, refused.stderr
        (line,) = refused.stderr.strip().splitlines()
        assert line.endswith(f"pip install 'mail-outbox[{extras}]'"), line
    helped = await asyncio.to_thread(_run, outbox, "--help", cwd=work, env=env)
    assert helped.returncode == 0, helped.stderr

    env["DATABASE_URL"] = empty_database_url
    migrated = await asyncio.to_thread(
        _run, outbox, "migrate", "--without-registration", cwd=work, env=env
    )
    assert migrated.returncode == 0, migrated.stderr
    (work / "app.py").write_text(APP_SCRIPT)
    app = await asyncio.to_thread(_run, python, "app.py", cwd=work, env=env)
    assert app.returncode == 0, app.stderr
    result = json.loads(app.stdout)
    assert Path(result["package"]).is_relative_to(venv), result["package"]

    env.update(
        SMTP_HOST="127.0.0.1",
        SMTP_PORT=str(smtp_server.port),
        DISPATCHER_POLL_INTERVAL="0.2",
        DISPATCHER_HEARTBEAT_INTERVAL="0.5",
    )
    log_path = tmp_path / "dispatcher.log"
    dispatcher = _spawn(outbox, "dispatcher", "--name", "wheel", cwd=work, env=env, log=log_path)
    try:
        deadline = time.monotonic() + 30
        while not smtp_server.received and time.monotonic() < deadline:
            if dispatcher.poll() is not None:
                raise AssertionError(f"the dispatcher stopped:\n{log_path.read_text()}")
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # room for a second mail, which must not come
    finally:
        dispatcher.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(dispatcher.wait, 30)
    logged = log_path.read_text()
    assert code == 0, logged
    assert "Traceback" not in logged, logged

    (received,) = smtp_server.received
    assert received.message_id == result["message_id"]
    assert received.rcpt_tos == ("ada@example.org",)
    message = email.message_from_bytes(received.data)
    assert message["Subject"] == "From the wheel"
    conn = await asyncpg.connect(asyncpg_dsn(empty_database_url))
    try:
        rows = await conn.fetch("SELECT status, idempotency_key FROM outbox")
        tables = {r[0] for r in await conn.fetch("SELECT tablename FROM pg_tables")}
    finally:
        await conn.close()
    assert [tuple(r) for r in rows] == [("sent", "smoke:1")]
    assert not {"users", "registration_keys"} & tables
    print(f"wheel smoke test: {time.monotonic() - started:.1f} s")
