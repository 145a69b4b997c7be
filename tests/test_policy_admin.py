"""The sending policy's admin endpoints (``/policies``, ``/suppressions``) against a real
database: auth, the twins of the CLI commands, 422 on bad input, never a 500."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import asyncpg
import httpx
import pytest
from hypothesis import event, given, seed
from hypothesis import strategies as st

from tests.asgi import ADMIN_TOKEN as TOKEN
from tests.asgi import AUTH
from tests.audit_seed import add_mail, live_dispatcher
from tests.hostile import ANY_TEXT, SEED, explain, hypothesis_settings, show_seed
from tests.test_policy_cli import POLICY_TEXT, policies, windows


@pytest.fixture(scope="module", autouse=True)
def _show_seed(request: pytest.FixtureRequest) -> None:
    show_seed(request)


ENDPOINTS = [
    ("GET", "/policies"),
    ("GET", "/policies/*"),
    ("GET", "/policies/example.com"),
    ("PUT", "/policies/*/limits"),
    ("PUT", "/policies/bad domain/limits"),
    ("DELETE", "/policies/example.com/limits"),
    ("POST", "/policies/*/pause"),
    ("POST", "/policies/example.com/resume"),
    ("GET", "/suppressions"),
    ("GET", "/suppressions/ada@example.com"),
    ("PUT", "/suppressions/ada@example.com"),
    ("DELETE", "/suppressions/ada@example.com"),
]


# --- authentication ---------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
async def test_without_a_configured_token_everything_is_404(
    no_token: httpx.AsyncClient, db: asyncpg.Pool, method: str, path: str
) -> None:
    for headers in ({}, AUTH):
        response = await no_token.request(
            method, path, headers=headers, json={"rates": ["1/s"], "reason": "x"}
        )
        assert response.status_code == 404, response.text
        assert response.json() == {"detail": "Not Found"}
    assert await policies(db) == {}
    assert await db.fetchval("SELECT count(*) FROM outbox_suppressions") == 0


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token-0123456789", TOKEN])
async def test_missing_or_wrong_token_is_401(
    admin: httpx.AsyncClient,
    db: asyncpg.Pool,
    method: str,
    path: str,
    authorization: str | None,
) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}
    response = await admin.request(
        method, path, headers=headers, json={"rates": ["1/s"], "reason": "x"}
    )
    assert response.status_code == 401, response.text
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert await policies(db) == {}
    assert await db.fetchval("SELECT count(*) FROM outbox_suppressions") == 0


async def test_openapi_documents_the_policy_endpoints(admin: httpx.AsyncClient) -> None:
    spec = (await admin.get("/openapi.json")).json()
    for path, method in [
        ("/policies", "get"),
        ("/policies/{scope}", "get"),
        ("/policies/{scope}/limits", "put"),
        ("/policies/{scope}/limits", "delete"),
        ("/policies/{scope}/pause", "post"),
        ("/policies/{scope}/resume", "post"),
        ("/suppressions", "get"),
        ("/suppressions/{address}", "get"),
        ("/suppressions/{address}", "put"),
        ("/suppressions/{address}", "delete"),
    ]:
        operation = spec["paths"][path][method]
        assert operation["security"] == [{"AdminToken": []}], (path, method)
        assert {"401", "404"} <= set(operation["responses"])
    assert {"Policy", "PolicyList", "Suppression"} <= set(spec["components"]["schemas"])
    body = spec["paths"]["/policies/{scope}/limits"]["put"]["requestBody"]
    assert body["required"] is True
    assert set(body["content"]["application/json"]["schema"]["properties"]) == {
        "rates",
        "concurrency",
    }
    reason = spec["paths"]["/suppressions/{address}"]["put"]["requestBody"]
    assert reason["required"] is False


# --- limits, pause, resume --------------------------------------------------------------------


async def test_limits_set_show_and_remove(admin: httpx.AsyncClient, db: asyncpg.Pool) -> None:
    assert (await admin.get("/policies", headers=AUTH)).json() == {"items": []}

    response = await admin.put(
        "/policies/Bücher.DE/limits",
        json={"rates": ["40/s", "1000/h"], "concurrency": 5},
        headers=AUTH,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["domain"] == "xn--bcher-kva.de"
    assert [r["rate"] for r in body["rates"]] == ["40/s", "1000/h"]
    assert body["concurrency"] == 5 and body["paused"] is False and body["throttle"] is None
    assert await windows(db, "xn--bcher-kva.de") == [(1, 40, 40.0, 40.0), (3600, 1000, 1.0, 1.0)]

    # A field left out is kept.
    kept = await admin.put(
        "/policies/xn--bcher-kva.de/limits", json={"rates": ["2/m"]}, headers=AUTH
    )
    assert kept.json()["concurrency"] == 5 and [r["rate"] for r in kept.json()["rates"]] == ["2/m"]
    everything = await admin.put("/policies/*/limits", json={"concurrency": 3}, headers=AUTH)
    assert everything.status_code == 200 and everything.json()["domain"] is None

    await add_mail(db, "ada@bücher.de")
    await add_mail(db, "bob@example.com", status="sending")
    await live_dispatcher(db, "worker-1")
    listed = (await admin.get("/policies", headers=AUTH)).json()["items"]
    assert [(p["domain"], p["concurrency"], p["in_flight"], p["waiting"]) for p in listed] == [
        (None, 3, 1, 1),
        ("xn--bcher-kva.de", 5, 0, 1),
    ]
    one = (await admin.get("/policies/bücher.de", headers=AUTH)).json()
    assert one == listed[1]
    # A scope without a policy: no limit, not paused, its traffic counted.
    other = await admin.get("/policies/Example.COM", headers=AUTH)
    assert other.status_code == 200
    assert other.json() | {"updated_at": None} == {
        "domain": "example.com",
        "rates": [],
        "concurrency": None,
        "paused": False,
        "throttle": None,
        "in_flight": 1,
        "waiting": 0,
        "updated_at": None,
    }

    removed = await admin.delete("/policies/bücher.de/limits", headers=AUTH)
    assert removed.status_code == 200, removed.text
    assert removed.json()["rates"] == [] and removed.json()["updated_at"] is None
    assert await policies(db) == {"": {"paused": False, "concurrency": 3}}
    again = await admin.delete("/policies/bücher.de/limits", headers=AUTH)
    assert again.status_code == 404
    assert again.json() == {"detail": "xn--bcher-kva.de has no limit to remove"}


async def test_pause_and_resume(admin: httpx.AsyncClient, db: asyncpg.Pool) -> None:
    paused = await admin.post("/policies/*/pause", headers=AUTH)
    assert paused.status_code == 200 and paused.json()["paused"] is True
    assert (await admin.post("/policies/*/pause", headers=AUTH)).json()["paused"] is True
    domain = await admin.post("/policies/EXAMPLE.com/pause", headers=AUTH)
    assert domain.json()["domain"] == "example.com" and domain.json()["paused"] is True
    assert await policies(db) == {
        "": {"paused": True, "concurrency": None},
        "example.com": {"paused": True, "concurrency": None},
    }
    resumed = await admin.post("/policies/*/resume", headers=AUTH)
    assert resumed.status_code == 200 and resumed.json()["paused"] is False
    assert (await admin.post("/policies/*/resume", headers=AUTH)).status_code == 200
    assert await policies(db) == {"example.com": {"paused": True, "concurrency": None}}


BAD_LIMITS: list[tuple[str, Any, str]] = [
    ("*", {"rates": ["40/x"]}, "rates"),
    ("*", {"rates": ["0/s"]}, "rates"),
    ("*", {"rates": ["40/s", "100/s"]}, "rates"),
    ("*", {"rates": [f"1/{n}s" for n in range(1, 12)]}, "rates"),
    ("*", {"rates": []}, "rates"),
    ("*", {"rates": "40/s"}, "rates"),
    ("*", {"rates": [40]}, "rates"),
    ("*", {"concurrency": 0}, "concurrency"),
    ("*", {"concurrency": 10**7}, "concurrency"),
    ("*", {"concurrency": "many"}, "concurrency"),
    ("*", {}, "body"),
    ("*", {"rates": None, "concurrency": None}, "body"),
    ("*", {"rate": ["40/s"]}, "rate"),
    ("*", None, "body"),
    ("*", [], "body"),
    ("*", "not json", "body"),
    ("bad domain", {"rates": ["1/s"]}, "scope"),
    ("a..b", {"rates": ["1/s"]}, "scope"),
    ("xn--zz.de", {"rates": ["1/s"]}, "scope"),
    ("[127.0.0.1]", {"rates": ["1/s"]}, "scope"),
    ("x" * 1001, {"rates": ["1/s"]}, "scope"),
    ("%00", {"rates": ["1/s"]}, "scope"),
]


@pytest.mark.parametrize(("scope", "body", "field"), BAD_LIMITS)
async def test_bad_limits_are_422_naming_the_field(
    admin: httpx.AsyncClient, db: asyncpg.Pool, scope: str, body: Any, field: str
) -> None:
    if body == "not json":
        response = await admin.put(
            f"/policies/{scope}/limits",
            content=b'{"rates": [Infinity',
            headers={**AUTH, "content-type": "application/json"},
        )
    else:
        response = await admin.put(f"/policies/{scope}/limits", json=body, headers=AUTH)
    assert response.status_code == 422, response.text
    locations = [error["loc"] for error in response.json()["detail"]]
    assert any(field in loc or loc[-1] == field for loc in locations), response.text
    assert all(error["msg"] for error in response.json()["detail"])
    assert await policies(db) == {}


@pytest.mark.parametrize("action", ["pause", "resume"])
async def test_pause_of_a_bad_scope_is_422(admin: httpx.AsyncClient, action: str) -> None:
    response = await admin.post(f"/policies/not a domain/{action}", headers=AUTH)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["path", "scope"]
    assert "is not a domain name" in response.json()["detail"][0]["msg"]


# --- suppressions -----------------------------------------------------------------------------


async def test_suppressions(admin: httpx.AsyncClient, db: asyncpg.Pool) -> None:
    added = await admin.put(
        "/suppressions/Ada@Example.COM", json={"reason": "asked us to stop"}, headers=AUTH
    )
    assert added.status_code == 201, added.text
    assert added.json() | {"created_at": None} == {
        "address": "Ada@Example.COM",
        "address_key": "ada@example.com",
        "source": "operator",
        "reason": "asked us to stop",
        "outbox_id": None,
        "created_at": None,
    }
    # Already on the list (any spelling): 200, the entry unchanged.
    again = await admin.put("/suppressions/ada@example.com", json={"reason": "x"}, headers=AUTH)
    assert again.status_code == 200 and again.json() == added.json()
    # No body: the default reason. A slash in the local part is part of the address.
    slash = await admin.put(f"/suppressions/{quote('a/b@bücher.de')}", headers=AUTH)
    assert slash.status_code == 201, slash.text
    assert slash.json()["address_key"] == "a/b@xn--bcher-kva.de"
    assert slash.json()["reason"] == "suppressed by an operator"

    listed = (await admin.get("/suppressions", headers=AUTH)).json()
    assert listed["total"] == 2
    assert [s["address"] for s in listed["items"]] == ["a/b@bücher.de", "Ada@Example.COM"]
    limited = (await admin.get("/suppressions?limit=1", headers=AUTH)).json()
    assert len(limited["items"]) == 1 and limited["total"] == 2
    shown = await admin.get("/suppressions/ADA@example.com", headers=AUTH)
    assert shown.status_code == 200 and shown.json() == added.json()

    gone = await admin.delete("/suppressions/ADA@EXAMPLE.COM", headers=AUTH)
    assert gone.status_code == 204 and gone.content == b""
    missing = await admin.delete("/suppressions/ada@example.com", headers=AUTH)
    assert missing.status_code == 404
    assert missing.json() == {"detail": "ada@example.com is not on the suppression list"}
    assert (await admin.get("/suppressions/ada@example.com", headers=AUTH)).status_code == 404
    assert await db.fetchval("SELECT count(*) FROM outbox_suppressions") == 1


@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    [
        ("PUT", "/suppressions/not-an-address", None, "address"),
        ("PUT", "/suppressions/%3Cada@example.com", None, "address"),
        ("PUT", "/suppressions/a@b@example.com", None, "address"),
        ("PUT", "/suppressions/a b@example.com", None, "address"),
        ("PUT", "/suppressions/ada@exa mple.com", None, "address"),
        ("PUT", "/suppressions/%00@example.com", None, "address"),
        ("PUT", "/suppressions/ada@example.com", {"reason": ""}, "reason"),
        ("PUT", "/suppressions/ada@example.com", {"reason": "a\r\nb"}, "reason"),
        ("PUT", "/suppressions/ada@example.com", {"reason": "x" * 501}, "reason"),
        ("PUT", "/suppressions/ada@example.com", {"reason": 5}, "reason"),
        ("PUT", "/suppressions/ada@example.com", {"why": "x"}, "why"),
        ("GET", "/suppressions/@example.com", None, "address"),
        ("DELETE", "/suppressions/ada", None, "address"),
        ("GET", "/suppressions?limit=0", None, "limit"),
    ],
)
async def test_bad_suppressions_are_422(
    admin: httpx.AsyncClient, db: asyncpg.Pool, method: str, path: str, body: Any, field: str
) -> None:
    response = await admin.request(method, path, json=body, headers=AUTH)
    assert response.status_code == 422, response.text
    assert any(error["loc"][-1] == field for error in response.json()["detail"]), response.text
    assert await db.fetchval("SELECT count(*) FROM outbox_suppressions") == 0


# --- any input: a clean answer, never a 500 ---------------------------------------------------

#: JSON values of every kind for a field.
JSON_VALUES = st.one_of(
    POLICY_TEXT,
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    st.lists(POLICY_TEXT, max_size=4),
    st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2),
)


def _segment(text: str) -> str:
    """``text`` as one path segment, percent-encoded (lone surrogates as their bytes).

    A dot segment (``.`` or ``..``) is encoded too: as it is, a client removes it from
    the path (RFC 3986 5.2.4) and the request goes to another route.
    """
    if text in (".", ".."):
        return text.replace(".", "%2E")
    return quote(text.encode("utf-8", "surrogatepass"), safe="")


def _body(value: object) -> bytes:
    # By hand, so lone surrogates reach the API as JSON escapes, as a client may send them.
    return json.dumps(value).encode()


@seed(SEED)
@hypothesis_settings(200)
@given(
    scope=st.one_of(st.just("*"), POLICY_TEXT),
    rates=JSON_VALUES,
    concurrency=JSON_VALUES,
)
async def test_any_limits_body_or_scope_is_a_clean_answer(
    admin: httpx.AsyncClient, scope: str, rates: object, concurrency: object
) -> None:
    event(f"answer {await _limits_answer_cleanly(admin, scope, rates, concurrency)}")


async def _limits_answer_cleanly(
    admin: httpx.AsyncClient, scope: str, rates: object, concurrency: object
) -> int:
    """Every limits route answers ``scope`` with 200, 404 or 422 (the first one's code)."""
    explain(f"scope={scope!r} rates={rates!r} concurrency={concurrency!r}")
    path = f"/policies/{_segment(scope)}/limits"
    response = await admin.put(
        path,
        content=_body({"rates": rates, "concurrency": concurrency}),
        headers={**AUTH, "content-type": "application/json"},
    )
    explain(f"{response.status_code} {response.text}")
    assert response.status_code in (200, 404, 422), response.text
    response.json()  # always JSON
    for action in ("pause", "resume"):
        answer = await admin.post(f"/policies/{_segment(scope)}/{action}", headers=AUTH)
        assert answer.status_code in (200, 404, 422), answer.text
    removed = await admin.delete(path, headers=AUTH)
    assert removed.status_code in (200, 404, 422), removed.text
    return response.status_code


@seed(SEED)
@hypothesis_settings(200)
@given(address=POLICY_TEXT, reason=st.one_of(ANY_TEXT, JSON_VALUES))
async def test_any_address_or_reason_is_a_clean_answer(
    admin: httpx.AsyncClient, address: str, reason: object
) -> None:
    event(f"answer {await _suppression_answers_cleanly(admin, address, reason)}")


@pytest.mark.parametrize("text", [".", ".."])
async def test_a_dot_segment_scope_or_address_is_a_clean_answer(
    admin: httpx.AsyncClient, text: str
) -> None:
    # Found by the properties above: sent as it is, "." never reached these routes.
    await _limits_answer_cleanly(admin, text, ["1/s"], None)
    await _suppression_answers_cleanly(admin, text, None)


async def _suppression_answers_cleanly(
    admin: httpx.AsyncClient, address: str, reason: object
) -> int:
    """Every suppression route answers ``address`` cleanly (the first one's code)."""
    explain(f"address={address!r} reason={reason!r}")
    path = f"/suppressions/{_segment(address)}"
    response = await admin.put(
        path,
        content=_body({"reason": reason}),
        headers={**AUTH, "content-type": "application/json"},
    )
    explain(f"{response.status_code} {response.text}")
    assert response.status_code in (200, 201, 404, 422), response.text
    response.json()
    shown = await admin.get(path, headers=AUTH)
    assert shown.status_code in (200, 404, 422), shown.text
    removed = await admin.delete(path, headers=AUTH)
    assert removed.status_code in (204, 404, 422), removed.text
    if response.status_code in (200, 201):
        assert shown.status_code == 200 and removed.status_code == 204
    return response.status_code
