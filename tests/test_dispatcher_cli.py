"""`outbox dispatcher` refuses bad flags and settings with a message naming them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.dispatching import ROOT


def _run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("DISPATCHER_", "SMTP_"))}
    environ.update({"DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none", **env})
    return subprocess.run(
        [sys.executable, "-m", "outbox.cli.main", "dispatcher", *args],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--concurrency", "0"),
        ("--batch-size", "many"),
        ("--poll-interval", "-1"),
        ("--lease", "nan"),
        ("--max-attempts", "1.5"),
        ("--metrics-port", "70000"),
        # The name goes into logs, `outbox status` and PostgreSQL's application_name:
        # a byte that is not UTF-8 in it (a lone surrogate here) printed a traceback.
        ("--name", "\udcff"),
        ("--name", ""),
        ("--name", "x" * 101),
        ("--name", "a\nb"),
    ],
)
def test_bad_flags_are_named(flag: str, value: str) -> None:
    result = _run(flag, value)
    assert result.returncode == 2
    assert f"argument {flag}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DISPATCHER_CONCURRENCY", "zero"),
        ("DISPATCHER_LEASE", "0"),
        ("SMTP_SECURITY", "ssl"),
        ("SMTP_PORT", "99999"),
        ("DISPATCHER_NAME", "a\tb"),
        ("DISPATCHER_NAME", "\u202eevil"),
    ],
)
def test_bad_settings_stop_start_up_naming_the_setting(name: str, value: str) -> None:
    result = _run(**{name: value})
    assert result.returncode == 2
    assert f"invalid setting {name}" in result.stderr
    assert "Traceback" not in result.stderr
