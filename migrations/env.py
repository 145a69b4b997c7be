"""Alembic environment: runs migrations over asyncpg, URL from DATABASE_URL.

The history is kept in the outbox's own version table (``outbox_alembic_version``), never
in an application's ``alembic_version``; a history an earlier version of the outbox kept
there is moved first. ``-x without-registration`` (``outbox migrate
--without-registration``) installs the outbox without the registration service's tables:
see :mod:`outbox.migrations.history`.
"""

from __future__ import annotations

import asyncio
import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from outbox.dispatcher.db import sqlalchemy_url
from outbox.migrations import history

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logging", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _url() -> str:
    url = config.attributes.get("database_url") or os.environ.get("DATABASE_URL")
    if not url:
        raise SystemExit("invalid setting DATABASE_URL: required to run migrations")
    return sqlalchemy_url(url)


def _without_registration() -> bool:
    """Asked for: a Config attribute (``outbox migrate``) or ``-x without-registration``."""
    option = history.WITHOUT_REGISTRATION_OPTION
    if config.attributes.get(option):
        return True
    value = context.get_x_argument(as_dictionary=True).get(option)
    if value is None or value.lower() in ("false", "no", "0"):
        return False
    if value.lower() in ("", "true", "yes", "1"):
        return True
    raise SystemExit(f"-x {option}={value}: give -x {option} or -x {option}=false")


def _run(connection: Connection) -> None:
    known = [script.revision for script in context.script.walk_revisions()]
    history.adopt_legacy_history(connection, known)
    history.set_registration(history.decide(connection, without=_without_registration()))
    connection.commit()  # an adopted history stays adopted, whatever the migrations do
    context.configure(
        connection=connection,
        target_metadata=None,
        transaction_per_migration=True,
        version_table=history.VERSION_TABLE,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_online() -> None:
    engine = create_async_engine(_url(), poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
            await connection.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    history.set_registration(not _without_registration())
    context.configure(url=_url(), literal_binds=True, version_table=history.VERSION_TABLE)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_run_online())
