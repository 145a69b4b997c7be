"""Limits at the HTTP edge: bodies over 64 KiB are a 413 (never read whole), and query
text PostgreSQL cannot store is a 422 naming the parameter (never a 500).

Through the ASGI app, and against a real ``outbox api`` process for the streamed uploads.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from outbox.api.app import create_app
from outbox.api.limits import MAX_BODY_BYTES
from outbox.dispatcher.settings import Settings
from tests.api_process import api
from tests.asgi import app_client
from tests.audit_seed import add_mail

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "limits-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CHUNK = 64 * 1024


@pytest.fixture
async def client(database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(database_url=database_url, admin_token=TOKEN)  # type: ignore[arg-type]
    app = create_app(settings)
    async with app_client(app, raise_app_exceptions=False) as http:
        yield http


async def _counts(db: asyncpg.Pool) -> tuple[int, int]:
    row = await db.fetchrow(
        "SELECT (SELECT count(*) FROM users) AS users, (SELECT count(*) FROM outbox) AS mails"
    )
    assert row is not None
    return row["users"], row["mails"]


def _padded(size: int) -> bytes:
    """A valid registration, padded with whitespace on both sides to exactly ``size`` bytes."""
    core = json.dumps({"email": "ada@example.com", "name": "Ada"}).encode()
    before = (size - len(core)) // 2
    body = b" " * before + core + b"\n" * (size - len(core) - before)
    assert len(body) == size
    return body


def _assert_413(response: httpx.Response) -> None:
    assert response.status_code == 413, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"detail": "the request body is larger than 64 KiB"}


class Upload:
    """A streamed body of ``total`` bytes that records how much of it was taken."""

    def __init__(self, total: int, chunk: bytes = b" " * CHUNK) -> None:
        self.total = total
        self.chunk = chunk
        self.taken = 0

    def _next(self) -> bytes | None:
        if self.taken >= self.total:
            return None
        self.taken += len(self.chunk)
        return self.chunk

    def chunks(self) -> Iterator[bytes]:
        """For a blocking client."""
        while (chunk := self._next()) is not None:
            yield chunk

    async def achunks(self) -> AsyncIterator[bytes]:
        """For an async client."""
        while (chunk := self._next()) is not None:
            yield chunk


# --- bodies, through the ASGI app ------------------------------------------------------------


async def test_a_body_at_the_bound_is_read_and_one_byte_more_is_413(
    client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    headers = {"content-type": "application/json"}
    over = await client.post("/register", content=_padded(MAX_BODY_BYTES + 1), headers=headers)
    _assert_413(over)
    assert over.headers["connection"] == "close"
    assert await _counts(db) == (0, 0)

    exact = await client.post("/register", content=_padded(MAX_BODY_BYTES), headers=headers)
    assert exact.status_code == 201, exact.text
    assert await _counts(db) == (1, 1)


async def test_ten_megabytes_of_whitespace_around_valid_json_is_413(
    client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    response = await client.post(
        "/register", content=_padded(10 * 1024 * 1024), headers={"content-type": "application/json"}
    )
    _assert_413(response)
    assert await _counts(db) == (0, 0)


async def test_a_chunked_body_is_counted_as_it_streams_and_cut_at_the_bound(
    client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    upload = Upload(20 * 1024 * 1024, chunk=b" " * 1000)
    request = client.build_request(
        "POST", "/register", content=upload.achunks(), headers={"content-type": "application/json"}
    )
    assert "content-length" not in request.headers
    assert request.headers["transfer-encoding"] == "chunked"
    response = await client.send(request)
    _assert_413(response)
    # Reading stopped at the first chunk past the bound.
    assert MAX_BODY_BYTES < upload.taken <= MAX_BODY_BYTES + 1000
    assert await _counts(db) == (0, 0)


async def test_a_small_chunked_body_is_accepted(
    client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    body = json.dumps({"email": "ada@example.com", "name": "Ada"}).encode()
    upload = Upload(len(body), chunk=body)
    response = await client.post(
        "/register", content=upload.achunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 201, response.text
    assert await _counts(db) == (1, 1)


@pytest.mark.parametrize(("method", "path"), [("POST", "/outbox/1/retry"), ("GET", "/healthz")])
async def test_every_endpoint_refuses_a_large_body(
    client: httpx.AsyncClient, db: asyncpg.Pool, method: str, path: str
) -> None:
    mail = await add_mail(db, status="failed")
    response = await client.request(method, path, content=b"x" * (MAX_BODY_BYTES + 1), headers=AUTH)
    _assert_413(response)
    assert await db.fetchval("SELECT status FROM outbox WHERE id = $1", mail) == "failed"


# --- bodies, against a real `outbox api` process ---------------------------------------------


@pytest.fixture
def api_url(database_url: str) -> Iterator[str]:
    """A real ``outbox api`` process on the test's database."""
    with api(database_url, ready="/readyz") as running:
        yield running.url


def _post(url: str, content: object, **headers: str) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    with httpx.Client(timeout=30) as http:
        response = http.post(
            f"{url}/register",
            content=content,  # type: ignore[arg-type]
            headers={"content-type": "application/json", **headers},
        )
    return response, time.monotonic() - started


