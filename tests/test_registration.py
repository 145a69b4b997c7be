"""POST /register against a real database."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
from asgi_lifespan import LifespanManager

from api.app import create_app
from dispatcher.settings import Settings


@pytest.fixture
async def client(database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(database_url=database_url, mail_from="Outbox <hello@example.org>"))
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            yield http


async def test_register_creates_user_and_outbox_row(
    client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    response = await client.post("/register", json={"email": "ada@example.com", "name": "Ada"})
    assert response.status_code == 201, response.text
    body = response.json()
    user = await db.fetchrow("SELECT * FROM users WHERE id = $1", body["id"])
    mail = await db.fetchrow("SELECT * FROM outbox WHERE id = $1", body["outbox_id"])
    assert user["email"] == "ada@example.com"
    assert mail["recipient"] == "ada@example.com"
    assert mail["status"] == "pending"
    assert mail["message_id"] == body["message_id"]
    assert mail["message_id"].endswith("@example.org>")
