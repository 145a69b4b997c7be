"""The FastAPI application: routes, database pool, error mapping."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from opentelemetry.trace import TracerProvider

from outbox.api import admin, admin_site, health, metrics, registration
from outbox.api.database import DatabaseWatch
from outbox.api.limits import BodyLimit, QueryText
from outbox.api.welcome import TemplateProblem, load_templates
from outbox.dispatcher import logs, startup, tracing
from outbox.dispatcher.db import CONNECTION_ERRORS, create_pool
from outbox.dispatcher.settings import Settings, load_settings, require_database_url

log = logging.getLogger("api")

#: Database connections per API process (each uvicorn worker has its own pool).
POOL_SIZE = 20
#: Database errors that mean a misconfiguration rather than a bug: 503, never 500.
NOT_READY: tuple[type[Exception], ...] = (
    asyncpg.InvalidCatalogNameError,
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InsufficientPrivilegeError,
    asyncpg.UndefinedTableError,
    asyncpg.UndefinedColumnError,
    asyncpg.UndefinedFunctionError,
)


def create_app(
    settings: Settings | None = None, tracer_provider: TracerProvider | None = None
) -> FastAPI:
    """Build the application (``uvicorn --factory api.app:create_app``).

    Spans go to ``tracer_provider``, else to the global one (a no-op until an
    OpenTelemetry SDK is configured).
    """
    serving = settings is None  # built by uvicorn's factory call, to serve
    if settings is None:
        settings = load_settings()
        logs.configure(settings.log_level, settings.log_format or "json")
    database_url = require_database_url(settings)
    # Compiled once, here: a broken template stops the process before it serves anything.
    try:
        welcome = load_templates(settings)
    except TemplateProblem as exc:
        if not serving:
            raise
        print(f"outbox api: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if serving and settings.templates_dir is not None:
        log.info("templates.loaded", extra={"templates": ", ".join(welcome.files.values())})

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
        app.state.tracer = tracing.tracer("outbox.api", tracer_provider)
        app.state.welcome = welcome
        app.state.settings = settings
        # The start-up check, logged now and again while the database has a problem.
        app.state.database = DatabaseWatch(app.state.pool, database_url)
        watch = asyncio.create_task(app.state.database.run(), name="database-watch")
        try:
            yield
        finally:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
            await app.state.pool.close()

    # /docs and /redoc load Swagger UI and ReDoc from files shipped in the package, not
    # from a CDN: they work without internet access.
    app = FastAPIOffline(
        title="Outbox",
        summary="User registration with a transactional email outbox.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.include_router(registration.router)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(admin.router)
    app.include_router(admin_site.router)  # /admin, the operator's web page
    # Before any route: bodies over 64 KiB are a 413, unstorable query text a 422.
    app.add_middleware(BodyLimit)
    app.add_middleware(QueryText)

    async def _db_down(request: Request, exc: Exception) -> JSONResponse:
        # Logged by the watch (rate-limited), which also notices when it is over.
        problem = startup.classify(exc, database_url)
        request.app.state.database.report(problem)
        retryable = problem is None or problem.retryable
        return JSONResponse(
            {"detail": "the database is unavailable, retry later"},
            status_code=503,
            headers={"Retry-After": "1" if retryable else "10"},
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

    # Unavailable: the server is unreachable, restarting, or out of connection slots; or
    # misconfigured: no such database or role, no access, a schema not at head.
    for error in (*CONNECTION_ERRORS, *NOT_READY):
        app.add_exception_handler(error, _db_down)
    # Any other database error (a failing constraint or trigger, a bug in a query).
    app.add_exception_handler(asyncpg.PostgresError, _internal_error)
    # Anything else: Starlette answers with this handler, then re-raises for the server's log.
    app.add_exception_handler(Exception, _internal_error)
    return app
