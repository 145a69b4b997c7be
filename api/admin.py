"""Admin endpoints: audit and operate the outbox over HTTP (Bearer ``ADMIN_TOKEN``).

Without ``ADMIN_TOKEN`` configured every admin endpoint answers 404 and never data; with
it, a missing or wrong token gets 401 with ``WWW-Authenticate: Bearer``. The token is
compared in constant time. The work is done by :mod:`dispatcher.operations`, the same
code as the ``outbox`` CLI.
"""

from __future__ import annotations

import hmac
import logging
from datetime import UTC, datetime
from typing import Annotated

import asyncpg
from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Security
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from outbox.dispatcher import operations as ops
from outbox.dispatcher import times
from outbox.dispatcher.outbox import MAX_KEY_LENGTH
from outbox.dispatcher.settings import Settings

log = logging.getLogger("api.admin")

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="AdminToken",
    description="The ADMIN_TOKEN setting, sent as `Authorization: Bearer <token>`.",
)


async def require_admin(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> None:
    """404 when no ADMIN_TOKEN is configured; 401 unless the bearer token matches it."""
    settings: Settings = request.app.state.settings
    if settings.admin_token is None:
        raise HTTPException(404, "Not Found")
    expected = settings.admin_token.get_secret_value().encode()
    given = credentials.credentials.encode() if credentials is not None else b""
    if credentials is None or not hmac.compare_digest(given, expected):
        challenge = 'Bearer realm="outbox-admin"'
        if credentials is not None:
            challenge += ', error="invalid_token"'
        raise HTTPException(
            401, "missing or wrong admin token", headers={"WWW-Authenticate": challenge}
        )


_AUTH_RESPONSES: dict[int | str, dict[str, object]] = {
    401: {"description": "Missing or wrong bearer token."},
    404: {"description": "Not found, or the admin endpoints are disabled (no ADMIN_TOKEN)."},
    503: {"description": "The database is unavailable; retry later."},
}

router = APIRouter(
    prefix="/outbox",
    tags=["admin"],
    dependencies=[Depends(require_admin)],
    responses=_AUTH_RESPONSES,
)


# --- Models ---------------------------------------------------------------------------------


class Mail(BaseModel):
    """An outbox row without its body."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    message_id: str
    sender: str
    recipient: str
    recipient_name: str
    subject: str
    status: ops.Status
    attempts: int = Field(description="Send attempts made so far (kept across retries).")
    next_attempt_at: datetime
    lease_owner: str | None = Field(description="The dispatcher sending it, while sending.")
    lease_expires_at: datetime | None
    last_error: str | None
    last_smtp_code: int | None
    created_at: datetime
    updated_at: datetime
    sent_at: datetime | None
    idempotency_key: str | None = Field(
        default=None,
        description="The idempotency key it was enqueued with (`enqueue(..., key=...)`), if any.",
    )


class Attempt(BaseModel):
    """One send attempt."""

    model_config = ConfigDict(from_attributes=True)

    attempt: int
    dispatcher: str
    started_at: datetime
    finished_at: datetime
    outcome: str = Field(
        description="sent, deferred, failed, abandoned, or unknown (the server had the whole "
        "message but its reply never came: it may have been delivered; retried)."
    )
    smtp_stage: str | None = Field(
        default=None,
        description="The last SMTP step begun: render, connect, mail, rcpt, data or "
        "end_of_data (the server had the whole message).",
    )
    smtp_code: int | None
    smtp_reply: str | None
    error: str | None
    lease_lost: bool = Field(
        description="The dispatcher had lost its lease when recording this attempt "
        "(a possible duplicate delivery)."
    )


class Header(BaseModel):
    """A header of the message as it is sent."""

    name: str
    value: str


class Why(BaseModel):
    """Why the mail has not gone yet (or when and how it went), in plain words."""

    model_config = ConfigDict(from_attributes=True)

    summary: str = Field(description="One sentence: where the mail stands.")
    reasons: list[str] = Field(description="The plain-words lines behind the summary.")
    next_attempt_at: datetime | None = Field(
        description="When the next attempt is due (pending mail only)."
    )
    lease_owner: str | None = Field(description="The dispatcher holding its lease, if any.")
    owner_alive: bool | None = Field(
        description="Whether that dispatcher still heartbeats; null without a lease."
    )
    last_reply: str | None = Field(
        description="The last SMTP reply (code and text) or error, and how far it got."
    )


class MailDetail(Mail):
    """An outbox row in full, with its attempts and the rendered headers."""

    body_text: str
    body_html: str | None
    leased_at: datetime | None
    history: list[Attempt]
    headers: list[Header]
    render_error: str | None = None
    why: Why | None = Field(
        default=None,
        description="Why it has not gone yet (or when and how it went), as `outbox explain`.",
    )


class MailPage(BaseModel):
    """A page of mail, newest first."""

    items: list[Mail]
    next: int | None = Field(
        description="Pass as `cursor` to get the next page; null on the last page."
    )


class Conflict(BaseModel):
    """The mail's status does not allow the operation."""

    detail: str
    status: ops.Status


# --- Endpoints ------------------------------------------------------------------------------

OutboxId = Annotated[int, Path(ge=1, le=ops.MAX_ID, description="The outbox id.")]


def _utc(value: datetime | None) -> datetime | None:
    """The time in UTC (no offset means UTC); a ValueError (422) if UTC has no such time."""
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00+14:00 is in year 0 in UTC
        raise ValueError("must be between year 1 and year 9999 in UTC") from None


def _time_grammar(value: object) -> object:
    # The grammar of the CLI's --since/--until (dispatcher.times): ISO 8601 or an age.
    return times.parse_time(value) if isinstance(value, str) else value


_TIME_GRAMMAR = (
    "ISO 8601 (`2026-11-24`, `2026-11-24T10:00:00+01:00`; no offset means UTC) or an age "
    "meaning that long ago (`45s`, `90m`, `2h`, `7d`, `2w`), as the CLI's `--since`."
)

#: A time filter, in UTC once validated.
Time = Annotated[
    datetime | None,
    BeforeValidator(_time_grammar),
    AfterValidator(_utc),
    WithJsonSchema({"type": "string", "examples": ["2026-11-24T10:00:00Z", "2h", "7d"]}),
]


@router.get("", response_model=MailPage)
async def list_outbox(
    request: Request,
    status: Annotated[ops.Status | None, Query(description="Only mail in this status.")] = None,
    recipient: Annotated[
        str | None,
        Query(max_length=320, description="Only mail to this address (case-insensitive)."),
    ] = None,
    since: Annotated[Time, Query(description=f"Created at or after. {_TIME_GRAMMAR}")] = None,
    until: Annotated[Time, Query(description=f"Created before. {_TIME_GRAMMAR}")] = None,
    key: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=MAX_KEY_LENGTH,
            description="Only the mail enqueued with this idempotency key (exact match).",
        ),
    ] = None,
    cursor: Annotated[
        int | None,
        Query(ge=1, le=ops.MAX_ID, description="The `next` value of the previous page."),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500, description="Rows per page.")] = 50,
) -> MailPage:
    """List mail, newest first, with filters and keyset pagination."""
    pool: asyncpg.Pool = request.app.state.pool
    async with pool.acquire() as conn:
        page = await ops.list_mail(
            conn,
            status=status,
            recipient=recipient,
            since=since,
            until=until,
            before=cursor,
            limit=limit,
            key=key,
        )
    return MailPage(items=[Mail.model_validate(row) for row in page.items], next=page.next_cursor)


