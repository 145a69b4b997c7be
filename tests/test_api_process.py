"""``outbox api`` as a real process: its database's problems, its log, /metrics, /docs, SIGTERM.

Every database-side problem is a 503 with Retry-After, never a 500; /readyz says which
problem and what to do; the log says it at start-up, without waiting for a request, and
not once per failing request.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from outbox.cli import migrate
from outbox.cli.embedded_pg import free_port
from tests.dispatching import ROOT

REGISTER = {"email": "ada@example.com", "name": "Ada"}


@dataclass
class Api:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text()

    def events(self, name: str) -> list[dict[str, object]]:
        found = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                entry = json.loads(line)
                if entry.get("event") == name:
                    found.append(entry)
        return found


def _poll(what: str, check: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


@contextmanager
def api(database_url: str, **settings: str) -> Iterator[Api]:
    """Run ``outbox api`` (with extra environment ``settings``, e.g. ``ADMIN_TOKEN``) until
    the block ends; wait until it answers /healthz."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOG_", "ADMIN_"))}
    env["DATABASE_URL"] = database_url
    env.update(settings)
    with tempfile.NamedTemporaryFile(prefix="api-", suffix=".log", delete=False) as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "outbox.cli.main", "api", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    running = Api(f"http://127.0.0.1:{port}", proc, Path(log.name))

    def healthy() -> bool:
        assert proc.poll() is None, running.log()
        try:
            return httpx.get(f"{running.url}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        _poll("GET /healthz", healthy)
        yield running
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        running.log_path.unlink(missing_ok=True)


def _assert_503(response: httpx.Response, retry_after: str) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == retry_after
    assert response.json() == {"detail": "the database is unavailable, retry later"}


def _assert_clean(log: str) -> None:
    assert "Traceback" not in log, log
    assert '"request.failed"' not in log, log


def test_unknown_database_is_503_and_named_at_start_up(pg_server: object) -> None:
    from tests.conftest import PgServer

    assert isinstance(pg_server, PgServer)
    with api(pg_server.url("no_such_database")) as running:
        # Logged at start-up, before any request that needs the database.
        _poll("the start-up log line", lambda: running.events("database.misconfigured"), 10)
        ready = httpx.get(f"{running.url}/readyz")
        assert ready.status_code == 503
        body = ready.json()
        assert body["status"] == "unavailable" and body["database"] == "misconfigured"
        assert 'database "no_such_database" does not exist' in body["reason"]
        assert "DATABASE_URL" in body["reason"]
        for _ in range(5):
            _assert_503(httpx.post(f"{running.url}/register", json=REGISTER), "10")
        metrics = httpx.get(f"{running.url}/metrics")
        assert metrics.status_code == 200 and "outbox_database_up 0.0" in metrics.text
        # One line for the problem, however many requests met it.
        assert len(running.events("database.misconfigured")) == 1, running.log()
        _assert_clean(running.log())


def test_never_migrated_is_not_ready_until_migrated(empty_database_url: str) -> None:
    with api(empty_database_url) as running:
        ready = httpx.get(f"{running.url}/readyz")
        assert ready.status_code == 503
        assert ready.json()["reason"].endswith("run `outbox migrate`")
        _assert_503(httpx.post(f"{running.url}/register", json=REGISTER), "10")

        asyncio.run(asyncio.to_thread(migrate.upgrade, empty_database_url))

        # The same process becomes ready, without a restart, and says so in its log.
        _poll("GET /readyz 200", lambda: httpx.get(f"{running.url}/readyz").status_code == 200)
        response = httpx.post(f"{running.url}/register", json=REGISTER)
        assert response.status_code == 201, response.text
        _poll("database.ready in the log", lambda: running.events("database.ready"), 10)
        _assert_clean(running.log())


def test_unreachable_database_is_logged_at_start_up_and_rate_limited() -> None:
    url = f"postgresql://app:hunter2@127.0.0.1:{free_port()}/outbox"
    with api(url) as running:
        _poll("the start-up log line", lambda: running.events("database.unreachable"), 10)
        ready = httpx.get(f"{running.url}/readyz")
        assert ready.status_code == 503 and ready.json()["database"] == "unreachable"
        assert ready.headers["retry-after"] == "1"
        for _ in range(20):
            _assert_503(httpx.post(f"{running.url}/register", json=REGISTER), "1")
        lines = running.events("database.unreachable")
        assert len(lines) == 1, running.log()
        assert lines[0]["setting"] == "DATABASE_URL"
        assert "cannot reach the database at postgresql://app:***@127.0.0.1:" in str(
            lines[0]["error"]
        )
        assert "hunter2" not in running.log()
        _assert_clean(running.log())


def test_metrics_docs_and_a_graceful_sigterm(database_url: str) -> None:
    with api(database_url) as running:
        assert httpx.post(f"{running.url}/register", json=REGISTER).status_code == 201
        metrics = httpx.get(f"{running.url}/metrics").text
        names = set(re.findall(r"^# TYPE (\S+)", metrics, re.MULTILINE))
        assert {"outbox_registrations_total", "outbox_database_up"} <= names
        assert any(name.startswith("process_") for name in names)
        # The dispatcher's metrics mean nothing in the API process: not served there.
        dispatcher = ("outbox_mails", "outbox_send", "outbox_claim", "outbox_attempt")
        assert not {name for name in names if name.startswith(dispatcher)}, names

        # /docs works without internet access: every asset it loads is served locally.
        page = httpx.get(f"{running.url}/docs").text
        assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page)
        assert any(a.endswith(".js") for a in assets) and any(a.endswith(".css") for a in assets)
        for asset in assets:
            assert asset.startswith("/"), f"{asset} is not served by the API"
            assert httpx.get(f"{running.url}{asset}").status_code == 200, asset
        assert "cdn" not in page.lower()

        running.proc.send_signal(signal.SIGTERM)
        assert running.proc.wait(timeout=20) == 0, running.log()
        _assert_clean(running.log())
