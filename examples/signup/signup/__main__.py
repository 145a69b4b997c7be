"""``python -m signup``: create the app's tables in ``DATABASE_URL`` (those missing)."""

from __future__ import annotations

import asyncio
import os

from sqlalchemy.ext.asyncio import create_async_engine

from signup.app import engine_url
from signup.models import create_tables


async def main() -> None:
    engine = create_async_engine(engine_url(os.environ["DATABASE_URL"]))
    try:
        await create_tables(engine)
    finally:
        await engine.dispose()
    print("the app's tables are there (users, password_resets)")


asyncio.run(main())
