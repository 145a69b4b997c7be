"""The operator's web page over HTTP, against a real database: sign-in, cookies, CSRF,
security headers, escaping of hostile text, the actions, filters and paging.

The same pages in a real browser: tests/test_admin_browser.py.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import timedelta
from html import unescape

import asyncpg
import httpx
import pytest

from outbox.api.admin_site import pages
from outbox.api.admin_site.chart import layout, nice_ceiling
from outbox.api.admin_site.session import FLASH_SECONDS, SESSION_SECONDS, Flash, Signer
from outbox.api.app import create_app
from outbox.dispatcher import policies
from outbox.dispatcher.db import create_pool
from outbox.dispatcher.policy import Rate
from outbox.dispatcher.settings import Settings
from tests.asgi import app_client
from tests.audit_seed import add_attempt, add_mail, live_dispatcher, statuses

TOKEN = "s3cret-admin-token-0123456789"
HOST = "admin.test"
ORIGIN = f"http://{HOST}"


async def _client(
    database_url: str, token: str | None, base_url: str = ORIGIN
) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(database_url=database_url, admin_token=token)  # type: ignore[arg-type]
    app = create_app(settings)
    async with app_client(app, base_url=base_url) as http:
        yield http


@pytest.fixture
async def web(database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """A browser-like client of an app with ADMIN_TOKEN set, not signed in."""
    async for client in _client(database_url, TOKEN):
        yield client


@pytest.fixture
async def signed_in(web: httpx.AsyncClient) -> httpx.AsyncClient:
    """The same client, signed in."""
    await _sign_in(web)
    return web


async def _sign_in(client: httpx.AsyncClient, token: str = TOKEN) -> httpx.Response:
    return await client.post(
        "/admin/sign-in", data={"token": token}, headers={"Origin": _origin(client)}
    )


def _origin(client: httpx.AsyncClient) -> str:
    return f"{client.base_url.scheme}://{client.base_url.netloc.decode()}"


def _csrf(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, html
    return match[1]


async def _post(
    client: httpx.AsyncClient,
    path: str,
    *,
    csrf: str | None = None,
    origin: str | None = ORIGIN,
    **fields: str,
) -> httpx.Response:
    """A POST the way the page's own forms send it (csrf taken from the overview)."""
    if csrf is None:
        csrf = _csrf((await client.get("/admin")).text)
    headers = {"Origin": origin} if origin is not None else {}
    return await client.post(path, data={"csrf": csrf, **fields}, headers=headers)


async def _follow(client: httpx.AsyncClient, response: httpx.Response) -> httpx.Response:
    assert response.status_code == 303, response.text
    return await client.get(response.headers["location"])


def _flash(html: str) -> tuple[str, str]:
    match = re.search(r'<p class="flash (\w+)" role="status">(.*?)</p>', html, re.S)
    assert match, html
    return match[1], unescape(re.sub(r"<[^>]+>", "", match[2]))


# --- disabled without ADMIN_TOKEN -----------------------------------------------------------

PATHS = [
    ("GET", "/admin"),
    ("GET", "/admin/sign-in"),
    ("POST", "/admin/sign-in"),
    ("POST", "/admin/sign-out"),
    ("GET", "/admin/mail"),
    ("GET", "/admin/mail/1"),
    ("POST", "/admin/mail/1/retry"),
    ("POST", "/admin/mail/1/cancel"),
    ("POST", "/admin/policies/*/pause"),
    ("POST", "/admin/policies/example.com/resume"),
    ("GET", "/admin/static/admin.css"),
    ("GET", "/admin/static/admin.js"),
]


@pytest.mark.parametrize(("method", "path"), PATHS)
async def test_without_admin_token_every_admin_path_is_404(
    database_url: str, db: asyncpg.Pool, method: str, path: str
) -> None:
    await add_mail(db, status="failed")
    async for client in _client(database_url, None):
        response = await client.request(method, path, data={"token": TOKEN})
        assert response.status_code == 404, response.text
        # The same answer as a path that does not exist at all.
        assert response.json() == (await client.get("/no-such-path")).json()
        assert "set-cookie" not in response.headers
    assert await statuses(db) == {1: "failed"}


# --- sign-in, the session cookie, sign-out --------------------------------------------------


