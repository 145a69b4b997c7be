"""The operator's web page, ``/admin``: overview (with the sending policy and the
suppression list), mail list, mail detail; retry, cancel, pause and resume.

Served by the API when ``ADMIN_TOKEN`` is set; without it every ``/admin`` path answers
404, exactly like a path that does not exist. Server-rendered HTML (Jinja2, autoescaped),
readable without JavaScript; one CSS file and one small script, both served from this
package, refresh the page in place every few seconds.

Security, in one place:

* sign-in posts the token in a form; it is compared in constant time and never stored:
  the browser gets a signed session cookie (:mod:`.session` says why signed and what
  that means), ``HttpOnly``, ``SameSite=Strict``, ``Path=/admin``, ``Secure`` over https;
* every state change is a POST carrying the session's CSRF token, and is refused when
  the request's ``Origin`` (or, without one, its ``Referer``) names another host;
* every response has a strict Content-Security-Policy (``default-src 'self'``, no inline
  script or style), ``frame-ancestors 'none'`` and ``X-Frame-Options: DENY``,
  ``Referrer-Policy: same-origin`` and, for pages, ``Cache-Control: no-store``.

The work is done by :mod:`dispatcher.operations` and :mod:`dispatcher.policies`, the same
code as ``outbox`` and the JSON admin endpoints.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib.resources import files
from typing import Any, Final
from urllib.parse import parse_qs, urlencode, urlsplit

import asyncpg
import jinja2
from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from markupsafe import Markup, escape

from outbox.api.admin_site.chart import layout
from outbox.api.admin_site.session import FLASH_SECONDS, SESSION_SECONDS, Flash, Session, Signer
from outbox.dispatcher import operations as ops
from outbox.dispatcher import policies, times
from outbox.dispatcher.outbox import MAX_KEY_LENGTH
from outbox.dispatcher.settings import Settings

__all__ = ["PREFIX", "REFRESH_SECONDS", "router"]

log = logging.getLogger("api.admin_site")

PREFIX: Final = "/admin"
#: The open page reloads its data this often (seconds).
REFRESH_SECONDS: Final = 10
SESSION_COOKIE: Final = "outbox_admin"
FLASH_COOKIE: Final = "outbox_admin_flash"
#: Rows per page of the mail list unless ``limit`` says otherwise.
PAGE_SIZE: Final = 50
#: Entries of the suppression list the overview shows (the newest).
SUPPRESSIONS_SHOWN: Final = 10
#: The path segment that names the scope of all mail (as in the JSON endpoints).
ALL_MAIL_SEGMENT: Final = "*"

_PACKAGE = __name__.rpartition(".")[0]

_CSP = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
        "object-src 'none'",
    ]
)
_SECURITY_HEADERS: Final = {
    "Content-Security-Policy": _CSP,
    "X-Frame-Options": "DENY",
    # same-origin, not no-referrer: under no-referrer a browser sends "Origin: null" with
    # a form's POST, and the origin check below could no longer recognise our own pages.
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}


# --- Assets and templates -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Asset:
    body: bytes
    media_type: str
    #: A digest of the content: part of the URL, so a changed file is fetched again.
    version: str


def _load_assets() -> dict[str, _Asset]:
    types = {
        "admin.css": "text/css; charset=utf-8",
        "admin.js": "text/javascript; charset=utf-8",
        "favicon.svg": "image/svg+xml",
    }
    assets = {}
    for name, media_type in types.items():
        body = files(_PACKAGE).joinpath("static", name).read_bytes()
        assets[name] = _Asset(body, media_type, hashlib.sha256(body).hexdigest()[:12])
    return assets


_ASSETS: Final = _load_assets()

#: Characters that are invisible or reorder what follows them (C0 and C1 controls other
#: than tab and line breaks, bidirectional marks, embeddings, overrides and isolates, line
#: and paragraph separators, BOM): shown as a visible ``U+XXXX`` instead.
_INVISIBLE = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e"
    "\u2028\u2029\u2066-\u2069\ufeff]"
)


#: What the page shows for a time that is not set (an en dash).
_NONE = "\u2013"


def _text(value: object) -> Markup:
    """User-controlled text for the page: escaped, every invisible or reordering character
    shown as its code point, and isolated (``<bdi>``) so right-to-left text inside it
    cannot reorder the page around it."""
    text = str(value)
    parts: list[Markup] = []
    position = 0
    for match in _INVISIBLE.finditer(text):
        parts.append(escape(text[position : match.start()]))
        parts.append(
            Markup('<span class="cc" title="invisible character">U+{:04X}</span>').format(
                ord(match.group())
            )
        )
        position = match.end()
    parts.append(escape(text[position:]))
    return Markup("<bdi>") + Markup("").join(parts) + Markup("</bdi>")


def _plain(value: object) -> str:
    """User-controlled text for an attribute (a tooltip): every invisible or reordering
    character written as its code point. (Escaped by the template, like all text.)"""
    return _INVISIBLE.sub(lambda m: f"U+{ord(m.group()):04X}", str(value))


def _when(value: datetime | None) -> str:
    """A time in UTC, to the second."""
    return _NONE if value is None else f"{value.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"


def _span(seconds: float) -> str:
    """A duration in words an operator reads at a glance: 45 s, 3 min, 2 h 5 min, 3 d 4 h."""
    seconds = abs(seconds)
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def _relative(value: datetime | None, now: datetime) -> str:
    """``3 min ago`` or ``in 5 min``."""
    if value is None:
        return _NONE
    delta = (value - now).total_seconds()
    if abs(delta) < 1:
        return "now"
    return f"in {_span(delta)}" if delta > 0 else f"{_span(delta)} ago"


def _asset_url(name: str) -> str:
    return f"{PREFIX}/static/{name}?v={_ASSETS[name].version}"


_templates = jinja2.Environment(
    loader=jinja2.PackageLoader(_PACKAGE, "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_templates.filters.update(
    text=_text, plain=_plain, when=_when, span=_span, rate=policies.rate_words
)
_templates.globals.update(
    asset=_asset_url,
    relative=_relative,
    prefix=PREFIX,
    refresh_seconds=REFRESH_SECONDS,
    statuses=ops.STATUSES,
)


# --- Routing: every response gets the security headers --------------------------------------


class _PageRoute(APIRoute):
    """A route whose every response carries the security headers, and whose failures
    (the database down: 503) are pages too, with the status and headers the app's
    exception handlers chose."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                response = await handler(request)
            except HTTPException:
                raise  # 404 while disabled: the same answer as a path that does not exist
            except Exception as exc:
                response = await _failure_page(request, exc)
            for name, value in _SECURITY_HEADERS.items():
                response.headers.setdefault(name, value)
            response.headers.setdefault("Cache-Control", "no-store")
            return response

        return route


