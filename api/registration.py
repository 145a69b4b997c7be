"""POST /register: the user row and the welcome mail, written atomically.

Without an ``Idempotency-Key`` header, in one statement. With one, in one transaction
that also stores the key and the answer (``api.idempotency``), so a retry is answered
with the original 201 instead of a 409.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from datetime import datetime
from typing import Annotated, Any, Final

import asyncpg
from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, StatusCode, Tracer
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

from outbox.api import idempotency
from outbox.api.metrics import REGISTRATIONS
from outbox.api.welcome import WelcomeTemplates
from outbox.dispatcher import tracing
from outbox.dispatcher.addresses import email_key, smtp_address, unsafe_text
from outbox.dispatcher.outbox import Enqueued, Mail, enqueue_with

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


_KEY_PARAMETER = {
    "name": idempotency.HEADER,
    "in": "header",
    "required": False,
    "description": "Makes retries safe: a repeat with the same key and body within 24 hours "
    "gets the original 201 (same ids) with `Idempotent-Replayed: true`, and creates nothing; "
    "the same key with another body is a 422. Use a new random key (a UUID) per registration.",
    "schema": {
        "type": "string",
        "minLength": 1,
        "maxLength": idempotency.MAX_LENGTH,
        "pattern": "^[!-~]([ -~]*[!-~])?$",
    },
}


def _key_error(kind: str, message: str) -> JSONResponse:
    return _unprocessable([{"type": kind, "loc": ["header", idempotency.HEADER], "msg": message}])


@router.post(
    "/register",
    status_code=201,
    response_model=Registered,
    responses={
        201: {
            "description": "The user and their queued welcome mail (or, for a repeat with "
            "the same Idempotency-Key, the original answer).",
            "headers": {
                idempotency.REPLAYED_HEADER: {
                    "description": "`true` when this is the stored answer to an earlier "
                    "request with the same Idempotency-Key; absent otherwise.",
                    "schema": {"type": "string", "enum": ["true"]},
                }
            },
        },
        409: {
            "description": "A user with this email already exists (in any letter case, "
            "Unicode normalisation or IDN spelling)."
        },
        413: {"description": "The body is larger than 64 KiB."},
        422: {
            "description": "Invalid email or name, a body that is not a JSON object, a bad "
            "Idempotency-Key, or a key already used with another body."
        },
        503: {"description": "The database is unavailable; retry later."},
    },
    openapi_extra={"requestBody": _REQUEST_BODY, "parameters": [_KEY_PARAMETER]},
)
async def register(request: Request) -> Response:
    """Create a user and queue their welcome mail atomically."""
    with _request_span(request) as span:
        try:
            response = await _register(request)
        except HTTPException as exc:
            span.set_attribute(_STATUS_CODE, exc.status_code)
            raise
        except Exception as exc:
            span.record_exception(exc)
            span.set_status(StatusCode.ERROR, type(exc).__name__)
            raise
        span.set_attribute(_STATUS_CODE, response.status_code)
        return response


_STATUS_CODE: Final = "http.response.status_code"
_SERVER_ATTRIBUTES: Final = {"http.request.method": "POST", "http.route": "/register"}


def _request_span(request: Request) -> AbstractContextManager[Span]:
    """The registration's span, whose trace the welcome mail's delivery continues.

    It is the request's span, continuing the trace of a W3C ``traceparent`` header the
    client sent; under an instrumentation that already made the request's span (e.g.
    opentelemetry-instrumentation-fastapi), a step inside that one. Without an
    OpenTelemetry SDK, not even a no-op span is started (the hot path stays as it was).
    """
    tracer: Tracer = request.app.state.tracer
    if not tracing.may_record(tracer):
        return nullcontext(trace.INVALID_SPAN)
    if trace.get_current_span().get_span_context().is_valid:
        return tracer.start_as_current_span(
            "outbox.register", record_exception=False, set_status_on_exception=False
        )
    return tracer.start_as_current_span(
        "POST /register",
        context=tracing.parent_context(request.headers),
        kind=SpanKind.SERVER,
        attributes=_SERVER_ATTRIBUTES,
        record_exception=False,
        set_status_on_exception=False,
    )


async def _register(request: Request) -> Response:
    try:
        key = idempotency.key_from(request.headers)
    except idempotency.BadKey as exc:
        return _key_error("idempotency_key", f"{idempotency.HEADER} {exc}")
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
    welcome: WelcomeTemplates = request.app.state.welcome
    mail = welcome.render(body.email, body.name)
    if key is not None:
        return await _register_with_key(request, key, body, mail)
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
    return _created(_registered(body, user, queued), user, queued)


def _registered(body: Registration, user: asyncpg.Record, queued: Enqueued) -> str:
    return Registered(
        id=user["id"],
        email=body.email,
        name=body.name,
        created_at=user["created_at"],
        outbox_id=queued.id,
        message_id=queued.message_id,
    ).model_dump_json()


def _created(content: str, user: asyncpg.Record, queued: Enqueued) -> Response:
    REGISTRATIONS.inc()
    span = trace.get_current_span()
    if span.is_recording():  # the user and the mail are committed now
        span.add_event("outbox.enqueued", {"outbox.id": queued.id, "user.id": user["id"]})
        span.set_attribute("outbox.message_id", queued.message_id)
    # Debug level: the outbox row is the durable record, and a log line per registration
    # costs more CPU than the rest of the handler's own work.
    log.debug(
        "user.registered",
        extra={"user_id": user["id"], "outbox_id": queued.id, "message_id": queued.message_id},
    )
    return Response(content, status_code=201, media_type="application/json")


class _KeyTaken(Exception):
    """The key was stored by a request that committed first: roll back, answer from it."""


#: Passes of the keyed path: a second only when the key that stopped the first expired
#: (or was deleted) before it could be read.
_KEYED_PASSES = 3


async def _register_with_key(
    request: Request, key: str, body: Registration, mail: Mail
) -> Response:
    """Register with an idempotency key: the user, the mail and the key in one transaction.

    Concurrent requests with one key serialise on the database: on the key's primary key,
    or first on the user's unique email when the bodies are the same. The first to commit
    wins; each other one rolls back and answers from the key it finds: the stored 201 for
    the same body, a 422 for another.
    """
    hashed = idempotency.request_hash(body.model_dump_json())
    pool: asyncpg.Pool = request.app.state.pool
    async with request.app.state.gate, pool.acquire() as conn:
        for _ in range(_KEYED_PASSES):
            try:
                async with conn.transaction():
                    written = await enqueue_with(
                        conn,
                        INSERT_USER,
                        (body.email, email_key(body.email), body.name),
                        mail,
                        sender=request.app.state.sender,
                    )
                    assert written is not None  # no ON CONFLICT: a row or an error
                    user, queued = written
                    content = _registered(body, user, queued)
                    if not await idempotency.record(
                        conn, key, hashed, user["id"], queued.id, content
                    ):
                        raise _KeyTaken
            except asyncpg.UniqueViolationError as exc:
                if exc.constraint_name != USERS_EMAIL_KEY:
                    raise
                email_taken = True
            except _KeyTaken:
                email_taken = False
            else:
                return _created(content, user, queued)
            stored = await idempotency.find(conn, key)
            if stored is not None:
                if stored.request_hash != hashed:
                    return _key_error(
                        "idempotency_key_reused",
                        f"this {idempotency.HEADER} was used with a different body in the "
                        "last 24 hours; use a new key for a new registration",
                    )
                return Response(
                    stored.response,
                    status_code=201,
                    media_type="application/json",
                    headers={idempotency.REPLAYED_HEADER: "true"},
                )
            if email_taken:
                raise HTTPException(409, "a user with this email already exists")
    raise RuntimeError(f"{idempotency.HEADER} kept expiring while it was being used")
