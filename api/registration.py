"""POST /register: the user row and the welcome mail, in one transaction."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Annotated

import asyncpg
from fastapi import APIRouter, HTTPException, Request
from pydantic import AfterValidator, BaseModel, ConfigDict, EmailStr, Field, StringConstraints

from api.metrics import REGISTRATIONS
from api.welcome import welcome_mail
from dispatcher.outbox import enqueue, has_control_chars

log = logging.getLogger("api.registration")
router = APIRouter()

INSERT_USER = "INSERT INTO users (email, name) VALUES ($1, $2) RETURNING id, created_at"


def _plain_text(value: str) -> str:
    if has_control_chars(value):
        raise ValueError("must be plain text without control characters (no CR, LF, tab, ...)")
    return value


Name = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=200),
    AfterValidator(_plain_text),
]


class Registration(BaseModel):
    """The registration form."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    email: Annotated[EmailStr, Field(max_length=254, examples=["ada@example.com"])]
    name: Annotated[Name, Field(examples=["Ada Lovelace"])]


class Registered(BaseModel):
    """The new user and the outbox row holding their welcome mail."""

    id: int
    email: str
    name: str
    created_at: datetime
    outbox_id: int
    message_id: str


@router.post(
    "/register",
    status_code=201,
    response_model=Registered,
    responses={
        409: {"description": "A user with this email (in any letter case) already exists."},
        422: {"description": "Invalid email or name."},
        503: {"description": "The database is unavailable; retry later."},
    },
)
async def register(body: Registration, request: Request) -> Registered:
    """Create a user and queue their welcome mail atomically."""
    mail = welcome_mail(body.email, body.name)
    pool: asyncpg.Pool = request.app.state.pool
    async with pool.acquire() as conn, conn.transaction():
        try:
            user = await conn.fetchrow(INSERT_USER, body.email, body.name)
        except asyncpg.UniqueViolationError:
            raise HTTPException(409, "a user with this email already exists") from None
        assert user is not None
        queued = await enqueue(conn, mail, sender=request.app.state.sender)
    REGISTRATIONS.inc()
    log.info(
        "user.registered",
        extra={"user_id": user["id"], "outbox_id": queued.id, "message_id": queued.message_id},
    )
    return Registered(
        id=user["id"],
        email=body.email,
        name=body.name,
        created_at=user["created_at"],
        outbox_id=queued.id,
        message_id=queued.message_id,
    )
