"""The FastAPI application: routes, database pool, error mapping."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from api import admin, health, metrics, registration
from dispatcher import logs
from dispatcher.db import CONNECTION_ERRORS, create_pool
from dispatcher.settings import Settings, load_settings, require_database_url

log = logging.getLogger("api")

#: Database connections per API process (each uvicorn worker has its own pool).
POOL_SIZE = 20


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the application (``uvicorn --factory api.app:create_app``)."""
    serving = settings is None  # built by uvicorn's factory call, to serve
    if settings is None:
        logs.configure()
        settings = load_settings()
    database_url = require_database_url(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # min_size=0: the API starts (and answers 503) even while the database is down,
        # and connects on the first request once it is back.
        app.state.pool = await create_pool(
            database_url, min_size=0, max_size=POOL_SIZE, application_name="outbox-api"
        )
        # asyncpg's pool hands a released connection to whichever task asks first, so
        # under load a request woken for a connection can lose it to a newcomer, again and
        # again: a long latency tail. This semaphore is first come, first served, and
        # holds back no more requests than the pool has connections.
        app.state.gate = asyncio.Semaphore(POOL_SIZE)
        if serving:
            # Everything allocated so far lives as long as the process: keep it out of
            # the garbage collector's full passes, which otherwise pause every request
            # for milliseconds at a time. (Not for apps built in tests: they come and go.)
            gc.collect()
            gc.freeze()
        app.state.sender = settings.sender
        app.state.settings = settings
        try:
            yield
        finally:
            await app.state.pool.close()

    app = FastAPI(
        title="Outbox",
        summary="User registration with a transactional email outbox.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.include_router(registration.router)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(admin.router)

    async def _db_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("database.unavailable", extra={"path": request.url.path, "error": repr(exc)})
        return JSONResponse(
            {"detail": "the database is unavailable, retry later"},
            status_code=503,
            headers={"Retry-After": "1"},
        )

    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        # The transaction was rolled back; the client gets a JSON error, never a traceback
        # (that goes to the log).
        log.error(
            "request.failed",
            extra={"path": request.url.path, "error": type(exc).__name__},
            exc_info=exc,
        )
        return JSONResponse({"detail": "internal error; nothing was stored"}, status_code=500)

    # Unavailable: the server is unreachable, restarting, or out of connection slots.
    for error in CONNECTION_ERRORS:
        app.add_exception_handler(error, _db_down)
    # Any other database error (a failing constraint or trigger, a bug in a query).
    app.add_exception_handler(asyncpg.PostgresError, _internal_error)
    # Anything else: Starlette answers with this handler, then re-raises for the server's log.
    app.add_exception_handler(Exception, _internal_error)
    return app
