"""POST /register with an Idempotency-Key, against a real database and a real process.

A repeat with the same key and body replays the original 201 (same ids, marked as a
replay), another body with the key is a 422, concurrent repeats make one user and one
mail, bad keys are 422 naming the header, keys expire after 24 hours and `outbox prune`
deletes them, and the key, the user and the mail commit together or not at all.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncpg
import httpx
import pytest
from asgi_lifespan import LifespanManager

from outbox.api import idempotency
from outbox.api.app import create_app
from outbox.cli.embedded_pg import free_port
from outbox.dispatcher.settings import Settings

OUTBOX = str(Path(sys.executable).with_name("outbox"))
MAIL_FROM = "Outbox <hello@example.org>"
ADA = {"email": "ada@example.com", "name": "Ada Lovelace"}
KEY = "3f0b9a52-5a53-4c5e-9d1c-6f1d1f0a2b11"
REPLAYED = "idempotent-replayed"


@pytest.fixture
async def client(database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(database_url=database_url, mail_from=MAIL_FROM))
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            yield http


async def _counts(db: asyncpg.Pool) -> tuple[int, int, int]:
    row = await db.fetchrow(
        "SELECT (SELECT count(*) FROM users) AS users, (SELECT count(*) FROM outbox) AS mails,"
        " (SELECT count(*) FROM registration_keys) AS keys"
    )
    assert row is not None
    return row["users"], row["mails"], row["keys"]


async def test_a_repeat_with_the_same_key_and_body_replays_the_original_201(
    client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    first = await client.post("/register", json=ADA, headers={"Idempotency-Key": KEY})
    assert first.status_code == 201, first.text
    assert REPLAYED not in first.headers
    for _ in range(3):
        again = await client.post("/register", json=ADA, headers={"Idempotency-Key": KEY})
        assert again.status_code == 201, again.text
        assert again.headers[REPLAYED] == "true"
        assert again.headers["content-type"] == "application/json"
        assert again.content == first.content  # the same body, byte for byte: same ids
    body = first.json()
    assert await _counts(db) == (1, 1, 1)
    key = await db.fetchrow("SELECT * FROM registration_keys")
    assert key is not None
    assert (key["key"], key["user_id"], key["outbox_id"]) == (KEY, body["id"], body["outbox_id"])
    assert key["expires_at"] - key["created_at"] == idempotency.TTL
    mail = await db.fetchrow("SELECT message_id FROM outbox")
    assert mail is not None and mail["message_id"] == body["message_id"]


async def test_the_same_body_means_the_same_fields_after_validation(
    client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    first = await client.post("/register", json=ADA, headers={"Idempotency-Key": KEY})
    assert first.status_code == 201, first.text
    # Other key order, white space around the name, the domain in capitals: the same request.
    again = await client.post(
        "/register",
        content=b'{"name": "  Ada Lovelace ", "email": "ada@EXAMPLE.com"}',
        headers={"Idempotency-Key": KEY, "content-type": "application/json"},
    )
    assert again.status_code == 201, again.text
    assert again.headers[REPLAYED] == "true"
    assert again.json() == first.json()
    assert await _counts(db) == (1, 1, 1)


@pytest.mark.parametrize(
    "other",
    [
        {"email": "grace@example.com", "name": "Ada Lovelace"},  # another user altogether
        {"email": "ada@example.com", "name": "Ada King"},  # the same address, another name
    ],
)
async def test_the_same_key_with_another_body_is_422_and_stores_nothing(
    client: httpx.AsyncClient, db: asyncpg.Pool, other: dict[str, str]
) -> None:
    first = await client.post("/register", json=ADA, headers={"Idempotency-Key": KEY})
    assert first.status_code == 201, first.text
    response = await client.post("/register", json=other, headers={"Idempotency-Key": KEY})
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["type"] == "idempotency_key_reused"
    assert error["loc"] == ["header", "Idempotency-Key"]
    assert "different body" in error["msg"] and "new key" in error["msg"]
    assert REPLAYED not in response.headers
    assert await _counts(db) == (1, 1, 1)
    # The first registration's answer is still what the key replays.
    again = await client.post("/register", json=ADA, headers={"Idempotency-Key": KEY})
    assert again.content == first.content


async def test_without_the_header_nothing_changes(
    client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    first = await client.post("/register", json=ADA)
    assert first.status_code == 201, first.text
    assert REPLAYED not in first.headers
    again = await client.post("/register", json=ADA)
    assert again.status_code == 409, again.text
    assert await _counts(db) == (1, 1, 0)
    # A key for an address registered without one is a 409 too: it is not this request.
    keyed = await client.post("/register", json=ADA, headers={"Idempotency-Key": KEY})
    assert keyed.status_code == 409, keyed.text
    assert await _counts(db) == (1, 1, 0)


async def test_a_keyed_request_refused_with_409_keeps_no_key(
    client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    assert (await client.post("/register", json=ADA)).status_code == 201
    refused = await client.post("/register", json=ADA, headers={"Idempotency-Key": KEY})
    assert refused.status_code == 409, refused.text
    # The key was not used up: the corrected request gets through with it.
    grace = {"email": "grace@example.com", "name": "Grace"}
    fixed = await client.post("/register", json=grace, headers={"Idempotency-Key": KEY})
    assert fixed.status_code == 201, fixed.text
    assert REPLAYED not in fixed.headers
    assert await _counts(db) == (2, 2, 1)


async def test_concurrent_repeats_make_one_user_and_one_mail(
    client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    responses = await asyncio.gather(
        *(client.post("/register", json=ADA, headers={"Idempotency-Key": KEY}) for _ in range(20))
    )
    assert [r.status_code for r in responses] == [201] * 20, [r.text for r in responses]
    originals = [r for r in responses if REPLAYED not in r.headers]
    assert len(originals) == 1
    assert {r.content for r in responses} == {originals[0].content}
    assert await _counts(db) == (1, 1, 1)


async def test_concurrent_requests_with_one_key_and_different_bodies(
    client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    bodies = [{"email": f"user{i}@example.com", "name": f"User {i}"} for i in range(10)]
    responses = await asyncio.gather(
        *(client.post("/register", json=b, headers={"Idempotency-Key": KEY}) for b in bodies)
    )
    codes = sorted(r.status_code for r in responses)
    assert codes == [201] + [422] * 9, [r.text for r in responses]
    winner = next(r for r in responses if r.status_code == 201).json()
    assert await _counts(db) == (1, 1, 1)
    assert await db.fetchval("SELECT email FROM users") == winner["email"]


BAD_KEYS = [
    ("empty", "", "must not be empty"),
    ("blank", "   ", "must not be empty"),
    ("too long", "k" * 256, "at most 255 characters"),
    ("non-ASCII", "schlüssel", "printable ASCII"),
    ("control character", "a\x01b", "printable ASCII"),
    ("DEL", "a\x7fb", "printable ASCII"),
]


@pytest.mark.parametrize(("case", "key", "message"), BAD_KEYS, ids=[c for c, _, _ in BAD_KEYS])
async def test_a_bad_key_is_422_naming_the_header(
    client: httpx.AsyncClient, db: asyncpg.Pool, case: str, key: str, message: str
) -> None:
    # Sent as the raw bytes a client would put on the wire (Latin-1, as HTTP has it).
    response = await client.post(
        "/register", json=ADA, headers=[(b"idempotency-key", key.encode("latin-1"))]
    )
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["type"] == "idempotency_key"
    assert error["loc"] == ["header", "Idempotency-Key"]
    assert error["msg"].startswith("Idempotency-Key ") and message in error["msg"], error
    assert await _counts(db) == (0, 0, 0)


async def test_two_key_headers_are_422_and_the_longest_key_is_fine(
    client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    two = await client.post(
        "/register", json=ADA, headers=[("Idempotency-Key", "a"), ("Idempotency-Key", "b")]
    )
    assert two.status_code == 422, two.text
    assert "give one Idempotency-Key header, not 2" in two.json()["detail"][0]["msg"]
    longest = "~ !" + "k" * 252  # printable ASCII, spaces inside included
    assert len(longest) == idempotency.MAX_LENGTH
    first = await client.post("/register", json=ADA, headers={"Idempotency-Key": longest})
    assert first.status_code == 201, first.text
    again = await client.post("/register", json=ADA, headers={"Idempotency-Key": longest})
    assert again.headers[REPLAYED] == "true" and again.content == first.content
    assert await db.fetchval("SELECT key FROM registration_keys") == longest


async def _expire(db: asyncpg.Pool, key: str) -> None:
    await db.execute(
        "UPDATE registration_keys SET created_at = now() - interval '25 hours',"
        " expires_at = now() - interval '1 hour' WHERE key = $1",
        key,
    )


async def test_an_expired_key_is_ignored_and_may_be_used_again(
    client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    first = await client.post("/register", json=ADA, headers={"Idempotency-Key": KEY})
    assert first.status_code == 201, first.text
    await _expire(db, KEY)
    # Past 24 hours a repeat is a new request again: Ada exists, so the usual 409.
    late = await client.post("/register", json=ADA, headers={"Idempotency-Key": KEY})
    assert late.status_code == 409, late.text
    # And the key can serve a new registration, which takes it over.
    grace = {"email": "grace@example.com", "name": "Grace Hopper"}
    reused = await client.post("/register", json=grace, headers={"Idempotency-Key": KEY})
    assert reused.status_code == 201, reused.text
    assert REPLAYED not in reused.headers
    again = await client.post("/register", json=grace, headers={"Idempotency-Key": KEY})
    assert again.headers[REPLAYED] == "true" and again.content == reused.content
    key = await db.fetchrow("SELECT user_id, expires_at > now() AS live FROM registration_keys")
    assert key is not None and key["user_id"] == reused.json()["id"] and key["live"]
    assert await _counts(db) == (2, 2, 1)


async def test_prune_deletes_expired_keys_and_keeps_live_ones(
    client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    for i in range(5):
        body = {"email": f"user{i}@example.com", "name": f"User {i}"}
        response = await client.post("/register", json=body, headers={"Idempotency-Key": f"k{i}"})
        assert response.status_code == 201, response.text
    for i in range(3):
        await _expire(db, f"k{i}")
    async with db.acquire() as conn:
        assert await idempotency.prune_expired(conn, dry_run=True) == 3
        assert await _counts(db) == (5, 5, 5)
        assert await idempotency.prune_expired(conn, batch_size=2) == 3
        assert await idempotency.prune_expired(conn) == 0
        with pytest.raises(ValueError, match="batch_size"):
            await idempotency.prune_expired(conn, batch_size=0)
    keys = {r["key"] for r in await db.fetch("SELECT key FROM registration_keys")}
    assert keys == {"k3", "k4"}
    assert await _counts(db) == (5, 5, 2)  # users and mail are not the keys' to delete


def _outbox(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOG_", "TEMPLATES_"))}
    env["DATABASE_URL"] = database_url
    return subprocess.run(
        [OUTBOX, *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


async def test_outbox_prune_deletes_expired_keys_whatever_the_age_given(
    client: httpx.AsyncClient, db: asyncpg.Pool, database_url: str
) -> None:
    for key in ("old", "new"):
        body = {"email": f"{key}@example.com", "name": key}
        response = await client.post("/register", json=body, headers={"Idempotency-Key": key})
        assert response.status_code == 201, response.text
    await _expire(db, "old")
    dry = await asyncio.to_thread(
        _outbox, database_url, "prune", "--older-than", "30d", "--dry-run"
    )
    assert dry.returncode == 0, dry.stderr
    assert "would delete 1 expired registration keys" in dry.stdout
    done = await asyncio.to_thread(_outbox, database_url, "prune", "--older-than", "30d")
    assert done.returncode == 0, done.stderr
    assert "deleted 1 expired registration keys (Idempotency-Key, kept 24 h)" in done.stdout
    assert [r["key"] for r in await db.fetch("SELECT key FROM registration_keys")] == ["new"]


async def test_the_key_the_user_and_the_mail_commit_together_or_not_at_all(
    client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    # The key is written last in the transaction: make that write fail.
    await db.execute(
        """
        CREATE FUNCTION fail_key() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'injected key failure'; END $$;
        CREATE TRIGGER fail_key BEFORE INSERT ON registration_keys
            FOR EACH ROW EXECUTE FUNCTION fail_key();
        """
    )
    response = await client.post("/register", json=ADA, headers={"Idempotency-Key": KEY})
    assert response.status_code == 500, response.text
    assert response.json() == {"detail": "internal error; nothing was stored"}
    assert await _counts(db) == (0, 0, 0)
    await db.execute("DROP TRIGGER fail_key ON registration_keys")

    # The mail's insert fails: no user and no key either.
    await db.execute(
        """
        CREATE FUNCTION fail_mail() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'injected outbox failure'; END $$;
        CREATE TRIGGER fail_mail BEFORE INSERT ON outbox
            FOR EACH ROW EXECUTE FUNCTION fail_mail();
        """
    )
    response = await client.post("/register", json=ADA, headers={"Idempotency-Key": KEY})
    assert response.status_code == 500, response.text
    assert await _counts(db) == (0, 0, 0)
    await db.execute("DROP TRIGGER fail_mail ON outbox")

    # The retry with the same key is a first registration, not a replay.
    retried = await client.post("/register", json=ADA, headers={"Idempotency-Key": KEY})
    assert retried.status_code == 201, retried.text
    assert REPLAYED not in retried.headers
    assert await _counts(db) == (1, 1, 1)


async def test_deleting_a_user_deletes_its_key(client: httpx.AsyncClient, db: asyncpg.Pool) -> None:
    first = await client.post("/register", json=ADA, headers={"Idempotency-Key": KEY})
    assert first.status_code == 201, first.text
    await db.execute("DELETE FROM users WHERE id = $1", first.json()["id"])
    assert await _counts(db) == (0, 1, 0)
    again = await client.post("/register", json=ADA, headers={"Idempotency-Key": KEY})
    assert again.status_code == 201, again.text
    assert REPLAYED not in again.headers and again.json()["id"] != first.json()["id"]


async def test_openapi_documents_the_header_and_the_replay(client: httpx.AsyncClient) -> None:
    operation = (await client.get("/openapi.json")).json()["paths"]["/register"]["post"]
    (parameter,) = operation["parameters"]
    assert parameter["name"] == "Idempotency-Key" and parameter["in"] == "header"
    assert parameter["required"] is False
    assert parameter["schema"]["maxLength"] == 255
    assert "Idempotent-Replayed" in operation["responses"]["201"]["headers"]


# --- a real `outbox api` process ------------------------------------------------------------


@contextmanager
def _api(database_url: str) -> Iterator[str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOG_", "TEMPLATES_"))}
    env["DATABASE_URL"] = database_url
    proc = subprocess.Popen(
        [OUTBOX, "api", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "outbox api did not start"
            time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def test_real_concurrent_requests_to_an_outbox_api_process(
    database_url: str, db: asyncpg.Pool
) -> None:
    """Many clients, each on its own connection and thread, repeat one keyed request at
    once (a load balancer retrying, a double-clicked button): one user, one mail, and
    every answer the same 201."""
    with _api(database_url) as url:
        start = threading.Barrier(16)
        answers: list[httpx.Response] = []

        def one() -> None:
            with httpx.Client(base_url=url, timeout=30) as http:
                start.wait()
                answers.append(http.post("/register", json=ADA, headers={"Idempotency-Key": KEY}))

        threads = [threading.Thread(target=one) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            await asyncio.to_thread(thread.join)
    assert [a.status_code for a in answers] == [201] * 16, [a.text for a in answers]
    assert sum(REPLAYED not in a.headers for a in answers) == 1
    assert len({a.content for a in answers}) == 1
    assert await _counts(db) == (1, 1, 1)


async def test_a_client_that_timed_out_gets_its_registration_on_retry(
    database_url: str, db: asyncpg.Pool
) -> None:
    """The first attempt commits after the client gave up on it; the retry is answered
    with that registration, not with a 409 for the client's own account."""
    with _api(database_url) as url:
        async with db.acquire() as blocker:
            # Hold the key table so the first attempt waits inside its transaction.
            transaction = blocker.transaction()
            await transaction.start()
            await blocker.execute("LOCK TABLE registration_keys IN ACCESS EXCLUSIVE MODE")
            async with httpx.AsyncClient(base_url=url, timeout=0.5) as http:
                with pytest.raises(httpx.ReadTimeout):
                    await http.post("/register", json=ADA, headers={"Idempotency-Key": KEY})
            await transaction.rollback()  # the first attempt now commits
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            retried = await http.post("/register", json=ADA, headers={"Idempotency-Key": KEY})
            assert retried.status_code == 201, retried.text
            assert retried.headers[REPLAYED] == "true"
            plain = await http.post("/register", json=ADA)  # without a key: the old answer
            assert plain.status_code == 409
    user = await db.fetchrow("SELECT id FROM users")
    assert user is not None and retried.json()["id"] == user["id"]
    assert await _counts(db) == (1, 1, 1)