async def _failure_page(request: Request, exc: Exception) -> Response:
    handlers: Mapping[Any, Callable[[Request, Exception], Awaitable[Response]]]
    handlers = request.app.exception_handlers
    handler = next((handlers[c] for c in type(exc).__mro__ if c in handlers), None)
    if handler is None:
        raise exc
    answer = await handler(request, exc)  # logs, and reports to the database watch
    unavailable = answer.status_code == 503
    page = _render(
        "error.html",
        request,
        status=answer.status_code,
        title="Database unavailable" if unavailable else "Something went wrong",
        message="The database cannot be reached right now. This page tries again by itself."
        if unavailable
        else "The request failed; nothing was changed. The API's log has the details.",
        refresh=unavailable,
    )
    if "retry-after" in answer.headers:
        page.headers["Retry-After"] = answer.headers["retry-after"]
    return page


router = APIRouter(prefix=PREFIX, include_in_schema=False, route_class=_PageRoute)


# --- Sessions, CSRF, flashes ----------------------------------------------------------------


def _signer(request: Request) -> Signer:
    """The signer for the configured token; 404 (not found) when there is none."""
    settings: Settings = request.app.state.settings
    if settings.admin_token is None:
        raise HTTPException(404, "Not Found")
    token = settings.admin_token.get_secret_value()
    cached: tuple[str, Signer] | None = getattr(request.app.state, "admin_signer", None)
    if cached is None or cached[0] != token:
        cached = (token, Signer(token))
        request.app.state.admin_signer = cached
    return cached[1]


def _secure(request: Request) -> bool:
    # https directly, or behind a proxy that says so (uvicorn's proxy headers).
    return request.url.scheme == "https"


