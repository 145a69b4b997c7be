"""The benchmark's baseline: the least code that does registration's database work.

A bare FastAPI route on raw asyncpg: parse the JSON, then in one transaction insert the
user (with its mailbox key, computed by the same ``dispatcher.addresses.email_key``) and an
outbox row with the same columns ``POST /register`` fills (rendered text and HTML bodies,
Message-ID, sender) and the same commit-time NOTIFY. No validation models, no response
model, no logging. Serve with::

    DATABASE_URL=postgresql://... uvicorn --factory bench.raw_app:create_app
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from html import escape

import asyncpg
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from outbox.dispatcher.addresses import email_key

SENDER = "Outbox <noreply@example.com>"
INSERT_USER = (
    "INSERT INTO users (email, email_key, name) VALUES ($1, $2, $3) RETURNING id, created_at"
)
INSERT_MAIL = """
WITH inserted AS (
    INSERT INTO outbox (message_id, sender, recipient, recipient_name, subject,
                        body_text, body_html, next_attempt_at, recipient_domain, recipient_key)
    VALUES ($1, $2, $3, $4, $5, $6, $7, now(), $8, $9)
    RETURNING id
)
SELECT id, pg_notify('outbox_mail', '') AS _ FROM inserted
"""


def create_app() -> FastAPI:
    url = os.environ["DATABASE_URL"]
    pool_size = int(os.environ.get("BENCH_POOL_SIZE", "20"))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.pool = await asyncpg.create_pool(url, min_size=0, max_size=pool_size)
        try:
            yield
        finally:
            await app.state.pool.close()

    app = FastAPI(lifespan=lifespan)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/register")
    async def register(request: Request) -> JSONResponse:
        data = await request.json()
        email, name = data["email"], data["name"]
        message_id = f"<{uuid.uuid4().hex}@example.com>"
        subject = f"Welcome to Outbox, {name}!"
        text = f"Hello {name},\n\nyour account ({email}) is ready.\n"
        html = f"<p>Hello {escape(name)},</p><p>your account ({escape(email)}) is ready.</p>"
        pool: asyncpg.Pool = request.app.state.pool
        key = email_key(email)
        async with pool.acquire() as conn, conn.transaction():
            user = await conn.fetchrow(INSERT_USER, email, key, name)
            mail = await conn.fetchrow(
                INSERT_MAIL,
                message_id,
                SENDER,
                email,
                name,
                subject,
                text,
                html,
                key.rpartition("@")[2],
                key,
            )
        return JSONResponse(
            {
                "id": user["id"],
                "email": email,
                "name": name,
                "created_at": user["created_at"].isoformat(),
                "outbox_id": mail["id"],
                "message_id": message_id,
            },
            status_code=201,
        )

    return app
