"""Admin endpoints: audit and operate the outbox over HTTP (Bearer ``ADMIN_TOKEN``).

``/outbox``: the mail (list, show, retry, cancel). ``/policies``: the sending policy of
all mail (scope ``*``) and of each recipient domain (limits, pause, throttle), and
``/suppressions``: the suppression list; the twins of ``outbox limit``, ``outbox pause``,
``outbox resume``, ``outbox suppress`` and ``outbox unsuppress``.

Without ``ADMIN_TOKEN`` configured every admin endpoint answers 404 and never data; with
it, a missing or wrong token gets 401 with ``WWW-Authenticate: Bearer``. The token is
compared in constant time. The work is done by :mod:`dispatcher.operations` and
:mod:`dispatcher.policies`, the same code as the ``outbox`` CLI.
"""

from __future__ import annotations

import hmac
import logging
from datetime import UTC, datetime
from typing import Annotated, TypeVar

import asyncpg
from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Security
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from outbox.dispatcher import operations as ops
from outbox.dispatcher import policies, times
from outbox.dispatcher.outbox import MAX_KEY_LENGTH
from outbox.dispatcher.policy import ALL_MAIL, parse_rate
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

mail_router = APIRouter(
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


@mail_router.get("", response_model=MailPage)
async def list_outbox(
    request: Request,
    status: Annotated[ops.Status | None, Query(description="Only mail in this status.")] = None,
    recipient: Annotated[
        str | None,
        Query(
            max_length=ops.MAX_RECIPIENT_FILTER,
            description="Only mail to this address (case-insensitive).",
        ),
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


@mail_router.get("/{outbox_id}", response_model=MailDetail)
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


@mail_router.post(
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


@mail_router.post(
    "/{outbox_id}/cancel",
    response_model=Mail,
    responses={
        409: {"model": Conflict, "description": "Only pending or failed mail; never sending."}
    },
)
async def cancel_outbox(outbox_id: OutboxId, request: Request) -> Mail | JSONResponse:
    """Cancel a pending or failed mail (a mail being sent cannot be recalled)."""
    return await _change(request, outbox_id, "cancel")


# --- Sending policy: limits, pauses, suppressions -------------------------------------------

policy_router = APIRouter(
    tags=["admin"],
    dependencies=[Depends(require_admin)],
    responses=_AUTH_RESPONSES,
)

#: The path segment that names the scope of all mail (no domain is spelt like that).
ALL_MAIL_SEGMENT = "*"


def _scope_segment(value: str) -> str:
    """``*``: all mail (``policy.ALL_MAIL``); anything else must be a domain (a 422 if not)."""
    return ALL_MAIL if value == ALL_MAIL_SEGMENT else policies.domain_name(value)


def _address_segment(value: str) -> str:
    policies.address_key(value)  # a 422 saying what is wrong
    return value


Scope = Annotated[
    str,
    Path(
        max_length=1000,
        description="`*` for all mail, else a recipient domain (IDN or A-label, any case).",
        examples=["*", "example.com"],
    ),
    AfterValidator(_scope_segment),
]
AddressPath = Annotated[
    str,
    Path(max_length=policies.MAX_ADDRESS_LENGTH, description="An email address (any spelling)."),
    AfterValidator(_address_segment),
]


class RateWindow(BaseModel):
    """One rate of a scope and its token bucket now."""

    rate: str = Field(description="As written: `40/s`, `1000/h`, `10/5m`.", examples=["40/s"])
    count: int
    per_seconds: int
    burst: float = Field(description="Most mails that may go at once (the bucket's size).")
    tokens: float = Field(description="Tokens in the bucket now: mails that may go at once.")


class Throttle(BaseModel):
    """The adaptive throttle: temporary refusals (421, 450, 451, 454) slowed the scope."""

    rate: float = Field(description="Mails per second now, rising linearly until a refusal.")
    base: float = Field(description="Mails per second the last refusal halved.")
    since: datetime = Field(description="When the last refusal slowed it down.")


class Policy(BaseModel):
    """A scope's sending policy and its traffic now."""

    domain: str | None = Field(description="The recipient domain (A-label); null: all mail.")
    rates: list[RateWindow]
    concurrency: int | None = Field(description="Most mails in flight at once; null: no limit.")
    paused: bool
    throttle: Throttle | None = Field(description="Set while the adaptive throttle holds it.")
    in_flight: int = Field(description="Mails of the scope being sent now.")
    waiting: int = Field(description="Pending mails of the scope that are due now.")
    updated_at: datetime | None = Field(description="Last change; null: no policy at all.")


class PolicyList(BaseModel):
    """Every scope that has a policy: all mail first, then domains A to Z."""

    items: list[Policy]


def _rate(text: str) -> str:
    parse_rate(text)  # a 422 saying what is wrong
    return text


class Limits(BaseModel):
    """The limits to set; a field left out keeps the scope's current value."""

    model_config = ConfigDict(extra="forbid")

    rates: list[Annotated[str, Field(max_length=40), AfterValidator(_rate)]] | None = Field(
        default=None,
        min_length=1,
        max_length=policies.MAX_RATES,
        description="Rates such as `40/s`, `1000/h`, `50000/d`, `10/5m`, one per window: "
        "they replace all of the scope's rates.",
        examples=[["40/s", "1000/h"]],
    )
    concurrency: int | None = Field(
        default=None,
        ge=1,
        le=policies.MAX_CONCURRENCY,
        description="Most mails of the scope in flight at once, fleet-wide.",
    )

    @field_validator("rates")
    @classmethod
    def _one_per_window(cls, rates: list[str] | None) -> list[str] | None:
        if rates is not None:
            policies.check_rates([parse_rate(r) for r in rates])
        return rates

    @model_validator(mode="after")
    def _complete(self) -> Limits:
        if self.rates is None and self.concurrency is None:
            raise ValueError("give rates or concurrency (or both)")
        return self


class Suppression(BaseModel):
    """An address no mail goes to."""

    model_config = ConfigDict(from_attributes=True)

    address: str
    address_key: str = Field(description="The mailbox's identity: one entry per mailbox.")
    source: str = Field(description="`smtp` (a permanent refusal) or `operator`.")
    reason: str
    outbox_id: int | None = Field(description="The mail whose refusal put it on the list.")
    created_at: datetime


class SuppressionList(BaseModel):
    """The newest entries of the suppression list, and how many there are."""

    items: list[Suppression]
    total: int


class SuppressionReason(BaseModel):
    """Why the address is suppressed (optional)."""

    model_config = ConfigDict(extra="forbid")

    reason: Annotated[str, AfterValidator(policies.check_reason)] | None = Field(
        default=None, max_length=policies.MAX_REASON_LENGTH, examples=["asked us to stop"]
    )


def _policy(p: policies.Policy) -> Policy:
    return Policy(
        domain=p.domain,
        rates=[
            RateWindow(
                rate=str(w.rate),
                count=w.count,
                per_seconds=w.per_seconds,
                burst=w.burst,
                tokens=w.tokens,
            )
            for w in p.rates
        ],
        concurrency=p.concurrency,
        paused=p.paused,
        throttle=Throttle(rate=p.throttle.rate, base=p.throttle.base, since=p.throttle.since)
        if p.throttle is not None
        else None,
        in_flight=p.in_flight,
        waiting=p.waiting,
        updated_at=p.updated_at,
    )


_Body = TypeVar("_Body", bound=BaseModel)


def _json_media(content_type: str | None) -> bool:
    if not content_type:
        return True  # like FastAPI: a body without a Content-Type is read as JSON
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


async def _body(request: Request, model: type[_Body], *, required: bool) -> _Body | None:
    """The request's JSON body as ``model`` (None when there is none and it may be left
    out), parsed and validated by pydantic in one step. Anything else is a 422 in FastAPI's
    shape that does not echo the input: malformed input (bad JSON, ``Infinity``, lone
    surrogates) may not even be representable in a JSON answer."""
    raw = await request.body()
    if not raw.strip() and not required:
        return None
    if not _json_media(request.headers.get("content-type")):
        msg = "the body must be JSON (Content-Type: application/json)"
        raise HTTPException(422, [{"type": "content_type", "loc": ["body"], "msg": msg}])
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        raise HTTPException(
            422,
            [{"type": e["type"], "loc": ["body", *e["loc"]], "msg": e["msg"]} for e in errors],
        ) from None


def _request_body(model: type[BaseModel], *, required: bool) -> dict[str, object]:
    """OpenAPI for a body that :func:`_body` reads."""
    return {
        "requestBody": {
            "required": required,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


_UNPROCESSABLE: dict[int | str, dict[str, object]] = {
    422: {"description": "Bad input: `detail` lists what is wrong, field by field."}
}


def _pool(request: Request) -> asyncpg.Pool:
    pool: asyncpg.Pool = request.app.state.pool
    return pool


@policy_router.get("/policies", response_model=PolicyList)
async def list_policies(request: Request) -> PolicyList:
    """Every scope with a policy: rates with their buckets now, concurrency, pause,
    throttle, mail in flight and waiting (`outbox limit list`)."""
    async with _pool(request).acquire() as conn:
        found = await policies.list_policies(conn)
    return PolicyList(items=[_policy(p) for p in found])


@policy_router.get("/policies/{scope}", response_model=Policy)
async def show_policy(scope: Scope, request: Request) -> Policy:
    """One scope's policy; a scope without one has no limit and is not paused."""
    async with _pool(request).acquire() as conn:
        return _policy(await policies.get_policy(conn, scope or None))


@policy_router.put(
    "/policies/{scope}/limits",
    response_model=Policy,
    responses=_UNPROCESSABLE,
    openapi_extra=_request_body(Limits, required=True),
)
async def set_limits(scope: Scope, request: Request) -> Policy:
    """Set the scope's rates (replacing all of its windows) and/or its concurrency limit;
    a field left out is kept, and so is a pause (`outbox limit set`)."""
    limits = await _body(request, Limits, required=True)
    assert limits is not None
    rates = [parse_rate(r) for r in limits.rates] if limits.rates is not None else None
    async with _pool(request).acquire() as conn:
        policy = await policies.set_limits(
            conn, scope or None, rates=rates, concurrency=limits.concurrency
        )
    log.info("admin.limit_set", extra={"scope": policies.scope_name(scope or None)})
    return _policy(policy)


@policy_router.delete(
    "/policies/{scope}/limits",
    response_model=Policy,
    responses={404: {"description": "The scope has no limit (or the endpoints are disabled)."}},
)
async def remove_limits(scope: Scope, request: Request) -> Policy:
    """Remove the scope's rates and concurrency limit; a pause stays (`outbox limit rm`)."""
    async with _pool(request).acquire() as conn:
        if not await policies.remove_limits(conn, scope or None):
            raise HTTPException(404, f"{policies.scope_name(scope or None)} has no limit to remove")
        policy = await policies.get_policy(conn, scope or None)
    log.info("admin.limit_rm", extra={"scope": policies.scope_name(scope or None)})
    return _policy(policy)


@policy_router.post("/policies/{scope}/pause", response_model=Policy)
async def pause(scope: Scope, request: Request) -> Policy:
    """Hold the scope's mail: no dispatcher claims it until resumed (`outbox pause`).
    Pausing a paused scope changes nothing."""
    async with _pool(request).acquire() as conn:
        changed = await policies.pause(conn, scope or None)
        policy = await policies.get_policy(conn, scope or None)
    if changed:
        log.info("admin.pause", extra={"scope": policies.scope_name(scope or None)})
    return _policy(policy)


@policy_router.post("/policies/{scope}/resume", response_model=Policy)
async def resume(scope: Scope, request: Request) -> Policy:
    """Release what a pause held (`outbox resume`). Resuming a scope that is not paused
    changes nothing."""
    async with _pool(request).acquire() as conn:
        changed = await policies.resume(conn, scope or None)
        policy = await policies.get_policy(conn, scope or None)
    if changed:
        log.info("admin.resume", extra={"scope": policies.scope_name(scope or None)})
    return _policy(policy)


@policy_router.get("/suppressions", response_model=SuppressionList)
async def list_suppressions(
    request: Request,
    limit: Annotated[int, Query(ge=1, le=10_000, description="Entries to return.")] = 100,
) -> SuppressionList:
    """The suppression list, newest first (`outbox suppressions`)."""
    async with _pool(request).acquire() as conn:
        page = await policies.list_suppressions(conn, limit=limit)
    return SuppressionList(
        items=[Suppression.model_validate(s) for s in page.items], total=page.total
    )


_NOT_LISTED: dict[int | str, dict[str, object]] = {
    404: {"description": "Not on the list (or the endpoints are disabled)."}
}


@policy_router.get(
    "/suppressions/{address:path}", response_model=Suppression, responses=_NOT_LISTED
)
async def show_suppression(address: AddressPath, request: Request) -> Suppression:
    """The entry of an address (any spelling of it)."""
    async with _pool(request).acquire() as conn:
        entry = await policies.get_suppression(conn, address)
    if entry is None:
        raise HTTPException(404, f"{address} is not on the suppression list")
    return Suppression.model_validate(entry)


@policy_router.put(
    "/suppressions/{address:path}",
    response_model=Suppression,
    responses={
        200: {"description": "Already on the list: its entry, unchanged."},
        201: {"description": "Added.", "model": Suppression},
        **_UNPROCESSABLE,
    },
    openapi_extra=_request_body(SuppressionReason, required=False),
)
async def suppress(address: AddressPath, request: Request) -> Suppression | JSONResponse:
    """Put an address on the suppression list (`outbox suppress`): mail to it ends
    `suppressed` instead of being sent. An address already on it keeps its entry."""
    body = await _body(request, SuppressionReason, required=False)
    reason = body.reason if body is not None else None
    async with _pool(request).acquire() as conn:
        entry, created = await policies.suppress(conn, address, reason)
    out = Suppression.model_validate(entry)
    if not created:
        return out
    log.info("admin.suppress", extra={"address_key": entry.address_key})
    return JSONResponse(out.model_dump(mode="json"), status_code=201)


@policy_router.delete(
    "/suppressions/{address:path}",
    status_code=204,
    response_class=Response,
    responses=_NOT_LISTED,
)
async def unsuppress(address: AddressPath, request: Request) -> Response:
    """Take an address off the suppression list (`outbox unsuppress`). Mail already
    suppressed stays so; `POST /outbox/{id}/retry` sends it."""
    async with _pool(request).acquire() as conn:
        removed = await policies.unsuppress(conn, address)
    if not removed:
        raise HTTPException(404, f"{address} is not on the suppression list")
    log.info("admin.unsuppress", extra={"address_key": policies.address_key(address)})
    return Response(status_code=204)


#: Every admin endpoint, for the application to include.
router = APIRouter()
router.include_router(mail_router)
router.include_router(policy_router)