@router.get("/{outbox_id}", response_model=MailDetail)
async def show_outbox(outbox_id: OutboxId, request: Request) -> MailDetail:
    """One mail: the row, its body, every attempt, the headers as sent, and why it has
    not gone yet."""
    pool: asyncpg.Pool = request.app.state.pool
    settings: Settings = request.app.state.settings
    async with pool.acquire() as conn:
        detail = await ops.show(conn, outbox_id)
        why = await ops.explain(
            conn,
            outbox_id,
            max_attempts=settings.dispatcher_max_attempts,
            max_age=settings.dispatcher_max_age,
        )
    if detail is None:
        raise HTTPException(404, f"no mail with id {outbox_id}")
    return MailDetail(
        **Mail.model_validate(detail.row).model_dump(),
        body_text=detail.body_text,
        body_html=detail.body_html,
        leased_at=detail.leased_at,
        history=[Attempt.model_validate(a) for a in detail.history],
        headers=[Header(name=n, value=v) for n, v in detail.headers],
        render_error=detail.render_error,
        why=Why.model_validate(why) if why is not None else None,
    )


async def _change(
    request: Request, outbox_id: int, action: str, *, now: bool = False
) -> Mail | JSONResponse:
    pool: asyncpg.Pool = request.app.state.pool
    async with pool.acquire() as conn:
        if action == "retry":
            result = await ops.retry(conn, [outbox_id], now=now)
        else:
            result = await ops.cancel(conn, [outbox_id])
        row = await ops.get(conn, outbox_id)
    if result.refused:
        refused = result.refused[0]
        if refused.status is None or row is None:
            raise HTTPException(404, f"no mail with id {outbox_id}")
        detail = refused.reason
        if action == "retry" and refused.status == "pending":
            detail += " (now=true makes it due at once)"
        return JSONResponse(
            Conflict(detail=detail, status=row.status).model_dump(), status_code=409
        )
    assert row is not None
    log.info(f"admin.{action}", extra={"outbox_id": outbox_id})
    return Mail.model_validate(row)


@router.post(
    "/{outbox_id}/retry",
    response_model=Mail,
    responses={
        409: {
            "model": Conflict,
            "description": "Only failed or cancelled mail (and pending mail with now=true).",
        }
    },
)
async def retry_outbox(
    outbox_id: OutboxId,
    request: Request,
    now: Annotated[
        bool,
        Query(description="Also make pending mail that waits for a later attempt due at once."),
    ] = False,
) -> Mail | JSONResponse:
    """Queue a failed (or cancelled) mail again, due now; attempts history is kept. With
    `now=true`, pending mail waiting for a later attempt (deferred) is made due at once."""
    return await _change(request, outbox_id, "retry", now=now)


@router.post(
    "/{outbox_id}/cancel",
    response_model=Mail,
    responses={
        409: {"model": Conflict, "description": "Only pending or failed mail; never sending."}
    },
)
async def cancel_outbox(outbox_id: OutboxId, request: Request) -> Mail | JSONResponse:
    """Cancel a pending or failed mail (a mail being sent cannot be recalled)."""
    return await _change(request, outbox_id, "cancel")
