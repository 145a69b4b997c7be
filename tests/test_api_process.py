"""``outbox api`` as a real process: its database's problems, its log, /metrics, /docs, SIGTERM.

Every database-side problem is a 503 with Retry-After, never a 500; /readyz says which
problem and what to do; the log says it at start-up, without waiting for a request, and
not once per failing request.
"""

from __future__ import annotations

import asyncio
import re
import signal

import httpx

from outbox.cli import migrate
from outbox.cli.embedded_pg import free_port
from tests.api_process import api, poll

REGISTER = {"email": "ada@example.com", "name": "Ada"}


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
        poll("the start-up log line", lambda: running.events("database.misconfigured"), 10)
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
        poll("GET /readyz 200", lambda: httpx.get(f"{running.url}/readyz").status_code == 200)
        response = httpx.post(f"{running.url}/register", json=REGISTER)
        assert response.status_code == 201, response.text
        poll("database.ready in the log", lambda: running.events("database.ready"), 10)
        _assert_clean(running.log())


def test_unreachable_database_is_logged_at_start_up_and_rate_limited() -> None:
    url = f"postgresql://app:hunter2@127.0.0.1:{free_port()}/outbox"
    with api(url) as running:
        poll("the start-up log line", lambda: running.events("database.unreachable"), 10)
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
