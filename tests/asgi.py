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