def _set_cookie(response: Response, request: Request, name: str, value: str, age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=age,
        path=PREFIX,
        secure=_secure(request),
        httponly=True,
        samesite="strict",
    )


def _forget_cookie(response: Response, request: Request, name: str) -> None:
    response.delete_cookie(
        name, path=PREFIX, secure=_secure(request), httponly=True, samesite="strict"
    )


def _redirect(
    request: Request, path: str, flash: Flash | None = None, signer: Signer | None = None
) -> Response:
    # 303: the browser follows with a GET, so reloading the result never repeats a POST.
    response = RedirectResponse(path, status_code=303)
    if flash is not None and signer is not None:
        _set_cookie(response, request, FLASH_COOKIE, signer.seal_flash(flash), FLASH_SECONDS)
    return response


def _host(netloc: str, scheme: str) -> str:
    """``host[:port]`` in lower case, without the scheme's default port."""
    netloc = netloc.lower()
    default = {"http": ":80", "https": ":443"}.get(scheme)
    return netloc[: -len(default)] if default and netloc.endswith(default) else netloc


def _same_origin(request: Request) -> bool:
    """Whether a POST comes from a page of this host, as far as the browser says.

    ``Origin`` when sent (browsers send it with every POST), else ``Referer``; neither
    (some privacy tools strip both) leaves the decision to the CSRF token. Hosts are
    compared, not schemes: behind a TLS proxy that does not say so the server sees http
    while the browser's origin is https.
    """
    host = _host(request.headers.get("host") or request.url.netloc, request.url.scheme)
    for header in ("origin", "referer"):
        value = request.headers.get(header)
        if value is None:
            continue
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https"):  # "null" (sandboxed, privacy), others
            return False
        return _host(parts.netloc, parts.scheme) == host
    return True


async def _form(request: Request) -> dict[str, str]:
    """A url-encoded form's fields (the first value of each); {} for anything else."""
    content_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        return {}
    body = (await request.body()).decode("utf-8", "replace")
    try:
        fields = parse_qs(body, keep_blank_values=True, max_num_fields=20)
    except ValueError:
        return {}
    return {name: values[0] for name, values in fields.items()}


@dataclass(frozen=True, slots=True)
class _Visitor:
    """A signed-in browser's request."""

    signer: Signer
    session: Session


def _visitor(request: Request) -> _Visitor | None:
    signer = _signer(request)
    session = signer.session(request.cookies.get(SESSION_COOKIE))
    return None if session is None else _Visitor(signer, session)


def _sign_in_first(request: Request) -> Response:
    response = _redirect(request, f"{PREFIX}/sign-in")
    if SESSION_COOKIE in request.cookies:  # expired or forged: drop it
        _forget_cookie(response, request, SESSION_COOKIE)
    return response


async def _checked_post(request: Request) -> tuple[_Visitor, dict[str, str]] | Response:
    """The visitor and form of a state-changing POST, or the response refusing it."""
    visitor = _visitor(request)
    if visitor is None:
        return _sign_in_first(request)
    form = await _form(request)
    if not _same_origin(request) or not visitor.signer.csrf_matches(
        visitor.session, form.get("csrf")
    ):
        log.warning("admin.csrf_refused", extra={"path": request.url.path})
        return _render(
            "error.html",
            request,
            visitor,
            status=403,
            title="Request refused",
            message="This request did not come from this page (another site, or a page "
            "open since before the last sign-in). Nothing was changed. Go back, reload "
            "the page and try again.",
        )
    return visitor, form


def _render(
    template: str,
    request: Request,
    visitor: _Visitor | None = None,
    *,
    status: int = 200,
    signer: Signer | None = None,
    **values: object,
) -> HTMLResponse:
    """The page, with the flash message left for it (shown once), if any."""
    signer = visitor.signer if visitor is not None else signer
    flash = None
    if signer is not None:
        flash = signer.open_flash(request.cookies.get(FLASH_COOKIE))
    html = _templates.get_template(template).render(
        csrf=visitor.signer.csrf_token(visitor.session) if visitor else None,
        signed_in=visitor is not None,
        flash=flash,
        **values,
    )
    response = HTMLResponse(html, status_code=status)
    if FLASH_COOKIE in request.cookies:  # shown once
        _forget_cookie(response, request, FLASH_COOKIE)
    return response


# --- Sign-in and sign-out -------------------------------------------------------------------


