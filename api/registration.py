"""POST /register: the user row and the welcome mail, written atomically in one statement."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Annotated, Any

import asyncpg
from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    EmailStr,
    Field,
    StringConstraints,
    ValidationError,
)

from api.metrics import REGISTRATIONS
from api.welcome import welcome_mail
from dispatcher.addresses import email_key, smtp_address, unsafe_text
from dispatcher.outbox import enqueue_with

log = logging.getLogger("api.registration")
router = APIRouter()

INSERT_USER = (
    "INSERT INTO users (email, email_key, name) VALUES ($1, $2, $3) RETURNING id, created_at"
)
#: The unique index on users.email_key (one key per mailbox, whatever the letter case,
#: Unicode normalisation or IDN spelling): its violation, and only its, means "already
#: registered".
USERS_EMAIL_KEY = "users_email_key_key"


def _plain_text(value: str) -> str:
    # No controls (CR, LF, NUL, ...), line or paragraph separators, lone surrogates (JSON
    # can spell them) or bidirectional overrides: the name goes into the subject and the
    # To header, and is shown to operators. Anything else, zero-width joiners and text
    # that looks like an RFC 2047 encoded word included, is stored and sent as typed.
    reason = unsafe_text(value)
    if reason is not None:
        raise ValueError(reason)
    return value


def _bare_address(value: object) -> object:
    # EmailStr also accepts 'Ada <ada@example.com>' and keeps only the address; a form
    # field holding a display name is a client mistake, so say so instead of guessing.
    if isinstance(value, str) and ("<" in value or ">" in value):
        raise ValueError("must be a bare address like ada@example.com (no display name or <>)")
    return value


def _sendable(value: str) -> str:
    # ValueError (a 422) if the domain has no ASCII (A-label) form, or the local part
    # holds "=?" (mail readers would decode it as an encoded-word).
    smtp_address(value)
    return value


Email = Annotated[
    EmailStr,
    BeforeValidator(_bare_address),
    AfterValidator(_sendable),
    Field(max_length=254, examples=["ada@example.com"]),
]


Name = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=200),
    AfterValidator(_plain_text),
]


class Registration(BaseModel):
    """The registration form."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    email: Email
    name: Annotated[Name, Field(examples=["Ada Lovelace"])]


class Registered(BaseModel):
    """The new user and the outbox row holding their welcome mail."""

    id: int
    email: str
    name: str
    created_at: datetime
    outbox_id: int
    message_id: str


_REQUEST_BODY = {
    "required": True,
    "content": {"application/json": {"schema": Registration.model_json_schema()}},
}


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return True  # like FastAPI: a body without a Content-Type is read as JSON
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def _unprocessable(errors: list[dict[str, Any]]) -> JSONResponse:
    # FastAPI's 422 shape ({"detail": [{"type", "loc", "msg"}]}), without echoing the input.
    return JSONResponse({"detail": errors}, status_code=422)


@router.post(
    "/register",
    status_code=201,
    response_model=Registered,
    responses={
        409: {
            "description": "A user with this email already exists (in any letter case, "
            "Unicode normalisation or IDN spelling)."
        },
        413: {"description": "The body is larger than 64 KiB."},
        422: {"description": "Invalid email or name, or a body that is not a JSON object."},
        503: {"description": "The database is unavailable; retry later."},
    },
    openapi_extra={"requestBody": _REQUEST_BODY},
)
async def register(request: Request) -> Response:
    """Create a user and queue their welcome mail atomically."""
    # The body is parsed and validated in one step by pydantic's JSON parser (not FastAPI's
    # json.loads + dict validation): about twice as fast, and malformed input of any kind
    # (bad JSON, invalid UTF-8, lone surrogates) becomes a 422 like every other bad input.
    if not _is_json(request.headers.get("content-type")):
        return _unprocessable(
            [
                {
                    "type": "content_type",
                    "loc": ["body"],
                    "msg": "the body must be JSON (Content-Type: application/json)",
                }
            ]
        )
    try:
        body = Registration.model_validate_json(await request.body())
    except ValidationError as exc:
        return _unprocessable(
            [
                {"type": error["type"], "loc": ["body", *error["loc"]], "msg": error["msg"]}
                for error in exc.errors(
                    include_url=False, include_context=False, include_input=False
                )
            ]
        )
    mail = welcome_mail(body.email, body.name)
    pool: asyncpg.Pool = request.app.state.pool
    # The user row and the outbox row in one statement: atomic by itself, and one round
    # trip instead of four (BEGIN, two INSERTs, COMMIT). The gate queues requests fairly
    # for a connection (see api.app).
    async with request.app.state.gate, pool.acquire() as conn:
        try:
            written = await enqueue_with(
                conn,
                INSERT_USER,
                (body.email, email_key(body.email), body.name),
                mail,
                sender=request.app.state.sender,
            )
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name != USERS_EMAIL_KEY:
                raise
            raise HTTPException(409, "a user with this email already exists") from None
    assert written is not None  # the INSERT has no ON CONFLICT: a row or an error
    user, queued = written
    REGISTRATIONS.inc()
    # Debug level: the outbox row is the durable record, and a log line per registration
    # costs more CPU than the rest of the handler's own work.
    log.debug(
        "user.registered",
        extra={"user_id": user["id"], "outbox_id": queued.id, "message_id": queued.message_id},
    )
    registered = Registered(
        id=user["id"],
        email=body.email,
        name=body.name,
        created_at=user["created_at"],
        outbox_id=queued.id,
        message_id=queued.message_id,
    )
    return Response(registered.model_dump_json(), status_code=201, media_type="application/json")
