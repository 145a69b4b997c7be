"""The admin endpoints against a real database: auth, filters, pagination, retry, cancel."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest

from outbox.dispatcher import queries
from tests.asgi import ADMIN_TOKEN as TOKEN
from tests.asgi import AUTH
from tests.audit_seed import add_attempt, add_mail, live_dispatcher, statuses

ENDPOINTS = [
    ("GET", "/outbox"),
    ("GET", "/outbox?limit=0&status=bogus"),
    ("GET", "/outbox/1"),
    ("GET", "/outbox/not-a-number"),
    ("POST", "/outbox/1/retry"),
    ("POST", "/outbox/1/cancel"),
]


# --- authentication -------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
async def test_without_a_configured_token_everything_is_404(
    no_token: httpx.AsyncClient, db: asyncpg.Pool, method: str, path: str
) -> None:
    await add_mail(db, status="failed")
    for headers in ({}, AUTH, {"Authorization": "Bearer "}):
        response = await no_token.request(method, path, headers=headers)
        assert response.status_code == 404, response.text
        assert response.json() == {"detail": "Not Found"}
    assert (await statuses(db)) == {1: "failed"}  # nothing happened


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Bearer wrong-token-0123456789",
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN[:-1]}",
        f"Basic {TOKEN}",
        TOKEN,
        "Bearer",
    ],
)
async def test_missing_or_wrong_token_is_401(
    admin: httpx.AsyncClient,
    db: asyncpg.Pool,
    method: str,
    path: str,
    authorization: str | None,
) -> None:
    await add_mail(db, status="failed")
    headers = {"Authorization": authorization} if authorization is not None else {}
    response = await admin.request(method, path, headers=headers)
    assert response.status_code == 401, response.text
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert "items" not in response.text
    assert (await statuses(db)) == {1: "failed"}


async def test_non_ascii_token_is_401_not_500(admin: httpx.AsyncClient) -> None:
    headers = {"Authorization": "Bearer t\u00f6ken-\u00e9\u00e9\u00e9\u00e9".encode("latin-1")}
    response = await admin.get("/outbox", headers=headers)  # type: ignore[arg-type]
    assert response.status_code == 401


async def test_openapi_documents_the_bearer_scheme(admin: httpx.AsyncClient) -> None:
    spec = (await admin.get("/openapi.json")).json()
    assert spec["components"]["securitySchemes"]["AdminToken"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "The ADMIN_TOKEN setting, sent as `Authorization: Bearer <token>`.",
    }
    for path, method in [
        ("/outbox", "get"),
        ("/outbox/{outbox_id}", "get"),
        ("/outbox/{outbox_id}/retry", "post"),
        ("/outbox/{outbox_id}/cancel", "post"),
    ]:
        operation = spec["paths"][path][method]
        assert operation["security"] == [{"AdminToken": []}]
        assert {"401", "404"} <= set(operation["responses"])
    assert "409" in spec["paths"]["/outbox/{outbox_id}/cancel"]["post"]["responses"]
    assert "MailPage" in spec["components"]["schemas"]


# --- listing --------------------------------------------------------------------------------


async def test_list_filters(admin: httpx.AsyncClient, db: asyncpg.Pool) -> None:
    ada = await add_mail(db, "Ada@Example.com")
    bob = await add_mail(db, "bob@example.com", status="failed")
    old = await add_mail(db, "ada@example.com", status="sent", age=timedelta(days=3))

    async def ids(**params: str) -> list[int]:
        response = await admin.get("/outbox", params=params, headers=AUTH)
        assert response.status_code == 200, response.text
        return [item["id"] for item in response.json()["items"]]

    assert await ids() == [old, bob, ada]
    assert await ids(recipient="ADA@EXAMPLE.COM") == [old, ada]
    assert await ids(status="failed") == [bob]
    yesterday = datetime.now(UTC) - timedelta(days=1)
    assert await ids(since=yesterday.isoformat()) == [bob, ada]
    assert await ids(until=yesterday.isoformat()) == [old]
    # No offset means UTC.
    assert await ids(until=yesterday.replace(tzinfo=None).isoformat()) == [old]
    item = (await admin.get("/outbox", params={"status": "failed"}, headers=AUTH)).json()
    assert item["items"][0]["last_smtp_code"] == 550
    assert item["items"][0]["recipient"] == "bob@example.com"
    assert "body_text" not in item["items"][0]


async def test_list_pagination_boundaries(admin: httpx.AsyncClient, db: asyncpg.Pool) -> None:
    created = [await add_mail(db, f"user{i}@example.com") for i in range(5)]
    newest_first = created[::-1]

    async def page(**params: object) -> dict[str, object]:
        response = await admin.get("/outbox", params=params, headers=AUTH)  # type: ignore[arg-type]
        assert response.status_code == 200, response.text
        body: dict[str, object] = response.json()
        return body

    seen: list[int] = []
    cursor = None
    pages = 0
    while True:
        body = await page(limit=2, **({"cursor": cursor} if cursor else {}))
        seen += [item["id"] for item in body["items"]]  # type: ignore[attr-defined]
        pages += 1
        cursor = body["next"]
        if cursor is None:
            break
    assert seen == newest_first and pages == 3

    exact = await page(limit=5)
    assert len(exact["items"]) == 5 and exact["next"] is None  # type: ignore[arg-type]
    empty = await page(cursor=min(created))
    assert empty == {"items": [], "next": None}
    none = await page(status="cancelled")
    assert none == {"items": [], "next": None}


@pytest.mark.parametrize(
    "params",
    [
        {"limit": "0"},
        {"limit": "501"},
        {"limit": "ten"},
        {"status": "lost"},
        {"cursor": "0"},
        {"cursor": "abc"},
        {"cursor": str(2**63)},
        {"since": "yesterday"},
        {"recipient": "x" * 321},
    ],
)
async def test_list_rejects_bad_parameters(
    admin: httpx.AsyncClient, params: dict[str, str]
) -> None:
    response = await admin.get("/outbox", params=params, headers=AUTH)
    assert response.status_code == 422, response.text
    name = next(iter(params))
    assert any(error["loc"][-1] == name for error in response.json()["detail"])


async def test_keys_are_shown_and_filter_the_list(
    admin: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    keyed = await add_mail(db, key="welcome:1")
    plain = await add_mail(db)

    listed = await admin.get("/outbox", params={"key": "welcome:1"}, headers=AUTH)
    assert [item["id"] for item in listed.json()["items"]] == [keyed]
    everything = (await admin.get("/outbox", headers=AUTH)).json()["items"]
    assert [(i["id"], i["idempotency_key"]) for i in everything] == [
        (plain, None),
        (keyed, "welcome:1"),
    ]
    shown = (await admin.get(f"/outbox/{keyed}", headers=AUTH)).json()
    assert shown["idempotency_key"] == "welcome:1"
    for bad in ("", "x" * 201):
        response = await admin.get("/outbox", params={"key": bad}, headers=AUTH)
        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"][-1] == "key"


# --- show -----------------------------------------------------------------------------------


async def test_show_with_attempts_and_headers(admin: httpx.AsyncClient, db: asyncpg.Pool) -> None:
    mail = await add_mail(db, "ada@example.com", name="Ada Lovelace", status="failed")
    await add_attempt(db, mail, 1, "deferred", smtp_code=451, reply="greylisted")
    await add_attempt(db, mail, 2, "failed", smtp_code=550, reply="no such user")

    response = await admin.get(f"/outbox/{mail}", headers=AUTH)

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == mail and body["status"] == "failed"
    assert body["body_text"] == "Hello Ada Lovelace\n"
    assert [(a["attempt"], a["outcome"], a["smtp_code"]) for a in body["history"]] == [
        (1, "deferred", 451),
        (2, "failed", 550),
    ]
    headers = {h["name"]: h["value"] for h in body["headers"]}
    assert headers["To"] == "Ada Lovelace <ada@example.com>"
    assert headers["Message-ID"] == body["message_id"]


@pytest.mark.parametrize(
    ("path", "status"),
    [("/outbox/999", 404), ("/outbox/0", 422), ("/outbox/-1", 422), (f"/outbox/{2**63}", 422)],
)
async def test_show_missing_or_bad_id(admin: httpx.AsyncClient, path: str, status: int) -> None:
    response = await admin.get(path, headers=AUTH)
    assert response.status_code == status, response.text


# --- retry and cancel -----------------------------------------------------------------------


async def test_retry_a_failed_mail_makes_it_claimable(
    admin: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    mail = await add_mail(db, status="failed")

    response = await admin.post(f"/outbox/{mail}/retry", headers=AUTH)

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "pending" and body["attempts"] == 3
    claimed = await db.fetch(queries.CLAIM, 10, "api-test", 60.0, 10.0, 5)
    assert [r["id"] for r in claimed] == [mail]


@pytest.mark.parametrize("status", ["pending", "sending", "sent"])
async def test_retry_refuses_other_statuses_with_409(
    admin: httpx.AsyncClient, db: asyncpg.Pool, status: str
) -> None:
    mail = await add_mail(db, status=status)
    response = await admin.post(f"/outbox/{mail}/retry", headers=AUTH)
    assert response.status_code == 409, response.text
    assert response.json()["status"] == status
    assert response.json()["detail"]
    assert (await statuses(db))[mail] == status


async def test_cancel(admin: httpx.AsyncClient, db: asyncpg.Pool) -> None:
    pending = await add_mail(db)
    failed = await add_mail(db, status="failed")
    for mail in (pending, failed):
        response = await admin.post(f"/outbox/{mail}/cancel", headers=AUTH)
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "cancelled"
    again = await admin.post(f"/outbox/{pending}/cancel", headers=AUTH)
    assert again.status_code == 409
    assert again.json() == {"detail": "already cancelled", "status": "cancelled"}
    # Undo the cancel with a retry.
    undone = await admin.post(f"/outbox/{pending}/retry", headers=AUTH)
    assert undone.status_code == 200 and undone.json()["status"] == "pending"


@pytest.mark.parametrize("status", ["sending", "sent"])
async def test_cancel_refuses_sending_and_sent(
    admin: httpx.AsyncClient, db: asyncpg.Pool, status: str
) -> None:
    mail = await add_mail(db, status=status)
    await live_dispatcher(db)  # the sending row's dispatcher is alive
    response = await admin.post(f"/outbox/{mail}/cancel", headers=AUTH)
    assert response.status_code == 409, response.text
    assert response.json()["status"] == status
    assert (await statuses(db))[mail] == status


@pytest.mark.parametrize("action", ["retry", "cancel"])
async def test_retry_and_cancel_of_a_missing_mail_is_404(
    admin: httpx.AsyncClient, action: str
) -> None:
    response = await admin.post(f"/outbox/12345/{action}", headers=AUTH)
    assert response.status_code == 404
    assert response.json() == {"detail": "no mail with id 12345"}
    bad = await admin.post(f"/outbox/abc/{action}", headers=AUTH)
    assert bad.status_code == 422


# --- one time grammar with the CLI; retry now ----------------------------------------------


async def test_list_takes_ages_like_the_cli(admin: httpx.AsyncClient, db: asyncpg.Pool) -> None:
    recent = await add_mail(db)
    old = await add_mail(db, status="sent", age=timedelta(days=3))

    async def ids(**params: str) -> list[int]:
        response = await admin.get("/outbox", params=params, headers=AUTH)
        assert response.status_code == 200, response.text
        return [item["id"] for item in response.json()["items"]]

    assert await ids(since="1h") == [recent]
    assert await ids(since="2d") == [recent]
    assert await ids(until="2d") == [old]
    assert await ids(since="1w", until="1d") == [old]
    assert await ids(since=" 7d ") == [old, recent]  # newest (highest id) first


@pytest.mark.parametrize(
    "since", ["1y", "h1", "99999999999999999d", "0001-01-01T00:00:00+01:00", "2026-13-01"]
)
async def test_list_rejects_times_outside_the_grammar(admin: httpx.AsyncClient, since: str) -> None:
    response = await admin.get("/outbox", params={"since": since}, headers=AUTH)
    assert response.status_code == 422, response.text
    error = response.json()["detail"][0]
    assert error["loc"][-1] == "since"


async def test_retry_now_makes_a_deferred_mail_due(
    admin: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    mail = await add_mail(db)
    await db.execute(
        "UPDATE outbox SET next_attempt_at = now() + interval '1 hour' WHERE id = $1", mail
    )
    refused = await admin.post(f"/outbox/{mail}/retry", headers=AUTH)
    assert refused.status_code == 409
    assert refused.json()["detail"].endswith("(now=true makes it due at once)")

    response = await admin.post(f"/outbox/{mail}/retry", params={"now": "true"}, headers=AUTH)

    assert response.status_code == 200, response.text
    assert response.json()["status"] == "pending"
    due = datetime.fromisoformat(response.json()["next_attempt_at"])
    assert due <= await db.fetchval("SELECT now()")
