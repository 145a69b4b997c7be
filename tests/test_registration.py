"""POST /register against a real database: the contract, atomicity, races and bad input."""

from __future__ import annotations

import asyncio
import html
import re
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import markupsafe
import pytest
from asgi_lifespan import LifespanManager

from outbox.api.app import create_app
from outbox.cli import migrate
from outbox.cli.embedded_pg import EmbeddedPostgres, free_port
from outbox.dispatcher.addresses import email_key
from outbox.dispatcher.settings import Settings
from tests.asgi import app_client

MAIL_FROM = "Outbox <hello@example.org>"
MESSAGE_ID = re.compile(r"<[^<>@\s]+@example\.org>")


@pytest.fixture
async def client(database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(database_url=database_url, mail_from=MAIL_FROM))
    async with app_client(app, raise_app_exceptions=False) as http:
        yield http


async def _counts(db: asyncpg.Pool) -> tuple[int, int]:
    row = await db.fetchrow(
        "SELECT (SELECT count(*) FROM users) AS users, (SELECT count(*) FROM outbox) AS mails"
    )
    assert row is not None
    return row["users"], row["mails"]


async def test_register_creates_user_and_outbox_row(
    client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    response = await client.post(
        "/register", json={"email": "Ada.Lovelace@Example.COM", "name": "  Ada Lovelace "}
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert set(body) == {"id", "email", "name", "created_at", "outbox_id", "message_id"}
    assert isinstance(body["id"], int)
    assert isinstance(body["outbox_id"], int)
    # The domain is normalised to lower case, the local part is kept as typed.
    assert body["email"] == "Ada.Lovelace@example.com"
    assert body["name"] == "Ada Lovelace"
    assert MESSAGE_ID.fullmatch(body["message_id"]), body["message_id"]
    created = datetime.fromisoformat(body["created_at"])
    assert created.tzinfo is not None

    user = await db.fetchrow("SELECT * FROM users WHERE id = $1", body["id"])
    assert user is not None
    assert user["email"] == "Ada.Lovelace@example.com"
    assert user["name"] == "Ada Lovelace"
    assert user["created_at"] == created

    mail = await db.fetchrow("SELECT * FROM outbox WHERE id = $1", body["outbox_id"])
    assert mail is not None
    assert mail["message_id"] == body["message_id"]
    assert mail["sender"] == MAIL_FROM
    assert mail["recipient"] == "Ada.Lovelace@example.com"
    assert mail["recipient_name"] == "Ada Lovelace"
    assert mail["status"] == "pending"
    assert mail["attempts"] == 0
    assert mail["lease_token"] is None
    assert mail["sent_at"] is None
    # Due at once (the same transaction, so the same now()).
    assert mail["next_attempt_at"] == mail["created_at"] == user["created_at"]
    assert await _counts(db) == (1, 1)


async def test_outbox_row_holds_the_rendered_mail_with_the_name_escaped_in_html(
    client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    name = '<b>Bob & "Al"</b>'
    response = await client.post("/register", json={"email": "bob@example.com", "name": name})
    assert response.status_code == 201, response.text
    assert response.json()["name"] == name
    mail = await db.fetchrow("SELECT * FROM outbox WHERE id = $1", response.json()["outbox_id"])
    assert mail is not None
    assert mail["recipient"] == "bob@example.com"
    assert mail["recipient_name"] == name
    assert name in mail["subject"]
    assert mail["subject"] == f"Welcome to Outbox, {name}!"
    # Plain text carries the name as typed ...
    assert f"Hello {name}," in mail["body_text"]
    assert "bob@example.com" in mail["body_text"]
    # ... HTML carries it escaped (by the template's autoescaping), and never raw.
    assert "&lt;b&gt;Bob &amp; &#34;Al&#34;&lt;/b&gt;" in mail["body_html"]
    assert html.unescape("&lt;b&gt;Bob &amp; &#34;Al&#34;&lt;/b&gt;") == name
    assert "<b>Bob" not in mail["body_html"]
    assert mail["body_html"].startswith("<!doctype html>")


async def test_message_ids_are_unique_and_stable_in_format(
    client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    ids = []
    for i in range(5):
        response = await client.post(
            "/register", json={"email": f"user{i}@example.com", "name": f"User {i}"}
        )
        assert response.status_code == 201, response.text
        ids.append(response.json()["message_id"])
    assert len(set(ids)) == 5
    for message_id in ids:
        assert MESSAGE_ID.fullmatch(message_id), message_id
    stored = await db.fetch("SELECT message_id FROM outbox ORDER BY id")
    assert [row["message_id"] for row in stored] == ids


async def test_unicode_names_and_addresses_are_accepted(
    client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    for email, name in [
        ("zoe@example.com", "Zoë 山田"),
        ("jose@example.com", "José Ñúñez-O'Brien"),
        ("dmitri@example.com", "Дмитрий"),
        ("emoji@example.com", "Ada 👩‍💻"),
        ("x" * 64 + "@example.com", "x" * 200),  # the longest name
    ]:
        response = await client.post("/register", json={"email": email, "name": name})
        assert response.status_code == 201, (name, response.text)
        assert response.json()["name"] == name
        stored = await db.fetchval("SELECT name FROM users WHERE email = $1", email)
        assert stored == name
        html_body = await db.fetchval(
            "SELECT body_html FROM outbox WHERE id = $1", response.json()["outbox_id"]
        )
        assert str(markupsafe.escape(name)) in html_body


UNSAFE_NAMES = [
    ("Ada\u2028Bcc: x@evil.com", "line separators (U+2028)"),
    ("Ada\u2029Lovelace", "paragraph separators (U+2029)"),
    ("Ada \u202egnp.exe", "bidirectional control characters (U+202E)"),
    ("Ada\x00Lovelace", "control characters (CR, LF, tab, NUL, ...) (U+0000)"),
    ("Ada\r\nBcc: x@evil.com", "control characters (CR, LF, tab, NUL, ...) (U+000D)"),
]


@pytest.mark.parametrize(("name", "reason"), UNSAFE_NAMES)
async def test_names_that_are_not_plain_text_are_422_saying_why(
    client: httpx.AsyncClient, db: asyncpg.Pool, name: str, reason: str
) -> None:
    response = await client.post("/register", json={"email": "ada@example.com", "name": name})
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "name"]
    assert reason in error["msg"], error["msg"]
    assert name not in response.text  # the input is not echoed
    assert await _counts(db) == (0, 0)


LITERAL_NAMES = [
    "=?utf-8?q?Eve=0D=0ABcc:_x@evil.example?=",
    "=?utf-8?b?eEBldmlsLmV4YW1wbGUsIA==?=",
    "Ada =?iso-8859-1?q?Lovelace?= <ceo@evil.example>",
    "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",  # Persian, with the ZWNJ it needs
    "\u0915\u094d\u200d\u0937",  # ZWJ in Devanagari
    "👩\u200d👩\u200d👧",  # a ZWJ emoji sequence
]


@pytest.mark.parametrize("name", LITERAL_NAMES)
async def test_names_are_stored_literally_even_when_they_look_encoded(
    client: httpx.AsyncClient, db: asyncpg.Pool, name: str
) -> None:
    response = await client.post("/register", json={"email": "eve@example.com", "name": name})
    assert response.status_code == 201, response.text
    assert response.json()["name"] == name
    user = await db.fetchrow("SELECT name FROM users WHERE id = $1", response.json()["id"])
    mail = await db.fetchrow(
        "SELECT recipient, recipient_name, subject, body_text FROM outbox WHERE id = $1",
        response.json()["outbox_id"],
    )
    assert user is not None and mail is not None
    assert user["name"] == mail["recipient_name"] == name
    assert mail["recipient"] == "eve@example.com"
    assert mail["subject"] == f"Welcome to Outbox, {name}!"
    assert f"Hello {name}," in mail["body_text"]


async def test_duplicate_email_in_other_letter_case_is_409(
    client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    first = await client.post("/register", json={"email": "grace@example.com", "name": "Grace"})
    assert first.status_code == 201, first.text
    again = await client.post("/register", json={"email": "GRACE@Example.Com", "name": "G"})
    assert again.status_code == 409, again.text
    assert "already exists" in again.json()["detail"]
    assert await _counts(db) == (1, 1)


SAME_MAILBOX = [
    # (first, second, what EmailStr stores for the first)
    ("äda@example.com", "ÄDA@example.com", "äda@example.com"),
    ("a\u0308da@example.com", "ÄDA@EXAMPLE.COM", "äda@example.com"),  # NFD vs NFC
    ("σς@example.com", "ΣΣ@example.com", "σς@example.com"),
    ("straße@example.com", "STRASSE@example.com", "straße@example.com"),
    ("bob@bücher.de", "bob@xn--bcher-kva.de", "bob@bücher.de"),
    ("bob@xn--bcher-kva.de", "BOB@BÜCHER.DE", "bob@bücher.de"),
]


@pytest.mark.parametrize(("first", "second", "stored"), SAME_MAILBOX)
async def test_one_mailbox_in_any_unicode_or_idn_spelling_is_409(
    client: httpx.AsyncClient, db: asyncpg.Pool, first: str, second: str, stored: str
) -> None:
    created = await client.post("/register", json={"email": first, "name": "First"})
    assert created.status_code == 201, created.text
    assert created.json()["email"] == stored
    user = await db.fetchrow("SELECT email, email_key FROM users")
    assert user is not None
    assert user["email"] == stored
    assert user["email_key"] == email_key(stored)
    assert await db.fetchval("SELECT recipient FROM outbox") == stored

    again = await client.post("/register", json={"email": second, "name": "Second"})
    assert again.status_code == 409, again.text
    assert "already exists" in again.json()["detail"]
    assert await _counts(db) == (1, 1)


async def test_similar_but_different_mailboxes_are_separate_users(
    client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    emails = [
        "ada@example.com",
        "äda@example.com",
        "ada@exämple.com",
        "\u0131da@example.com",  # a dotless i is its own letter
        "ada@example.co",
    ]
    for email in emails:
        response = await client.post("/register", json={"email": email, "name": "Ada"})
        assert response.status_code == 201, (email, response.text)
    keys = [r["email_key"] for r in await db.fetch("SELECT email_key FROM users ORDER BY id")]
    assert len(set(keys)) == len(emails)
    assert await _counts(db) == (len(emails), len(emails))


def _case_variants(local: str, count: int) -> list[str]:
    letters = [i for i, ch in enumerate(local) if ch.isalpha()]
    assert 2 ** len(letters) >= count
    variants = []
    for n in range(count):
        chars = list(local)
        for bit, index in enumerate(letters):
            if n >> bit & 1:
                chars[index] = chars[index].upper()
        variants.append("".join(chars))
    return variants


async def test_concurrent_duplicates_in_different_case_give_one_user(
    client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    emails = [f"{local}@Example.com" for local in _case_variants("casey.jones", 20)]
    assert len({e for e in emails}) == 20
    responses = await asyncio.gather(
        *(client.post("/register", json={"email": e, "name": "Casey"}) for e in emails)
    )
    codes = sorted(r.status_code for r in responses)
    assert codes == [201] + [409] * 19, [r.text for r in responses if r.status_code != 409]
    winner = next(r for r in responses if r.status_code == 201).json()
    assert await _counts(db) == (1, 1)
    mail = await db.fetchrow("SELECT recipient FROM outbox")
    assert mail is not None
    assert mail["recipient"] == winner["email"]


async def test_failure_after_user_insert_leaves_nothing_behind(
    client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    # The outbox insert runs after the user insert in the same transaction; make it fail.
    await db.execute(
        """
        CREATE FUNCTION fail_for_doomed() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.recipient = 'doomed@example.com' THEN
                RAISE EXCEPTION 'injected outbox failure';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER fail_for_doomed BEFORE INSERT ON outbox
            FOR EACH ROW EXECUTE FUNCTION fail_for_doomed();
        """
    )
    response = await client.post("/register", json={"email": "doomed@example.com", "name": "D"})
    assert 500 <= response.status_code < 600, response.text
    assert response.headers["content-type"].startswith("application/json")
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail
    assert "Traceback" not in response.text
    assert "injected" not in response.text  # internal errors are logged, not shown
    assert await _counts(db) == (0, 0)

    # With the trigger gone the same request succeeds, and the API is still healthy. The
    # user insert really had run before the failure: it used up user id 1 (identity values
    # of a rolled-back insert are never handed out again).
    await db.execute("DROP TRIGGER fail_for_doomed ON outbox")
    response = await client.post("/register", json={"email": "doomed@example.com", "name": "D"})
    assert response.status_code == 201, response.text
    assert response.json()["id"] == 2
    assert await _counts(db) == (1, 1)


TOO_LONG_EMAIL = "a" * 64 + "@" + ".".join(["b" * 63] * 3) + ".com"  # 260 characters

BAD_BODIES: list[tuple[str, Any]] = [
    ("empty object", {}),
    ("missing name", {"email": "a@example.com"}),
    ("missing email", {"name": "Ada"}),
    ("empty email", {"email": "", "name": "Ada"}),
    ("no at sign", {"email": "plain", "name": "Ada"}),
    ("no domain dot", {"email": "a@b", "name": "Ada"}),
    ("no local part", {"email": "@example.com", "name": "Ada"}),
    ("no domain", {"email": "a@", "name": "Ada"}),
    ("two at signs", {"email": "a@@example.com", "name": "Ada"}),
    ("space in address", {"email": "a b@example.com", "name": "Ada"}),
    ("double dot domain", {"email": "a@example..com", "name": "Ada"}),
    ("display name form", {"email": "Ada <a@example.com>", "name": "Ada"}),
    ("header injection", {"email": "a@example.com\r\nBcc: x@evil.com", "name": "Ada"}),
    ("newline in email", {"email": "a\n@example.com", "name": "Ada"}),
    ("too long email", {"email": TOO_LONG_EMAIL, "name": "Ada"}),
    ("empty name", {"email": "a@example.com", "name": ""}),
    ("whitespace name", {"email": "a@example.com", "name": " \t\n "}),
    ("name over 200", {"email": "a@example.com", "name": "x" * 201}),
    ("CR in name", {"email": "a@example.com", "name": "Ada\rLovelace"}),
    ("LF in name", {"email": "a@example.com", "name": "Ada\nLovelace"}),
    ("CRLF header injection", {"email": "a@example.com", "name": "Ada\r\nBcc: x@evil.com"}),
    ("tab in name", {"email": "a@example.com", "name": "Ada\tLovelace"}),
    ("NUL in name", {"email": "a@example.com", "name": "Ada\x00"}),
    ("DEL in name", {"email": "a@example.com", "name": "Ada\x7f"}),
    ("C1 NEL in name", {"email": "a@example.com", "name": "Ada\u0085Lovelace"}),
    ("C1 CSI in name", {"email": "a@example.com", "name": "Ada\u009b31m"}),
    ("escape in name", {"email": "a@example.com", "name": "Ada\x1b[31m"}),
    ("line separator in name", {"email": "a@example.com", "name": "Ada\u2028Bcc: x@evil.com"}),
    ("paragraph separator in name", {"email": "a@example.com", "name": "Ada\u2029Lovelace"}),
    ("bidi override in name", {"email": "a@example.com", "name": "Ada \u202egnp.exe"}),
    ("bidi isolate in name", {"email": "a@example.com", "name": "Ada \u2066x\u2069"}),
    ("unknown field", {"email": "a@example.com", "name": "Ada", "is_admin": True}),
    ("email is a number", {"email": 5, "name": "Ada"}),
    ("email is a bool", {"email": True, "name": "Ada"}),
    ("name is a number", {"email": "a@example.com", "name": 5}),
    ("name is null", {"email": "a@example.com", "name": None}),
    ("name is a list", {"email": "a@example.com", "name": ["Ada"]}),
    ("name is an object", {"email": "a@example.com", "name": {"first": "Ada"}}),
    ("body is a list", [{"email": "a@example.com", "name": "Ada"}]),
    ("body is a string", "a@example.com"),
    ("body is a number", 5),
    ("body is null", None),
]


@pytest.mark.parametrize(("case", "body"), BAD_BODIES, ids=[case for case, _ in BAD_BODIES])
async def test_bad_json_input_is_422_with_a_message(
    client: httpx.AsyncClient, db: asyncpg.Pool, case: str, body: Any
) -> None:
    response = await client.post("/register", json=body)
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    assert errors, case
    for error in errors:
        assert error["msg"]
        assert error["loc"][0] == "body"
    assert await _counts(db) == (0, 0)


BAD_RAW: list[tuple[str, bytes, str]] = [
    ("not JSON", b"{not json", "application/json"),
    ("truncated JSON", b'{"email": "a@example.com", "name": "Ad', "application/json"),
    ("empty body", b"", "application/json"),
    ("not UTF-8", b'{"email": "a@example.com", "name": "\xff\xfe"}', "application/json"),
    (
        "lone surrogate in name",
        b'{"email": "a@example.com", "name": "A\\ud800"}',
        "application/json",
    ),
    (
        "lone surrogate in email",
        b'{"email": "\\udfff@example.com", "name": "A"}',
        "application/json",
    ),
    ("text content type", b'{"email": "a@example.com", "name": "Ada"}', "text/plain"),
    ("form encoded", b"email=a%40example.com&name=Ada", "application/x-www-form-urlencoded"),
]


@pytest.mark.parametrize(
    ("case", "content", "content_type"), BAD_RAW, ids=[case for case, _, _ in BAD_RAW]
)
async def test_bad_raw_body_is_422_with_a_message(
    client: httpx.AsyncClient, db: asyncpg.Pool, case: str, content: bytes, content_type: str
) -> None:
    response = await client.post(
        "/register", content=content, headers={"content-type": content_type}
    )
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["msg"], case
    assert await _counts(db) == (0, 0)


async def test_health_and_readiness_with_the_database_up(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "database": "ok"}


async def _wait_for(
    http: httpx.AsyncClient, deadline: float, request: Any, expected: int
) -> httpx.Response:
    while True:
        response: httpx.Response = await request()
        if response.status_code == expected or time.monotonic() > deadline:
            return response
        await asyncio.sleep(0.05)


async def test_database_down_gives_quick_503_and_the_api_recovers(tmp_path: Path) -> None:
    port = free_port()
    pg = EmbeddedPostgres(tmp_path / "pg", port=port)
    app = create_app(Settings(database_url=pg.url("postgres"), mail_from=MAIL_FROM))
    register = {"email": "ada@example.com", "name": "Ada"}
    try:
        async with LifespanManager(app) as manager:  # starts although nothing listens
            transport = httpx.ASGITransport(app=manager.app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
                # Nothing listens on the port: 503 at once, well under the 5 s connect timeout.
                for _ in range(3):
                    started = time.monotonic()
                    down = await http.post("/register", json=register)
                    not_ready = await http.get("/readyz")
                    elapsed = time.monotonic() - started
                    assert down.status_code == 503, down.text
                    assert down.headers["retry-after"] == "1"
                    assert "unavailable" in down.json()["detail"]
                    assert not_ready.status_code == 503, not_ready.text
                    assert elapsed < 1.0
                    assert (await http.get("/healthz")).status_code == 200

                # The database comes up: the same app serves without a restart.
                await asyncio.to_thread(pg.start)
                await asyncio.to_thread(migrate.upgrade, pg.url("postgres"))
                deadline = time.monotonic() + 15
                ready = await _wait_for(http, deadline, lambda: http.get("/readyz"), 200)
                assert ready.status_code == 200, ready.text
                first = await http.post("/register", json=register)
                assert first.status_code == 201, first.text

                # It goes away with connections in the pool: 503, never 500 ...
                await asyncio.to_thread(pg.stop, "fast")
                for _ in range(3):
                    response = await http.post(
                        "/register", json={"email": "bob@example.com", "name": "Bob"}
                    )
                    assert response.status_code == 503, response.text
                    assert (await http.get("/readyz")).status_code == 503

                # ... and comes back (same port): served again, nothing half-written.
                await asyncio.to_thread(pg.start)
                deadline = time.monotonic() + 15
                again = await _wait_for(
                    http,
                    deadline,
                    lambda: http.post(
                        "/register", json={"email": "bob@example.com", "name": "Bob"}
                    ),
                    201,
                )
                assert again.status_code == 201, again.text
                duplicate = await http.post("/register", json=register)
                assert duplicate.status_code == 409, duplicate.text
        conn = await asyncpg.connect(pg.url("postgres"))
        try:
            users = await conn.fetchval("SELECT count(*) FROM users")
            mails = await conn.fetchval("SELECT count(*) FROM outbox")
        finally:
            await conn.close()
        assert (users, mails) == (2, 2)
    finally:
        await asyncio.to_thread(pg.stop, "immediate")


async def test_openapi_documents_the_registration_contract(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    operation = spec["paths"]["/register"]["post"]
    body = operation["requestBody"]
    assert body["required"] is True
    schema = body["content"]["application/json"]["schema"]
    assert set(schema["required"]) == {"email", "name"}
    assert schema["properties"]["name"]["maxLength"] == 200
    assert schema["additionalProperties"] is False
    assert {"201", "409", "422", "503"} <= set(operation["responses"])
    created = operation["responses"]["201"]["content"]["application/json"]["schema"]
    assert created == {"$ref": "#/components/schemas/Registered"}
    assert (await client.get("/docs")).status_code == 200
