"""GET /metrics: process metrics, registrations, queue gauges read at scrape time."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import httpx
import pytest
from asgi_lifespan import LifespanManager
from prometheus_client.parser import text_string_to_metric_families

from outbox.api.app import create_app
from outbox.cli.embedded_pg import free_port
from outbox.dispatcher import operations
from outbox.dispatcher.queue_metrics import QueueCollector, QueueSample
from outbox.dispatcher.settings import Settings
from tests.audit_seed import add_mail, backdate


async def _client(database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(database_url=database_url))
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            yield http


@pytest.fixture
async def client(database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async for http in _client(database_url):
        yield http


@pytest.fixture
async def down_client() -> AsyncIterator[httpx.AsyncClient]:
    """An app whose database does not exist (nothing listens on the port)."""
    async for http in _client(f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"):
        yield http


async def scrape(client: httpx.AsyncClient) -> dict[str, float]:
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


async def test_queue_gauges(client: httpx.AsyncClient, db: asyncpg.Pool) -> None:
    stuck = await add_mail(db)
    await backdate(db, stuck, timedelta(minutes=10))
    await add_mail(db)
    await add_mail(db, status="sending")
    await add_mail(db, status="sent")
    await add_mail(db, status="failed")
    await db.execute(
        """
        INSERT INTO dispatchers (name, hostname, pid, last_beat_at) VALUES
            ('a', 'h', 1, now()), ('b', 'h', 2, now()), ('gone', 'h', 3, now() - interval '1 hour')
        """
    )

    metrics = await scrape(client)

    assert metrics["outbox_database_up"] == 1
    assert metrics['outbox_rows{status="pending"}'] == 2
    assert metrics['outbox_rows{status="sending"}'] == 1
    assert metrics['outbox_rows{status="sent"}'] == 1
    assert metrics['outbox_rows{status="failed"}'] == 1
    assert metrics['outbox_rows{status="cancelled"}'] == 0
    assert metrics["outbox_rows_sent_estimated"] == 0
    assert metrics["outbox_due_pending"] == 2
    assert 600 <= metrics["outbox_oldest_due_pending_seconds"] < 700
    assert metrics["outbox_live_dispatchers"] == 2


async def test_empty_queue_reads_zero(client: httpx.AsyncClient) -> None:
    metrics = await scrape(client)
    assert metrics["outbox_oldest_due_pending_seconds"] == 0
    assert metrics["outbox_due_pending"] == 0
    assert metrics["outbox_live_dispatchers"] == 0


async def test_registrations_counter(client: httpx.AsyncClient) -> None:
    before = (await scrape(client)).get("outbox_registrations_total", 0.0)
    for i in range(3):
        response = await client.post(
            "/register", json={"email": f"user{i}@example.com", "name": f"User {i}"}
        )
        assert response.status_code == 201, response.text
    duplicate = await client.post("/register", json={"email": "user0@example.com", "name": "X"})
    assert duplicate.status_code == 409
    after = await scrape(client)
    assert after["outbox_registrations_total"] == before + 3
    assert after['outbox_rows{status="pending"}'] == 3


async def test_database_down_still_answers_with_process_metrics(
    down_client: httpx.AsyncClient,
) -> None:
    response = await down_client.get("/metrics")
    assert response.status_code == 200
    metrics = await scrape(down_client)
    assert metrics["outbox_database_up"] == 0
    assert not any(name.startswith("outbox_rows") for name in metrics)
    assert "outbox_oldest_due_pending_seconds" not in metrics
    assert any(name.startswith(("process_", "python_")) for name in metrics)
    assert "outbox_registrations_total" in metrics


async def test_database_without_schema_reads_as_down(pg_server: object) -> None:
    from tests.conftest import PgServer

    assert isinstance(pg_server, PgServer)
    async for http in _client(pg_server.url("postgres")):
        metrics = await scrape(http)
        assert metrics["outbox_database_up"] == 0


def test_collector_reuse_with_a_sample_function() -> None:
    """The dispatcher's metrics server can hand the collector its latest sample."""
    from prometheus_client import CollectorRegistry, generate_latest

    latest: list[QueueSample | None] = [None]
    registry = CollectorRegistry()
    registry.register(QueueCollector(lambda: latest[0]))
    assert b"outbox_database_up 0.0" in generate_latest(registry)
    latest[0] = QueueSample(
        queue=operations.QueueCounts(
            counts=dict.fromkeys(operations.STATUSES, 0) | {"pending": 7},
            sent_estimated=True,
            oldest_due_pending_seconds=12.5,
            due_pending=7,
            live_dispatchers=3,
        )
    )
    text = generate_latest(registry).decode()
    assert "outbox_database_up 1.0" in text
    assert 'outbox_rows{status="pending"} 7.0' in text
    assert "outbox_oldest_due_pending_seconds 12.5" in text
    assert "outbox_rows_sent_estimated 1.0" in text
    assert "outbox_live_dispatchers 3.0" in text
