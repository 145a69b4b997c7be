"""Schemathesis against a real ``outbox api`` process and a real database.

Every operation of the OpenAPI schema (registration, probes, metrics and the admin
endpoints) gets generated requests, each sent twice: without credentials (or with
whatever Authorization header was generated) and with the valid admin Bearer token.
No answer may be a 5xx, every answer must match the schema (documented status code,
content type, headers and body), and no admin endpoint may ignore its authentication.
About 10 seconds with the default 100 examples per operation (SCHEMATHESIS_EXAMPLES).

Two runs, each with its seed printed at the start of the module:

* the main run uses a fixed seed when CI=true, so CI is reproducible (and a random one
  elsewhere); ``SCHEMATHESIS_SEED=<seed>`` repeats any run;
* a bounded random run (SCHEMATHESIS_RANDOM_EXAMPLES per operation, default 20) keeps
  exploring on every run; ``SCHEMATHESIS_RANDOM_SEED=<seed>`` repeats it.

Whatever either run finds is fixed and becomes a plain regression test elsewhere
(test_admin_api.py, test_registration.py), so it stays covered whatever the seed.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, seed, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.specs.openapi.checks import ignored_auth

from outbox.api.app import create_app
from outbox.dispatcher.settings import Settings
from tests.api_process import api
from tests.conftest import TEMPLATE, PgServer, _admin

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "schemathesis-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    ignored_auth,  # the admin endpoints refuse requests without the token, or a wrong one
]
EXAMPLES = int(os.environ.get("SCHEMATHESIS_EXAMPLES", "100"))
RANDOM_EXAMPLES = int(os.environ.get("SCHEMATHESIS_RANDOM_EXAMPLES", "20"))
#: The main run's seed under CI=true.
FIXED_SEED = 20261124
CI = os.environ.get("CI", "").lower() == "true"


def _seed(variable: str, fixed: int | None) -> int:
    if os.environ.get(variable):
        return int(os.environ[variable])
    return fixed if fixed is not None else random.randrange(2**32)


SEED = _seed("SCHEMATHESIS_SEED", FIXED_SEED if CI else None)
RANDOM_SEED = _seed("SCHEMATHESIS_RANDOM_SEED", None)


@pytest.fixture(scope="module", autouse=True)
def _print_seeds(request: pytest.FixtureRequest) -> None:
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    kind = "fixed, CI=true" if CI and "SCHEMATHESIS_SEED" not in os.environ else "random"
    message = (
        f"schemathesis: main run seed {SEED} ({kind}; SCHEMATHESIS_SEED={SEED} repeats it), "
        f"random run seed {RANDOM_SEED} (SCHEMATHESIS_RANDOM_SEED={RANDOM_SEED})"
    )
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        print(message)
        return
    with capture.global_and_fixture_disabled():  # straight to the terminal, even under -q
        reporter.write_line(message)


async def _seed(database_url: str) -> None:
    """A few mails in various states, so that reads return real rows and history."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            """
            UPDATE outbox SET status = 'failed', last_error = 'seeded', attempts = 3
            WHERE id = (SELECT min(id) FROM outbox);
            INSERT INTO outbox_attempts (outbox_id, attempt, dispatcher, started_at,
                                         finished_at, outcome, smtp_code, smtp_reply)
            SELECT id, 1, 'seed', now(), now(), 'deferred', 451, 'try later' FROM outbox;
            """
        )
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def api_url(pg_server: PgServer) -> Iterator[str]:
    """A real ``outbox api`` process with ADMIN_TOKEN set, on a fresh database."""
    name = f"outbox_schemathesis_{os.getpid()}"
    database_url = pg_server.url(name)
    asyncio.run(_admin(pg_server.admin_url, f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}"))
    errors: list[str] = []
    try:
        with api(database_url, ready="/readyz", ADMIN_TOKEN=TOKEN) as running:
            try:
                for i in range(3):
                    body = {"email": f"seed-{i}@example.com", "name": f"Seed {i}"}
                    assert httpx.post(f"{running.url}/register", json=body).status_code == 201
                asyncio.run(_seed(database_url))
                yield running.url
            finally:
                errors = [line for line in running.log().splitlines() if '"level": "error"' in line]
    finally:
        asyncio.run(_admin(pg_server.admin_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    assert not errors, "\n".join(errors[:5])


def _openapi() -> dict[str, object]:
    # The schema of the app itself, at import time (pytest parametrizes per operation before
    # any fixture runs); the test checks that the running process serves the same one.
    settings = Settings(database_url="postgresql://schema-only/none", admin_token=TOKEN)  # type: ignore[arg-type]
    return create_app(settings).openapi()


OPENAPI = _openapi()
schema = schemathesis.openapi.from_dict(OPENAPI)


def test_the_process_serves_the_schema_under_test(api_url: str) -> None:
    assert httpx.get(f"{api_url}/openapi.json").json() == OPENAPI


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
@seed(SEED)
def test_no_server_error_and_every_answer_matches_the_schema(
    case: schemathesis.Case, api_url: str
) -> None:
    case.call_and_validate(base_url=api_url, checks=CHECKS)
    case.call_and_validate(base_url=api_url, headers=AUTH, checks=CHECKS)


@schema.parametrize()
@settings(
    max_examples=RANDOM_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
@seed(RANDOM_SEED)
def test_a_bounded_random_run(case: schemathesis.Case, api_url: str) -> None:
    case.call_and_validate(base_url=api_url, checks=CHECKS)
    case.call_and_validate(base_url=api_url, headers=AUTH, checks=CHECKS)