async def test_pages_need_a_session(web: httpx.AsyncClient) -> None:
    for path in ("/admin", "/admin/mail", "/admin/mail/1"):
        response = await web.get(path)
        assert response.status_code == 303
        assert response.headers["location"] == "/admin/sign-in"
    form = await web.get("/admin/sign-in")
    assert form.status_code == 200
    assert '<input id="token" name="token" type="password"' in form.text
    assert 'action="/admin/sign-in"' in form.text


@pytest.mark.parametrize(
    "token",
    ["", "wrong-token-0123456789", TOKEN + "x", TOKEN[:-1], TOKEN.upper(), f" {TOKEN}", "t\u00f6k"],
)
async def test_sign_in_with_a_wrong_token_is_refused(web: httpx.AsyncClient, token: str) -> None:
    response = await _sign_in(web, token)
    assert response.status_code == 401
    assert "That is not the admin token." in response.text
    assert "set-cookie" not in response.headers
    assert (await web.get("/admin")).status_code == 303


async def test_sign_in_sets_a_strict_httponly_cookie_without_the_token(
    web: httpx.AsyncClient,
) -> None:
    response = await _sign_in(web)
    assert response.status_code == 303 and response.headers["location"] == "/admin"
    cookie = response.headers["set-cookie"]
    name, _, value = cookie.partition(";")[0].partition("=")
    assert name == "outbox_admin"
    attributes = {a.strip().lower() for a in cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/admin"} <= attributes
    assert f"max-age={SESSION_SECONDS}" in attributes
    assert "secure" not in attributes  # plain http: a Secure cookie would never come back
    assert TOKEN not in value and TOKEN not in cookie
    overview = await web.get("/admin")
    assert overview.status_code == 200
    assert "<h1>Overview</h1>" in overview.text


async def test_over_https_the_cookies_are_secure(database_url: str) -> None:
    async for client in _client(database_url, TOKEN, base_url="https://admin.test"):
        response = await _sign_in(client)
        assert response.status_code == 303
        assert "secure" in response.headers["set-cookie"].lower()
        signed_out = await _post(client, "/admin/sign-out", origin="https://admin.test")
        assert signed_out.status_code == 303
        for cookie in signed_out.headers.get_list("set-cookie"):
            assert "secure" in cookie.lower(), cookie


async def test_a_forged_or_expired_cookie_is_no_session(web: httpx.AsyncClient) -> None:
    signer = Signer(TOKEN)
    _, good = signer.new_session()
    expired = Signer(TOKEN).new_session(now=0)[1]
    other_token = Signer(TOKEN + "-old").new_session()[1]
    expires, nonce, mac = good.split(".")
    forged = [
        expired,
        other_token,  # made with another ADMIN_TOKEN: rotating the token signs everyone out
        f"{int(expires) + 3600}.{nonce}.{mac}",  # extended by hand
        f"{expires}.{nonce}x.{mac}",
        f"{expires}.{nonce}.",
        "garbage",
        "",
    ]
    for value in forged:
        web.cookies.set("outbox_admin", value, domain=HOST, path="/admin")
        response = await web.get("/admin")
        assert response.status_code == 303, value
        web.cookies.clear()
    web.cookies.set("outbox_admin", good, domain=HOST, path="/admin")
    assert (await web.get("/admin")).status_code == 200


def test_sessions_and_flashes_expire() -> None:
    signer = Signer(TOKEN)
    session, cookie = signer.new_session(now=1000)
    assert signer.session(cookie, now=1000 + SESSION_SECONDS - 1) == session
    assert signer.session(cookie, now=1000 + SESSION_SECONDS) is None
    sealed = signer.seal_flash(Flash("ok", "done"), now=1000)
    assert signer.open_flash(sealed, now=1000 + FLASH_SECONDS - 1) == Flash("ok", "done")
    assert signer.open_flash(sealed, now=1000 + FLASH_SECONDS) is None
    assert Signer(TOKEN + "x").open_flash(sealed, now=1000) is None
    # The CSRF token belongs to one session.
    other, _ = signer.new_session()
    assert signer.csrf_matches(session, signer.csrf_token(session))
    assert not signer.csrf_matches(other, signer.csrf_token(session))
    assert not signer.csrf_matches(session, None)
    assert not signer.csrf_matches(session, "\u00e9")


async def test_sign_out(signed_in: httpx.AsyncClient) -> None:
    response = await _post(signed_in, "/admin/sign-out")
    assert response.status_code == 303 and response.headers["location"] == "/admin/sign-in"
    cleared = [c for c in response.headers.get_list("set-cookie") if c.startswith("outbox_admin=")]
    assert cleared and "max-age=0" in cleared[0].lower()
    page = await signed_in.get("/admin/sign-in")
    assert _flash(page.text) == ("ok", "Signed out.")
    assert (await signed_in.get("/admin")).status_code == 303


# --- headers and assets ---------------------------------------------------------------------


async def test_every_page_has_the_security_headers(
    signed_in: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    mail = await add_mail(db)
    for path in (
        "/admin",
        "/admin/mail",
        f"/admin/mail/{mail}",
        "/admin/mail/999",
        "/admin/sign-in",
    ):
        response = await signed_in.get(path)
        assert response.status_code in (200, 303, 404), path
        csp = response.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "'unsafe-inline'" not in csp and "'unsafe-eval'" not in csp
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["referrer-policy"] == "same-origin"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["cache-control"] == "no-store"
    refused = await _post(signed_in, "/admin/sign-out", csrf="nope")
    assert refused.headers["x-frame-options"] == "DENY"


async def test_assets_are_served_locally_and_pages_load_nothing_else(
    signed_in: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    mail = await add_mail(db)
    for path in ("/admin/sign-in", "/admin", "/admin/mail", f"/admin/mail/{mail}"):
        html = (await signed_in.get(path)).text
        # No inline script or style (the CSP forbids them), nothing from elsewhere.
        assert "<style" not in html and " style=" not in html
        assert not re.search(r"<script(?![^>]*\ssrc=)", html), path
        for url in re.findall(r'(?:src|href|action)="([^"]*)"', html):
            assert url.startswith("/admin"), (path, url)
    css = await signed_in.get(re.search(r'href="([^"]+\.css[^"]*)"', html)[1])  # type: ignore[index]
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert "@import" not in css.text and "url(" not in css.text  # no fonts or images fetched
    js = await signed_in.get("/admin/static/admin.js")
    assert js.headers["content-type"].startswith("text/javascript")
    assert (await signed_in.get("/admin/static/favicon.svg")).status_code == 200
    assert (await signed_in.get("/admin/static/../app.py")).status_code == 404
    assert (await signed_in.get("/admin/static/nothing.css")).status_code == 404


# --- cross-site requests --------------------------------------------------------------------


async def test_posts_without_the_session_csrf_token_change_nothing(
    web: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    mail = await add_mail(db, status="failed")
    await _sign_in(web)
    good = _csrf((await web.get("/admin")).text)
    other_session = Signer(TOKEN).csrf_token(Signer(TOKEN).new_session()[0])
    for csrf in ("", "x", good[:-1], other_session):
        response = await _post(web, f"/admin/mail/{mail}/retry", csrf=csrf)
        assert response.status_code == 403, csrf
        assert "Nothing was changed" in response.text
    no_field = await web.post(f"/admin/mail/{mail}/retry", headers={"Origin": ORIGIN})
    assert no_field.status_code == 403
    as_json = await web.post(
        f"/admin/mail/{mail}/retry", json={"csrf": good}, headers={"Origin": ORIGIN}
    )
    assert as_json.status_code == 403
    assert await statuses(db) == {mail: "failed"}


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Origin": f"http://{HOST}.evil.example"},
        {"Origin": "http://evil.example", "Referer": f"{ORIGIN}/admin"},
        {"Referer": "http://evil.example/page"},
        {"Referer": "about:blank"},
    ],
)
async def test_posts_from_another_origin_change_nothing(
    signed_in: httpx.AsyncClient, db: asyncpg.Pool, headers: dict[str, str]
) -> None:
    mail = await add_mail(db, status="failed")
    csrf = _csrf((await signed_in.get("/admin")).text)
    for action in ("retry", "cancel"):
        response = await signed_in.post(
            f"/admin/mail/{mail}/{action}", data={"csrf": csrf}, headers=headers
        )
        assert response.status_code == 403, response.text
    signed_out = await signed_in.post("/admin/sign-out", data={"csrf": csrf}, headers=headers)
    assert signed_out.status_code == 403
    assert await statuses(db) == {mail: "failed"}
    assert (await signed_in.get("/admin")).status_code == 200  # still signed in
    # The same token from this origin (or with a same-origin Referer only) is accepted.
    same = await signed_in.post(
        f"/admin/mail/{mail}/cancel", data={"csrf": csrf}, headers={"Referer": f"{ORIGIN}/admin"}
    )
    assert same.status_code == 303
    assert await statuses(db) == {mail: "cancelled"}


async def test_a_post_without_a_session_goes_to_sign_in(
    web: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    mail = await add_mail(db, status="failed")
    response = await _post(web, f"/admin/mail/{mail}/retry", csrf="anything")
    assert response.status_code == 303 and response.headers["location"] == "/admin/sign-in"
    assert await statuses(db) == {mail: "failed"}


async def test_sign_in_from_another_origin_is_refused(web: httpx.AsyncClient) -> None:
    response = await web.post(
        "/admin/sign-in", data={"token": TOKEN}, headers={"Origin": "http://evil.example"}
    )
    assert response.status_code == 403
    assert "set-cookie" not in response.headers


# --- hostile text ---------------------------------------------------------------------------

SCRIPT = "<script>alert(1)</script>"
ATTRIBUTE = "\"'><img src=x onerror=alert(2)>"
RTL = "\u202egnp.exe"  # shows as "exe.png" when the override is honoured


async def test_hostile_text_is_escaped_everywhere(
    signed_in: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    mail = await add_mail(db, "ada@example.com", name="Ada", subject="Welcome", status="failed")
    # Text no API accepts, written by hand (or by an older version): the page must still
    # show it inertly.
    hostile = f"{SCRIPT}{ATTRIBUTE}{RTL}"
    await db.execute(
        """UPDATE outbox SET recipient_name = $2, subject = $2, last_error = $2,
                  body_text = $2, body_html = $2, idempotency_key = NULL WHERE id = $1""",
        mail,
        hostile,
    )
    await add_attempt(db, mail, 1, "failed", smtp_code=550, reply=hostile, error=hostile)
    await db.execute(
        "INSERT INTO dispatchers (name, hostname, pid, smtp_error, smtp_unreachable_since) "
        "VALUES ($1, $1, 1, $1, now())",
        hostile,
    )
    await db.execute(
        "UPDATE outbox SET status = 'sending', lease_owner = $2, lease_token = gen_random_uuid(),"
        " leased_at = now(), lease_expires_at = now() + interval '1 minute' WHERE id = $1",
        await add_mail(db),
        hostile,
    )
    for path in ("/admin", "/admin/mail", f"/admin/mail/{mail}", "/admin/mail?status=sending"):
        html = (await signed_in.get(path)).text
        assert "<script>alert" not in html, path
        assert "<img" not in html, path
        assert "\u202e" not in html, path  # shown as a visible code point instead
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html, path
        assert '<span class="cc" title="invisible character">U+202E</span>' in html, path
        # Only the page's own scripts.
        assert re.findall(r"<script[^>]*>", html) == [
            f'<script src="/admin/static/admin.js?v={pages._ASSETS["admin.js"].version}">'
        ]


async def test_a_hostile_refusal_reason_is_escaped_in_the_flash(
    signed_in: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    mail = await add_mail(db, status="sending")
    owner = f"{SCRIPT}{RTL}"
    await db.execute("UPDATE outbox SET lease_owner = $2 WHERE id = $1", mail, owner)
    await live_dispatcher(db, owner)
    page = await _follow(signed_in, await _post(signed_in, f"/admin/mail/{mail}/cancel"))
    assert "<script>alert" not in page.text and "\u202e" not in page.text
    kind, text = _flash(page.text)
    assert kind == "refused"
    assert f"dispatcher {SCRIPT}U+202Egnp.exe" in text


# --- actions --------------------------------------------------------------------------------


async def test_retry_a_failed_mail(signed_in: httpx.AsyncClient, db: asyncpg.Pool) -> None:
    mail = await add_mail(db, status="failed")
    detail = await signed_in.get(f"/admin/mail/{mail}")
    assert f'action="/admin/mail/{mail}/retry"' in detail.text
    response = await _post(signed_in, f"/admin/mail/{mail}/retry", csrf=_csrf(detail.text))
    assert response.headers["location"] == f"/admin/mail/{mail}"
    assert await statuses(db) == {mail: "pending"}
    row = await db.fetchrow("SELECT next_attempt_at <= now() AS due, attempts FROM outbox")
    assert row is not None and row["due"] and row["attempts"] == 3
    page = await signed_in.get(response.headers["location"])
    assert _flash(page.text) == ("ok", f"Mail {mail} is queued again and due now.")
    # Shown once: the next page has no flash.
    assert 'role="status"' not in (await signed_in.get(f"/admin/mail/{mail}")).text


async def test_retry_now_makes_a_deferred_mail_due(
    signed_in: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    mail = await add_mail(db)
    await db.execute("UPDATE outbox SET next_attempt_at = now() + interval '1 hour'")
    detail = await signed_in.get(f"/admin/mail/{mail}")
    assert 'name="now" value="1"' in detail.text  # the Retry now button
    refused = await _follow(signed_in, await _post(signed_in, f"/admin/mail/{mail}/retry"))
    assert _flash(refused.text) == (
        "refused",
        f"Mail {mail} was not retried: already pending: it is queued and will be sent "
        "(Retry now makes it due at once).",
    )
    assert await db.fetchval("SELECT next_attempt_at > now() FROM outbox")
    done = await _follow(signed_in, await _post(signed_in, f"/admin/mail/{mail}/retry", now="1"))
    assert _flash(done.text)[0] == "ok"
    assert await db.fetchval("SELECT next_attempt_at <= now() FROM outbox")


async def test_cancel_and_undo(signed_in: httpx.AsyncClient, db: asyncpg.Pool) -> None:
    mail = await add_mail(db)
    page = await _follow(signed_in, await _post(signed_in, f"/admin/mail/{mail}/cancel"))
    assert _flash(page.text) == (
        "ok",
        f"Mail {mail} is cancelled: it will not be sent (Retry undoes this).",
    )
    assert await statuses(db) == {mail: "cancelled"}
    again = await _follow(signed_in, await _post(signed_in, f"/admin/mail/{mail}/cancel"))
    assert _flash(again.text) == ("refused", f"Mail {mail} was not cancelled: already cancelled.")
    await _post(signed_in, f"/admin/mail/{mail}/retry")
    assert await statuses(db) == {mail: "pending"}


@pytest.mark.parametrize(
    ("status", "action", "reason"),
    [
        ("sent", "retry", "already sent"),
        ("sent", "cancel", "already sent"),
        ("sending", "retry", "being sent right now; wait for the outcome (dispatcher worker-1)"),
        (
            "sending",
            "cancel",
            "being sent right now and cannot be recalled; wait for the outcome "
            "(dispatcher worker-1)",
        ),
    ],
)
async def test_refusals_are_reported_in_plain_words(
    signed_in: httpx.AsyncClient, db: asyncpg.Pool, status: str, action: str, reason: str
) -> None:
    mail = await add_mail(db, status=status)
    await live_dispatcher(db)
    page = await _follow(signed_in, await _post(signed_in, f"/admin/mail/{mail}/{action}"))
    verb = {"retry": "retried", "cancel": "cancelled"}[action]
    assert _flash(page.text) == ("refused", f"Mail {mail} was not {verb}: {reason}.")
    assert await statuses(db) == {mail: status}


@pytest.mark.parametrize("outbox_id", ["12345", "0", "abc", str(2**63)])
async def test_actions_on_a_missing_mail(signed_in: httpx.AsyncClient, outbox_id: str) -> None:
    response = await _post(signed_in, f"/admin/mail/{outbox_id}/retry")
    assert response.headers["location"] == "/admin/mail"
    page = await signed_in.get("/admin/mail")
    assert _flash(page.text) == ("refused", f"There is no mail with id {outbox_id}.")
    missing = await signed_in.get(f"/admin/mail/{outbox_id}")
    assert missing.status_code == 404 and "No such mail" in missing.text


async def test_the_sending_policy_and_the_suppression_list(
    signed_in: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    await add_mail(db, "ada@example.com")
    async with db.acquire() as conn:
        await policies.set_limits(conn, "Example.com", rates=[Rate(40, 1), Rate(1000, 3600)])
        await policies.set_limits(conn, None, concurrency=8)
        await policies.pause(conn, "bücher.de")
        await policies.suppress(conn, "eve@example.com", "<b>bounced</b>")
    await db.execute(
        "UPDATE outbox_policies SET throttle_rate = 2, throttle_base = 8, "
        "throttled_at = now() WHERE domain = 'example.com'"
    )
    html = (await signed_in.get("/admin")).text
    section = html[html.index('id="limits"') : html.index('id="suppressions"')]
    rows = re.findall(r"<tr>\s*<td.*?</tr>", section, re.S)
    assert len(rows) == 3
    # Each row as the words a reader sees, one space between cells.
    cells = [re.sub(r"<[^>]+>", "", re.sub(r"</td>", " ", row)) for row in rows]
    text = [re.sub(r"\s+", " ", unescape(cell)).strip() for cell in cells]
    n = pages._NONE  # what the page shows for nothing
    assert text[0].startswith(f"All mail {n} 8 {n} 0 1 sending Pause")
    assert text[1].startswith(f"example.com 40/s, 1000/h {n} ")
    assert "throttled" in text[1] and "2/s, halved from 8/s now" in text[1]
    assert text[2].startswith(f"xn--bcher-kva.de {n} {n} {n} 0 0 paused Resume")
    assert 'action="/admin/policies/xn--bcher-kva.de/resume"' in section
    suppressions = html[html.index('id="suppressions"') :]
    assert "eve@example.com" in suppressions and "1 address" in suppressions
    assert "&lt;b&gt;bounced&lt;/b&gt;" in suppressions and "<b>bounced" not in suppressions


async def test_pause_and_resume_from_the_page(
    signed_in: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    paused = await _post(signed_in, "/admin/policies/*/pause")
    assert paused.headers["location"] == "/admin#limits"
    page = await signed_in.get(paused.headers["location"])
    assert _flash(page.text) == (
        "ok",
        "Paused all mail: no dispatcher sends it until it is resumed.",
    )
    assert await db.fetchval("SELECT paused FROM outbox_policies WHERE domain = ''")
    assert 'action="/admin/policies/*/resume"' in page.text
    again = await _follow(signed_in, await _post(signed_in, "/admin/policies/*/pause"))
    assert _flash(again.text) == ("ok", "all mail was paused already.")
    resumed = await _follow(signed_in, await _post(signed_in, "/admin/policies/*/resume"))
    assert _flash(resumed.text) == ("ok", "Resumed all mail: its mail goes out again.")
    assert await db.fetchval("SELECT count(*) FROM outbox_policies") == 0
    domain = await _follow(signed_in, await _post(signed_in, "/admin/policies/BÜCHER.de/pause"))
    assert _flash(domain.text) == (
        "ok",
        "Paused xn--bcher-kva.de: no dispatcher sends it until it is resumed.",
    )
    bad = await _follow(signed_in, await _post(signed_in, "/admin/policies/a..b/pause"))
    assert _flash(bad.text) == ("refused", "a..b is not a domain: nothing was changed.")
    assert await db.fetchval("SELECT array_agg(domain) FROM outbox_policies") == [
        "xn--bcher-kva.de"
    ]


async def test_pause_needs_the_session_and_its_csrf_token(
    web: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    signed_out = await web.post("/admin/policies/*/pause", headers={"Origin": ORIGIN})
    assert signed_out.status_code == 303
    assert signed_out.headers["location"] == "/admin/sign-in"
    await _sign_in(web)
    for csrf in ("", "x"):
        refused = await _post(web, "/admin/policies/*/pause", csrf=csrf)
        assert refused.status_code == 403
    elsewhere = await _post(web, "/admin/policies/*/pause", origin="http://evil.example")
    assert elsewhere.status_code == 403
    assert await db.fetchval("SELECT count(*) FROM outbox_policies") == 0


# --- pages ----------------------------------------------------------------------------------


async def test_overview(signed_in: httpx.AsyncClient, db: asyncpg.Pool) -> None:
    await add_mail(db)
    await add_mail(db, status="failed")
    sent = await add_mail(db, status="sent")
    for ago in (timedelta(minutes=1), timedelta(minutes=1), timedelta(minutes=30)):
        await add_attempt(db, sent, 1, "sent", smtp_code=250, ago=ago)
    await add_attempt(db, sent, 1, "sent", smtp_code=250, ago=timedelta(hours=2))  # too old
    await add_attempt(db, sent, 2, "failed", smtp_code=550)
    sending = await add_mail(db, status="sending")
    await live_dispatcher(db, "worker-1")
    await live_dispatcher(db, "worker-2")
    await db.execute(
        "UPDATE dispatchers SET smtp_error = 'connection refused', "
        "smtp_unreachable_since = now() - interval '5 minutes' WHERE name = 'worker-2'"
    )
    await db.execute(
        "INSERT INTO dispatchers (name, hostname, pid, last_beat_at) "
        "VALUES ('gone-1', 'host', 2, now() - interval '1 hour')"
    )

    html = (await signed_in.get("/admin")).text

    def stat(status: str) -> str:
        match = re.search(
            rf'<a class="stat {status}".*?<span class="value">(.*?)</span>', html, re.S
        )
        assert match, status
        return match[1]

    assert [stat(s) for s in ("pending", "sending", "sent", "failed", "cancelled")] == [
        "1",
        "1",
        "1",
        "1",
        "0",
    ]
    assert 'data-refresh="10"' in html
    assert '<meta http-equiv="refresh" content="10">' in html  # inside <noscript>
    # The chart: 60 bars, 3 mail sent within the hour.
    assert html.count('<rect class="bar"') == 60
    assert "3 mail sent in the last 60 minutes, at most 2 in one minute." in html
    # Dispatchers: the live ones with what they hold; the stopped one counted, not shown.
    assert "worker-1" in html and "worker-2" in html and "gone-1" not in html
    assert "1 stopped, not shown" in html
    row = re.search(r"<tr>\s*<td data-label=\"Name\"><strong><bdi>worker-1.*?</tr>", html, re.S)
    assert row and '<td data-label="Sending now" class="num">1</td>' in row[0]
    assert f"/admin/mail/{sending}" not in html
    # SMTP pause.
    assert "Sending is paused" in html and "connection refused" in html
    assert "for 5 min" in html
    # Failures of the last hour.
    assert re.search(r"<dt>Failed for good</dt><dd class=\"bad\">1</dd>", html)
    # The sending policy: all mail, not paused, with its traffic; no suppressions.
    assert 'id="limits"' in html
    assert 'action="/admin/policies/*/pause"' in html
    assert "No address is suppressed." in html


async def test_mail_detail_shows_the_timeline_and_the_explanation(
    signed_in: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    mail = await add_mail(db, "ada@example.com", name="Ada Lovelace", status="failed")
    await add_attempt(db, mail, 1, "deferred", smtp_code=451, reply="4.7.1 greylisted")
    await db.execute("UPDATE outbox_attempts SET smtp_stage = 'rcpt' WHERE attempt = 1")
    await add_attempt(db, mail, 2, "failed", smtp_code=550, reply="5.1.1 no such user")
    await db.execute("UPDATE outbox_attempts SET smtp_stage = 'rcpt' WHERE attempt = 2")

    html = (await signed_in.get(f"/admin/mail/{mail}")).text

    assert f"Mail {mail}" in html and '<span class="pill failed">failed</span>' in html
    timeline = html[html.index('<ol class="timeline">') :]
    assert timeline.index("Attempt 1") < timeline.index("Attempt 2")
    assert "4.7.1 greylisted" in timeline and "5.1.1 no such user" in timeline
    assert "<dt>SMTP stage reached</dt><dd>rcpt</dd>" in timeline
    assert "<dt>Code</dt><dd>451</dd>" in timeline
    assert "<dt>Dispatcher</dt><dd><bdi>worker-1</bdi></dd>" in timeline
    # The explanation of dispatcher.operations.explain, in its own words.
    async with db.acquire() as conn:
        from outbox.dispatcher import operations as ops

        explanation = await ops.explain(conn, mail)
    assert explanation is not None
    assert f'<p class="summary">{pages._text(explanation.summary)}</p>' in html
    for reason in explanation.reasons:
        assert str(pages._text(reason)) in html
    # Retry and Cancel are offered for a failed mail.
    assert f'action="/admin/mail/{mail}/retry"' in html
    assert f'action="/admin/mail/{mail}/cancel"' in html
    assert "Hello Ada Lovelace" in html  # the text part
    assert "&lt;p&gt;Hello Ada Lovelace&lt;/p&gt;" in html  # the HTML part as source


async def test_list_filters(signed_in: httpx.AsyncClient, db: asyncpg.Pool) -> None:
    ada = await add_mail(db, "Ada@Example.com")
    bob = await add_mail(db, "bob@example.com", status="failed")
    old = await add_mail(db, "ada@example.com", status="sent", age=timedelta(days=3))
    keyed = await add_mail(db, "cy@example.com", key="welcome:7")

    async def ids(**params: str) -> list[int]:
        response = await signed_in.get("/admin/mail", params=params)
        assert response.status_code == 200, response.text
        return [
            int(i)
            for i in re.findall(r'<td data-label="Id" class="num"><a[^>]*>(\d+)<', response.text)
        ]

    assert await ids() == [keyed, old, bob, ada]
    assert await ids(recipient="ADA@EXAMPLE.COM") == [old, ada]
    assert await ids(status="failed") == [bob]
    assert await ids(since="1d") == [keyed, bob, ada]
    assert await ids(until="1d") == [old]
    assert await ids(since="1w", until="2d", recipient="ada@example.com") == [old]
    assert await ids(key="welcome:7") == [keyed]
    assert await ids(status="cancelled") == []
    # The form shows the filters as typed.
    html = (await signed_in.get("/admin/mail", params={"status": "failed", "since": "2h"})).text
    assert '<option value="failed" selected>' in html
    assert 'name="since" type="text"' in html and 'value="2h"' in html


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"status": "lost"}, "Status must be one of"),
        ({"since": "yesterday"}, "Since: expected a time like"),
        ({"until": "1y"}, "Until: expected a time like"),
        ({"since": "0001-01-01T00:00:00+01:00"}, "Since: expected a time like"),
        ({"recipient": "x" * 321}, "Recipient must be at most 320 characters."),
        ({"cursor": "abc"}, "The page cursor must be a whole number"),
        ({"cursor": str(2**63)}, "The page cursor must be a whole number"),
        ({"limit": "0"}, "Rows per page must be a whole number from 1 to 500."),
    ],
)
async def test_bad_filters_are_explained_not_500(
    signed_in: httpx.AsyncClient, params: dict[str, str], message: str
) -> None:
    response = await signed_in.get("/admin/mail", params=params)
    assert response.status_code == 400
    assert message in unescape(response.text)
    assert '<form class="card filters"' in response.text  # the form stays, to fix the value


async def test_list_pages_with_a_keyset_cursor(
    signed_in: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    created = [await add_mail(db, f"user{i}@example.com", status="failed") for i in range(5)]
    await add_mail(db, "other@example.com")  # filtered out
    seen: list[int] = []
    url: str | None = "/admin/mail?status=failed&limit=2"
    pages_seen = 0
    while url is not None:
        html = (await signed_in.get(url)).text
        seen += [
            int(i) for i in re.findall(r'<td data-label="Id" class="num"><a[^>]*>(\d+)<', html)
        ]
        pages_seen += 1
        older = re.search(r'<a class="button quiet" href="([^"]+)" rel="next">', html)
        url = unescape(older[1]) if older else None
        if url is not None:
            assert "status=failed" in url and "limit=2" in url  # filters kept
            assert "cursor=" in url
        if pages_seen > 1:
            assert "← Newest" in html
    assert seen == created[::-1] and pages_seen == 3


def test_chart_layout() -> None:
    from datetime import UTC, datetime

    start = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)
    points = [(start + timedelta(minutes=i), i % 7) for i in range(60)]
    chart = layout(points)
    assert (
        len(chart.bars) == 60 and chart.peak == 6 and chart.total == sum(i % 7 for i in range(60))
    )
    assert chart.y_labels == ("10", "5", "0")
    assert chart.x_labels == ("10:00", "10:14", "10:29", "10:44", "10:59")
    assert chart.bars[0].height == 0 and chart.bars[6].height == 60
    assert chart.bars[6].y + chart.bars[6].height == chart.height
    assert chart.bars[5].label == "10:05 UTC: 5 sent"
    empty = layout([(start, 0)])
    assert empty.summary == "No mail sent in the last 1 minutes." and empty.y_labels[0] == "2"
    assert [nice_ceiling(n) for n in (0, 1, 3, 5, 11, 99, 101, 999)] == [
        2,
        2,
        4,
        10,
        20,
        100,
        200,
        1000,
    ]


async def test_a_database_outage_is_a_page_not_json(database_url: str) -> None:
    settings = Settings(database_url=database_url, admin_token=TOKEN)  # type: ignore[arg-type]
    app = create_app(settings)
    async with app_client(app, base_url=ORIGIN) as web:
        await _sign_in(web)
        # Nothing listens on port 1: every query meets a refused connection.
        await app.state.pool.close()
        app.state.pool = await create_pool(
            "postgresql://nobody@127.0.0.1:1/nothing", min_size=0, max_size=1
        )
        response = await web.get("/admin")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert "Database unavailable" in response.text
    assert response.headers["content-security-policy"] == pages._CSP
    assert response.headers["cache-control"] == "no-store"
