"""The API's watch on its database: the start-up check, logged, and repeated while it fails.

The API starts and serves whatever its database's state: requests that need the database
get 503 until it is usable. This module runs :mod:`dispatcher.startup`'s check at
start-up and every few seconds while something is wrong (every 30 s while all is well),
so the log says at once what is wrong and keeps saying it while it lasts, at most once
per :data:`LOG_EVERY` seconds however many requests fail, then says when it is over.
``/readyz`` runs the same check.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Final

import asyncpg

from outbox.dispatcher import startup
from outbox.dispatcher.db import CONNECTION_ERRORS, redact

log = logging.getLogger("api.database")

#: A problem that lasts is logged again after this many seconds.
LOG_EVERY: Final = 30.0
#: Seconds between checks while the database has a problem, and while it has none.
RECHECK_TROUBLE: Final = 2.0
RECHECK_HEALTHY: Final = 30.0
#: A check gives up after this many seconds (the pool's connect timeout is 5 s).
CHECK_TIMEOUT: Final = 6.0

_CHECK_ERRORS: tuple[type[Exception], ...] = (
    *CONNECTION_ERRORS,
    asyncpg.PostgresError,
    ValueError,
)


class DatabaseWatch:
    """The latest known problem of the database (None: usable), and its log lines."""

    def __init__(self, pool: asyncpg.Pool, url: str) -> None:
        self._pool = pool
        self._url = url
        self.problem: startup.StartupError | None = None
        self._checked = False
        self._logged_at = 0.0
        self._recheck = asyncio.Event()

    async def check(self, limit: float = CHECK_TIMEOUT) -> startup.StartupError | None:
        """Run the start-up check on a pooled connection; record and return the problem."""
        problem: startup.StartupError | None = None
        revision = None
        try:
            async with asyncio.timeout(limit), self._pool.acquire() as conn:
                revision = await startup.check_schema(conn, registration=True)
        except startup.StartupError as exc:
            problem = exc
        except _CHECK_ERRORS as exc:
            problem = startup.classify(exc, self._url)
        self.report(problem, revision=revision)
        return problem

    def report(self, problem: startup.StartupError | None, *, revision: str | None = None) -> None:
        """Record what a check or a failed request found; log changes, and a lasting
        problem at most every :data:`LOG_EVERY` seconds."""
        before, self.problem = self.problem, problem
        first, self._checked = not self._checked, True
        now = time.monotonic()
        if problem is None:
            if before is not None or first:
                log.info(
                    "database.ready", extra={"database": redact(self._url), "schema": revision}
                )
            return
        self._recheck.set()  # check again soon: that is how the end of it is noticed
        if before is not None and before.kind == problem.kind and now - self._logged_at < LOG_EVERY:
            return
        self._logged_at = now
        log.log(
            logging.WARNING if problem.retryable else logging.ERROR,
            "database.unreachable" if problem.retryable else "database.misconfigured",
            extra={"setting": "DATABASE_URL", "error": str(problem)},
        )

    async def run(self) -> None:
        """Check now, then every few seconds while there is a problem (forever); a healthy
        watch checks every :data:`RECHECK_HEALTHY` seconds, or at once when a request
        reports a problem."""
        while True:
            self._recheck.clear()
            if await self.check() is not None:
                await asyncio.sleep(RECHECK_TROUBLE)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._recheck.wait(), RECHECK_HEALTHY)