async def test_a_real_server_cuts_a_streamed_20_mb_upload_short(
    api_url: str, db: asyncpg.Pool
) -> None:
    upload = Upload(20 * 1024 * 1024)
    response, elapsed = await asyncio.to_thread(_post, api_url, upload.chunks())
    _assert_413(response)
    assert elapsed < 5, elapsed
    # The server stopped reading and closed the connection: the client never got to send
    # most of the body (what it did send is bounded by the sockets' buffers).
    assert upload.taken < upload.total / 2, upload.taken
    assert await _counts(db) == (0, 0)

    # The server is fine afterwards.
    body = json.dumps({"email": "ada@example.com", "name": "Ada"})
    ok, _ = await asyncio.to_thread(_post, api_url, body)
    assert ok.status_code == 201, ok.text


async def test_a_real_server_refuses_a_large_content_length_before_reading(
    api_url: str, db: asyncpg.Pool
) -> None:
    size = 20 * 1024 * 1024
    upload = Upload(size)
    response, elapsed = await asyncio.to_thread(
        _post, api_url, upload.chunks(), **{"content-length": str(size)}
    )
    _assert_413(response)
    assert elapsed < 5, elapsed
    assert upload.taken < upload.total / 2, upload.taken
    assert await _counts(db) == (0, 0)

    whitespace, _ = await asyncio.to_thread(_post, api_url, _padded(10 * 1024 * 1024))
    _assert_413(whitespace)
    assert await _counts(db) == (0, 0)


# --- query parameters --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ("recipient=%00", "recipient"),
        ("recipient=ada%00%40example.com&limit=5", "recipient"),
        ("limit=5&status=pending%00", "status"),
        ("since=2026-01-01%00", "since"),
        ("unknown=%00", "unknown"),
    ],
)
async def test_nul_in_a_query_parameter_is_422_naming_it(
    client: httpx.AsyncClient, db: asyncpg.Pool, query: str, parameter: str
) -> None:
    await add_mail(db, "ada@example.com")
    response = await client.get(f"/outbox?{query}", headers=AUTH)
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["query", parameter]
    assert repr(parameter) in error["msg"] and "NUL" in error["msg"]


async def test_nul_in_a_parameter_name_is_422_and_shown_escaped(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/healthz?re%00cipient=a", headers=AUTH)
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["query", "re\\u0000cipient"]
    assert error["msg"].startswith("query parameter 're\\u0000cipient' must be text")
    assert "\x00" not in response.text


async def test_nul_is_refused_on_every_endpoint(
    client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    mail = await add_mail(db, status="failed")
    for method, path in [
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/metrics"),
        ("POST", "/register"),
        ("GET", "/outbox/1"),
        ("POST", "/outbox/1/cancel"),
    ]:
        response = await client.request(method, f"{path}?x=1&name=a%00b", headers=AUTH)
        assert response.status_code == 422, (path, response.text)
        assert response.json()["detail"][0]["loc"] == ["query", "name"]
    assert await db.fetchval("SELECT status FROM outbox WHERE id = $1", mail) == "failed"


ODD_RECIPIENTS = [
    "%25",  # %
    "_",
    "%25%40%25",
    "a_b%25c@example.com",  # a_b%c@example.com
    "%27%3B DROP TABLE outbox;--",
    "%ED%A0%80@example.com",  # the UTF-8 spelling of a lone surrogate: decoded as U+FFFD
    "%FF%FE",  # not UTF-8
    "%E2%80%AE@example.com",  # a bidi override
    "%C3%84DA@EXAMPLE.COM",
    "x" * 320,
]


@pytest.mark.parametrize("recipient", ODD_RECIPIENTS)
async def test_odd_recipient_filters_match_literally_and_never_fail(
    client: httpx.AsyncClient, db: asyncpg.Pool, recipient: str
) -> None:
    await add_mail(db, "ada@example.com")
    await add_mail(db, "a_b%c@example.com")
    response = await client.get(f"/outbox?recipient={recipient}", headers=AUTH)
    assert response.status_code == 200, response.text
    found = [item["recipient"] for item in response.json()["items"]]
    if recipient.startswith("a_b"):
        assert found == ["a_b%c@example.com"]  # the whole address, no pattern matching
    else:
        assert found == []


@pytest.mark.parametrize(
    "query",
    [
        "recipient=" + "x" * 321,
        "since=1e300",
        "since=nan",
        "since=-99999999999999999999",
        "since=99999-01-01T00:00:00",
        "until=0000-01-01T00:00:00",
        "since=0001-01-01T00:00:00%2B14:00",  # year 0 in UTC
        "until=9999-12-31T23:59:59-14:00",  # year 10000 in UTC
        "cursor=99999999999999999999",
        "limit=-1",
        "status=%F0%9F%92%A5",
    ],
)
async def test_out_of_range_filters_are_422(client: httpx.AsyncClient, query: str) -> None:
    response = await client.get(f"/outbox?{query}", headers=AUTH)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"][0] == "query"


@pytest.mark.parametrize(
    "query",
    [
        "since=0001-01-01T00:00:00-14:00",
        "until=9999-12-31T23:59:59%2B14:00",
        "since=0001-01-01T00:00:00&until=9999-12-31T23:59:59.999999",
    ],
)
async def test_extreme_times_are_answered(
    client: httpx.AsyncClient, db: asyncpg.Pool, query: str
) -> None:
    await add_mail(db, "ada@example.com")
    response = await client.get(f"/outbox?{query}", headers=AUTH)
    assert response.status_code == 200, response.text
