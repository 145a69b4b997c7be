"""The API's database watch: what it logs, and how often, while a problem lasts."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from outbox.api import database
from outbox.api.database import DatabaseWatch
from outbox.dispatcher.startup import StartupError

DOWN = StartupError("unreachable", "cannot reach the database at postgresql://h/db")
MISSING = StartupError("database", 'invalid setting DATABASE_URL: database "db" does not exist')


def _lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "api.database"]


async def test_a_lasting_problem_is_logged_again_only_every_30_seconds(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(database.time, "monotonic", lambda: clock[0])
    caplog.set_level(logging.INFO, logger="api.database")
    pool: Any = None  # report() never touches the pool
    watch = DatabaseWatch(pool, "postgresql://h/db")

    for second in range(0, 30, 3):  # ten failing requests in 30 s: one line
        clock[0] = 1000.0 + second
        watch.report(DOWN)
    assert _lines(caplog) == [("WARNING", "database.unreachable")]

    clock[0] = 1000.0 + database.LOG_EVERY + 1  # still down: said again
    watch.report(DOWN)
    assert len(_lines(caplog)) == 2

    watch.report(MISSING)  # another problem: said at once, as an error
    assert _lines(caplog)[-1] == ("ERROR", "database.misconfigured")
    assert caplog.records[-1].__dict__["setting"] == "DATABASE_URL"

    watch.report(None, revision="0003")  # over: said once
    watch.report(None, revision="0003")
    assert _lines(caplog)[-1] == ("INFO", "database.ready")
    assert len(_lines(caplog)) == 4
    assert watch.problem is None
