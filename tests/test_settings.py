"""Start-up settings and command-line flags: garbage stops the process with a clear message.

Each case runs the real ``outbox`` console script as a subprocess, as a user would.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncpg
import pytest
from pydantic import ValidationError

from outbox.dispatcher.db import asyncpg_dsn
from outbox.dispatcher.settings import Settings

OUTBOX = str(Path(sys.executable).with_name("outbox"))
PROJECT = Path(__file__).resolve().parent.parent
SETTINGS = (
    "DATABASE_URL",
    "SMTP_HOST",
    "SMTP_PORT",
    "SMTP_USERNAME",
    "SMTP_PASSWORD",
    "SMTP_SECURITY",
    "SMTP_TIMEOUT",
    "SMTP_ALLOW_INSECURE_AUTH",
    "MAIL_FROM",
    "ADMIN_TOKEN",
    "PRODUCT_NAME",
    "APP_URL",
    "TEMPLATES_DIR",
)


def _env(**settings: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key.upper() not in SETTINGS and not key.upper().startswith("DISPATCHER_")
    }
    env.update(settings)
    return env


def _outbox(
    *args: str, cwd: Path | None = None, **settings: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [OUTBOX, *args],
        env=_env(**settings),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


# (setting, bad value, a word the message must contain)
BAD_SETTINGS = [
    ("SMTP_PORT", "abc", "integer"),
    ("SMTP_PORT", "0", "greater than or equal to 1"),
    ("SMTP_PORT", "70000", "less than or equal to 65535"),
    ("SMTP_SECURITY", "bogus", "none"),
    ("SMTP_TIMEOUT", "-1", "greater than 0"),
    ("DATABASE_URL", "mysql://x", "postgresql://"),
    ("DATABASE_URL", "not a url", "postgresql://"),
    ("MAIL_FROM", "not an address", "not a single valid email address"),
    ("MAIL_FROM", "noreply@", "not a single valid email address"),
    ("MAIL_FROM", "a@example.com, b@example.com", "not a single valid email address"),
    ("MAIL_FROM", "Evil <a@example.com>\r\nBcc: x@example.com", "control characters"),
    ("ADMIN_TOKEN", "tooshort123", "at least 16 characters"),
    ("APP_URL", "ftp://app.example.com", "must start with http:// or https://"),
    ("APP_URL", "https://user:pw@app.example.com", "must not hold a user name or password"),
    ("PRODUCT_NAME", "Acme\x1b[31m", "control characters"),
]


COMMANDS = ("migrate", "api")


@pytest.fixture(scope="module")
def bad_setting_runs(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[tuple[str, str, str], tuple[Path, subprocess.CompletedProcess[str]]]:
    """Every (command, setting, value) case, run in parallel once (each start costs ~0.4 s)."""
    cases = [(c, s, v) for c in COMMANDS for s, v, _ in BAD_SETTINGS]

    def run(case: tuple[str, str, str]) -> tuple[Path, subprocess.CompletedProcess[str]]:
        command, setting, value = case
        cwd = tmp_path_factory.mktemp("cwd")
        # A database URL that would work, so only the bad setting can be the problem; the
        # port is closed, so nothing may have got as far as connecting.
        settings = {"DATABASE_URL": "postgresql://postgres@127.0.0.1:9/outbox", setting: value}
        return cwd, _outbox(command, cwd=cwd, **settings)

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(cases, pool.map(run, cases), strict=True))


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(
    ("setting", "value", "expected"),
    BAD_SETTINGS,
    ids=[f"{s}={v!r}" for s, v, _ in BAD_SETTINGS],
)
def test_bad_setting_stops_start_up_naming_it(
    bad_setting_runs: dict[tuple[str, str, str], tuple[Path, subprocess.CompletedProcess[str]]],
    command: str,
    setting: str,
    value: str,
    expected: str,
) -> None:
    cwd, done = bad_setting_runs[(command, setting, value)]
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert f"invalid setting {setting}" in done.stderr, done.stderr
    assert expected in done.stderr, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    if setting == "ADMIN_TOKEN":
        assert value not in done.stderr + done.stdout  # secrets are never printed
    assert list(cwd.iterdir()) == []


def test_missing_database_url_names_the_setting(tmp_path: Path) -> None:
    for command in ("migrate", "api"):
        done = _outbox(command, cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        assert "invalid setting DATABASE_URL" in done.stderr
        assert "Traceback" not in done.stderr


def test_smtp_password_is_never_printed_on_a_settings_error(tmp_path: Path) -> None:
    done = _outbox(
        "migrate",
        cwd=tmp_path,
        DATABASE_URL="mysql://x",
        SMTP_PASSWORD="hunter2-very-secret",
        SMTP_PORT="nope",
    )
    assert done.returncode == 2
    assert "invalid setting SMTP_PORT" in done.stderr
    assert "invalid setting DATABASE_URL" in done.stderr  # every bad setting is named at once
    assert "hunter2" not in done.stderr + done.stdout


BAD_FLAGS = [
    (["api", "--port", "0"], "--port"),
    (["api", "--port", "65536"], "--port"),
    (["api", "--port", "http"], "--port"),
    (["api", "--workers", "abc"], "--workers"),
    (["api", "--workers", "0"], "--workers"),
    (["api", "--bogus"], "--bogus"),
    (["dev", "--port", "-1"], "--port"),
    (["migrate", "--force"], "--force"),
    (["no-such-command"], "no-such-command"),
]


@pytest.mark.parametrize(("args", "flag"), BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flag_is_rejected_naming_it(tmp_path: Path, args: list[str], flag: str) -> None:
    done = _outbox(*args, cwd=tmp_path, DATABASE_URL="postgresql://postgres@127.0.0.1:9/x")
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert flag in done.stderr
    assert "usage: outbox" in done.stderr
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


async def _tables(url: str) -> set[str]:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    finally:
        await conn.close()
    return {row["tablename"] for row in rows}


@pytest.mark.parametrize("scheme", ["postgresql", "postgresql+asyncpg", "postgres"])
async def test_migrate_accepts_every_documented_url_form(
    empty_database_url: str, scheme: str, tmp_path: Path
) -> None:
    url = scheme + empty_database_url[len("postgresql") :]
    assert url.startswith(f"{scheme}://")
    done = await asyncio.to_thread(_outbox, "migrate", cwd=tmp_path, DATABASE_URL=url)
    assert done.returncode == 0, done.stderr
    assert "schema is at head" in done.stdout
    assert {"users", "outbox", "outbox_attempts", "dispatchers", "outbox_alembic_version"} <= (
        await _tables(empty_database_url)
    )
    # Running it again is a no-op, not an error.
    again = await asyncio.to_thread(_outbox, "migrate", cwd=tmp_path, DATABASE_URL=url)
    assert again.returncode == 0, again.stderr
    assert await asyncio.to_thread(os.listdir, tmp_path) == []


async def test_migrate_against_a_down_database_fails_cleanly(tmp_path: Path) -> None:
    done = await asyncio.to_thread(
        _outbox,
        "migrate",
        cwd=tmp_path,
        DATABASE_URL="postgresql://postgres:sekrit@127.0.0.1:9/x",
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "cannot reach the database at postgresql://postgres:***@127.0.0.1:9/x" in done.stderr
    assert "sekrit" not in done.stderr + done.stdout
    assert "refused" in done.stderr.lower()


async def test_migrate_into_a_missing_database_fails_cleanly(
    empty_database_url: str, tmp_path: Path
) -> None:
    url = empty_database_url.rsplit("/", 1)[0] + "/no_such_database"
    done = await asyncio.to_thread(_outbox, "migrate", cwd=tmp_path, DATABASE_URL=url)
    assert done.returncode == 2, done.stderr  # a configuration problem, not an outage
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert 'database "no_such_database" does not exist' in done.stderr


AUTH_CASES = [
    # (username, security, allow insecure AUTH, refused)
    ("mailer", "none", False, True),
    ("mailer", "none", True, False),
    ("mailer", "starttls", False, False),
    ("mailer", "tls", False, False),
    (None, "none", False, False),  # no username, no AUTH: nothing changes
]


@pytest.mark.parametrize(("username", "security", "allowed", "refused"), AUTH_CASES)
def test_auth_over_cleartext_needs_the_explicit_setting(
    username: str | None, security: str, allowed: bool, refused: bool
) -> None:
    values = {
        "smtp_username": username,
        "smtp_password": "s3cret-password",
        "smtp_security": security,
        "smtp_allow_insecure_auth": allowed,
    }
    if not refused:
        settings = Settings(**values)  # type: ignore[arg-type]
        assert settings.smtp_security == security
        return
    with pytest.raises(ValidationError) as caught:
        Settings(**values)  # type: ignore[arg-type]
    (error,) = caught.value.errors()
    assert error["loc"] == ("smtp_security",)
    assert error["msg"] == (
        "AUTH would send SMTP_PASSWORD in cleartext; use starttls or tls, "
        "or set SMTP_ALLOW_INSECURE_AUTH=true for a local relay"
    )
    assert "s3cret" not in str(caught.value)


def test_auth_over_cleartext_stops_the_api_too(tmp_path: Path) -> None:
    done = _outbox(
        "api",
        cwd=tmp_path,
        DATABASE_URL="postgresql://postgres@127.0.0.1:9/outbox",
        SMTP_USERNAME="mailer",
        SMTP_PASSWORD="hunter2-very-secret",
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        "invalid setting SMTP_SECURITY: AUTH would send SMTP_PASSWORD in cleartext; "
        "use starttls or tls, or set SMTP_ALLOW_INSECURE_AUTH=true for a local relay"
    ]
    assert "hunter2" not in done.stderr + done.stdout