@router.get("/sign-in")
async def sign_in_form(request: Request) -> Response:
    if _visitor(request) is not None:
        return _redirect(request, PREFIX)
    return _render("sign_in.html", request, signer=_signer(request), error=None)


@router.post("/sign-in")
async def sign_in(request: Request) -> Response:
    signer = _signer(request)
    form = await _form(request)
    if not _same_origin(request):
        return _render(
            "sign_in.html",
            request,
            status=403,
            error="This sign-in did not come from this page. Open the page and sign in here.",
        )
    if not signer.token_matches(form.get("token", "")):
        log.warning("admin.sign_in_refused")
        return _render("sign_in.html", request, status=401, error="That is not the admin token.")
    _, cookie = signer.new_session()
    response = _redirect(request, PREFIX)
    _set_cookie(response, request, SESSION_COOKIE, cookie, SESSION_SECONDS)
    log.info("admin.signed_in")
    return response


@router.post("/sign-out")
async def sign_out(request: Request) -> Response:
    checked = await _checked_post(request)
    if isinstance(checked, Response):
        return checked
    visitor, _ = checked
    response = _redirect(request, f"{PREFIX}/sign-in", Flash("ok", "Signed out."), visitor.signer)
    _forget_cookie(response, request, SESSION_COOKIE)
    return response


# --- Static files ---------------------------------------------------------------------------


@router.get("/static/{name}")
async def static(name: str, request: Request) -> Response:
    _signer(request)  # 404 while the page is disabled, like everything under /admin
    asset = _ASSETS.get(name)
    if asset is None:
        raise HTTPException(404, "Not Found")
    return Response(
        asset.body,
        media_type=asset.media_type,
        # Versioned URLs (?v=digest): a cached copy is never stale.
        headers={"Cache-Control": "private, max-age=86400"},
    )


# --- Overview -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _DispatcherView:
    name: str
    hostname: str
    pid: int
    live: bool
    beat_age: float
    running_for: float
    held: int
    smtp_error: str | None
    smtp_paused_for: float | None


@router.get("")
async def overview(request: Request) -> Response:
    visitor = _visitor(request)
    if visitor is None:
        return _sign_in_first(request)
    pool: asyncpg.Pool = request.app.state.pool
    async with pool.acquire() as conn:
        summary = await ops.status_summary(conn)
        points = await ops.sent_per_minute(conn, minutes=60)
        held = await ops.rows_held(conn)
        suppressions = await policies.list_suppressions(conn, limit=SUPPRESSIONS_SHOWN)
        # All mail is always listed (so that it can be paused), with a policy or not.
        scopes = list(summary.policies)
        if not scopes or scopes[0].domain is not None:
            scopes.insert(0, await policies.get_policy(conn, None))
    now = summary.checked_at
    dispatchers = [
        _DispatcherView(
            name=d.name,
            hostname=d.hostname,
            pid=d.pid,
            live=d.live,
            beat_age=(now - d.last_beat_at).total_seconds(),
            running_for=(now - d.started_at).total_seconds(),
            held=held.get(d.name, 0),
            smtp_error=d.smtp_error,
            smtp_paused_for=(now - d.smtp_unreachable_since).total_seconds()
            if d.smtp_unreachable_since is not None
            else None,
        )
        for d in summary.dispatchers
    ]
    # Live ones, and silent ones that still hold rows (those wait for their lease to end).
    shown = [d for d in dispatchers if d.live or d.held]
    return _render(
        "overview.html",
        request,
        visitor,
        title="Overview",
        page="overview",
        summary=summary,
        now=now,
        chart=layout(points),
        dispatchers=shown,
        silent=len(dispatchers) - len(shown),
        paused=[d for d in dispatchers if d.live and d.smtp_error],
        policies=scopes,
        suppressions=suppressions,
    )


# --- Mail list ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Filters:
    """The list's query as typed (for the form and the links) and as understood."""

    typed: dict[str, str]
    errors: tuple[str, ...]
    status: ops.Status | None = None
    recipient: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    key: str | None = None
    cursor: int | None = None
    limit: int = PAGE_SIZE

    def link(self, **changes: object) -> str:
        query = {k: v for k, v in self.typed.items() if v and k not in ("cursor", "limit")}
        if self.limit != PAGE_SIZE:
            query["limit"] = str(self.limit)
        query.update({k: str(v) for k, v in changes.items() if v is not None})
        return f"{PREFIX}/mail" + (f"?{urlencode(query)}" if query else "")


