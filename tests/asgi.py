"""An httpx client for an ASGI app run in-process, with its lifespan (start-up, shutdown)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from asgi_lifespan import LifespanManager
from starlette.types import ASGIApp


@asynccontextmanager
async def app_client(
    app: ASGIApp, *, base_url: str = "http://test", raise_app_exceptions: bool = True
) -> AsyncIterator[httpx.AsyncClient]:
    """Start ``app``'s lifespan and yield a client talking to it.

    ``raise_app_exceptions=False`` shows what a real client gets when the app fails.
    """
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app, raise_app_exceptions=raise_app_exceptions)
        async with httpx.AsyncClient(transport=transport, base_url=base_url) as http:
            yield http


#: The admin token of the in-process apps the admin tests talk to, and its header.
ADMIN_TOKEN = "s3cret-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@asynccontextmanager
async def admin_client(database_url: str, token: str | None) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the whole app on ``database_url``, with ADMIN_TOKEN ``token`` (None:
    admin endpoints closed). As a real client sees it: an exception in the app is a 500."""
    from outbox.api.app import create_app
    from outbox.dispatcher.settings import Settings

    settings = Settings(database_url=database_url, admin_token=token)  # type: ignore[arg-type]
    async with app_client(create_app(settings), raise_app_exceptions=False) as http:
        yield http
