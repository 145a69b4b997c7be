"""The FastAPI application: routes, database pool, error mapping."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from api import admin, health, metrics, registration
from dispatcher import logs
from dispatcher.db import CONNECTION_ERRORS, create_pool
from dispatcher.settings import Settings, load_settings

log = logging.getLogger("api")


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the application (``uvicorn --factory api.app:create_app``)."""
    if settings is None:
        logs.configure()
        settings = load_settings()
    if settings.database_url is None:
        raise SystemExit("invalid setting DATABASE_URL: required by the API")
    database_url = settings.database_url

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # min_size=0: the API starts (and answers 503) even while the database is down,
        # and connects on the first request once it is back.
        app.state.pool = await create_pool(database_url, min_size=0, max_size=20)
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

    for error in CONNECTION_ERRORS:
        app.add_exception_handler(error, _db_down)
    return app