def _integer(text: str, name: str, low: int, high: int, errors: list[str]) -> int | None:
    if not text:
        return None
    if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
        errors.append(f"{name} must be a whole number from {low} to {high}.")
        return None
    return int(text)


def _filters(query: Mapping[str, str]) -> _Filters:
    typed = {
        name: query.get(name, "").strip()
        for name in ("status", "recipient", "since", "until", "key", "cursor", "limit")
    }
    errors: list[str] = []
    status = typed["status"] or None
    if status is not None and status not in ops.STATUSES:
        errors.append(f"Status must be one of {', '.join(ops.STATUSES)}.")
        status = None
    if len(typed["recipient"]) > 320:
        errors.append("Recipient must be at most 320 characters.")
    if len(typed["key"]) > MAX_KEY_LENGTH:
        errors.append(f"Key must be at most {MAX_KEY_LENGTH} characters.")
    moments: dict[str, datetime | None] = {}
    for name in ("since", "until"):
        moments[name] = None
        if typed[name]:
            try:
                moments[name] = times.parse_time(typed[name])
            except ValueError:
                errors.append(
                    f"{name.capitalize()}: expected a time like {times.TIME_EXAMPLES}, "
                    f"not “{typed[name]}”."
                )
    cursor = _integer(typed["cursor"], "The page cursor", 1, ops.MAX_ID, errors)
    limit = _integer(typed["limit"], "Rows per page", 1, 500, errors)
    return _Filters(
        typed=typed,
        errors=tuple(errors),
        status=status,
        recipient=typed["recipient"] or None,
        since=moments["since"],
        until=moments["until"],
        key=typed["key"] or None,
        cursor=cursor,
        limit=limit or PAGE_SIZE,
    )


@router.get("/mail")
async def mail_list(request: Request) -> Response:
    visitor = _visitor(request)
    if visitor is None:
        return _sign_in_first(request)
    filters = _filters(request.query_params)
    page = None
    pool: asyncpg.Pool = request.app.state.pool
    async with pool.acquire() as conn:
        now: datetime = await conn.fetchval("SELECT now()")
        if not filters.errors:
            page = await ops.list_mail(
                conn,
                status=filters.status,
                recipient=filters.recipient,
                since=filters.since,
                until=filters.until,
                key=filters.key,
                before=filters.cursor,
                limit=filters.limit,
            )
    return _render(
        "mail_list.html",
        request,
        visitor,
        status=400 if filters.errors else 200,
        title="Mail",
        page="mail",
        filters=filters,
        mail=page.items if page else (),
        older=filters.link(cursor=page.next_cursor) if page and page.next_cursor else None,
        newest=filters.link() if filters.cursor else None,
        now=now,
    )


# --- Mail detail and actions ----------------------------------------------------------------


def _outbox_id(text: str) -> int | None:
    if text.isascii() and text.isdigit() and 1 <= int(text) <= ops.MAX_ID:
        return int(text)
    return None


@router.get("/mail/{outbox_id}")
async def mail_detail(outbox_id: str, request: Request) -> Response:
    visitor = _visitor(request)
    if visitor is None:
        return _sign_in_first(request)
    number = _outbox_id(outbox_id)
    detail = explanation = None
    pool: asyncpg.Pool = request.app.state.pool
    async with pool.acquire() as conn:
        now: datetime = await conn.fetchval("SELECT now()")
        if number is not None:
            detail = await ops.show(conn, number)
            explanation = await ops.explain(conn, number)
    if detail is None:
        return _render(
            "error.html",
            request,
            visitor,
            status=404,
            title="No such mail",
            message=f"There is no mail with id {outbox_id}. It may have been pruned.",
        )
    row = detail.row
    return _render(
        "mail_detail.html",
        request,
        visitor,
        title=f"Mail {row.id}",
        page="mail",
        detail=detail,
        mail=row,
        explanation=explanation,
        now=now,
        can_retry=row.status in ops.RETRYABLE,
        can_retry_now=row.status == "pending" and row.next_attempt_at > now,
        can_cancel=row.status in ops.CANCELLABLE
        or (row.status == "sending" and explanation is not None and not explanation.owner_alive),
        durations=[(a.finished_at - a.started_at) / timedelta(seconds=1) for a in detail.history],
    )


