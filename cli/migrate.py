"""Schema migrations through Alembic (the same as ``alembic upgrade head``)."""

from __future__ import annotations

import sys
from pathlib import Path

from alembic import command
from alembic.config import Config

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def alembic_config(database_url: str) -> Config:
    """Alembic's configuration for this project, pointed at ``database_url``."""
    config = Config(str(PROJECT_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(PROJECT_ROOT / "migrations"))
    config.attributes["database_url"] = database_url
    config.attributes["configure_logging"] = False
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Upgrade the schema to ``revision`` (synchronous; call outside a running event loop)."""
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str) -> None:
    """Downgrade the schema to ``revision`` (``base`` removes every table)."""
    command.downgrade(alembic_config(database_url), revision)


def upgrade_or_exit(database_url: str, command_name: str) -> None:
    """:func:`upgrade`, turning a database error into a one-line message and exit status 1."""
    import asyncpg
    from alembic.util import CommandError
    from sqlalchemy.exc import SQLAlchemyError

    from dispatcher.db import redact

    try:
        upgrade(database_url)
    except CommandError as exc:  # e.g. the database is at a revision we do not know
        print(
            f"{command_name}: cannot migrate the database at {redact(database_url)}: {exc} "
            "(a newer version of outbox migrated it? upgrade outbox, or fix DATABASE_URL)",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    # RuntimeError: a migration refusing data it cannot carry over (two users with one
    # mailbox, say) and saying what to fix; its transaction was rolled back.
    except (
        OSError,
        RuntimeError,
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
        SQLAlchemyError,
    ) as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise SystemExit(
            f"{command_name}: cannot migrate the database at {redact(database_url)}: "
            f"{type(exc).__name__}: {reason}"
        ) from None