@router.post("/mail/{outbox_id}/retry")
async def retry(outbox_id: str, request: Request) -> Response:
    checked = await _checked_post(request)
    if isinstance(checked, Response):
        return checked
    visitor, form = checked
    return await _change(request, visitor, outbox_id, "retry", now=form.get("now") == "1")


@router.post("/mail/{outbox_id}/cancel")
async def cancel(outbox_id: str, request: Request) -> Response:
    checked = await _checked_post(request)
    if isinstance(checked, Response):
        return checked
    visitor, _ = checked
    return await _change(request, visitor, outbox_id, "cancel")


_DONE = {
    ("retry", False): "Mail {id} is queued again and due now.",
    ("retry", True): "Mail {id} is due now: the next free dispatcher sends it.",
    ("cancel", False): "Mail {id} is cancelled: it will not be sent (Retry undoes this).",
}
_NOT_DONE = {"retry": "was not retried", "cancel": "was not cancelled"}


async def _change(
    request: Request, visitor: _Visitor, outbox_id: str, action: str, *, now: bool = False
) -> Response:
    number = _outbox_id(outbox_id)
    if number is None:
        flash = Flash("refused", f"There is no mail with id {outbox_id}.")
        return _redirect(request, f"{PREFIX}/mail", flash, visitor.signer)
    pool: asyncpg.Pool = request.app.state.pool
    async with pool.acquire() as conn:
        if action == "retry":
            result = await ops.retry(conn, [number], now=now)
        else:
            result = await ops.cancel(conn, [number])
    target = f"{PREFIX}/mail/{number}"
    if result.refused:
        refused = result.refused[0]
        if refused.status is None:
            flash = Flash("refused", f"There is no mail with id {number}.")
            return _redirect(request, f"{PREFIX}/mail", flash, visitor.signer)
        reason = refused.reason
        if action == "retry" and refused.status == "pending" and not now:
            reason += " (Retry now makes it due at once)"
        flash = Flash("refused", f"Mail {number} {_NOT_DONE[action]}: {reason}.")
        return _redirect(request, target, flash, visitor.signer)
    log.info(f"admin.{action}", extra={"outbox_id": number, "via": "page", "now": now})
    flash = Flash("ok", _DONE[(action, now and action == "retry")].format(id=number))
    return _redirect(request, target, flash, visitor.signer)


# --- Sending policy: pause and resume -----------------------------------------------------------


@router.post("/policies/{scope}/pause")
async def pause(scope: str, request: Request) -> Response:
    checked = await _checked_post(request)
    if isinstance(checked, Response):
        return checked
    visitor, _ = checked
    return await _pause_or_resume(request, visitor, scope, "pause")


@router.post("/policies/{scope}/resume")
async def resume(scope: str, request: Request) -> Response:
    checked = await _checked_post(request)
    if isinstance(checked, Response):
        return checked
    visitor, _ = checked
    return await _pause_or_resume(request, visitor, scope, "resume")


async def _pause_or_resume(
    request: Request, visitor: _Visitor, scope: str, action: str
) -> Response:
    target = f"{PREFIX}#limits"
    domain: str | None = None
    if scope != ALL_MAIL_SEGMENT:
        try:
            domain = policies.domain_name(scope)
        except ValueError:
            flash = Flash("refused", f"{scope} is not a domain: nothing was changed.")
            return _redirect(request, target, flash, visitor.signer)
    name = policies.scope_name(domain)
    pool: asyncpg.Pool = request.app.state.pool
    async with pool.acquire() as conn:
        if action == "pause":
            changed = await policies.pause(conn, domain)
        else:
            changed = await policies.resume(conn, domain)
    if not changed:
        state = "paused already" if action == "pause" else "not paused"
        return _redirect(request, target, Flash("ok", f"{name} was {state}."), visitor.signer)
    log.info(f"admin.{action}", extra={"scope": name, "via": "page"})
    text = (
        f"Paused {name}: no dispatcher sends it until it is resumed."
        if action == "pause"
        else f"Resumed {name}: its mail goes out again."
    )
    return _redirect(request, target, Flash("ok", text), visitor.signer)
