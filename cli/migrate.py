"""Schema migrations through Alembic (the same as ``alembic upgrade head``).

The migrations ship inside the package (``outbox.migrations``), so this works from any
directory of any installation, without the repository's ``alembic.ini``.
"""

from __future__ import annotations

import sys

from alembic import command
from alembic.config import Config

from outbox.dispatcher.startup import MIGRATIONS
from outbox.migrations.history import WITHOUT_REGISTRATION_OPTION, RegistrationMismatch


def alembic_config(database_url: str, *, registration: bool = True) -> Config:
    """Alembic's configuration for the outbox's migrations, pointed at ``database_url``.

    ``registration=False`` installs the outbox without the registration service's tables
    (``outbox migrate --without-registration``).
    """
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["database_url"] = database_url
    config.attributes["configure_logging"] = False
    config.attributes[WITHOUT_REGISTRATION_OPTION] = not registration
    return config


def upgrade(database_url: str, revision: str = "head", *, registration: bool = True) -> None:
    """Upgrade the schema to ``revision`` (synchronous; call outside a running event loop).

    ``registration=False`` leaves out the registration service's tables when the outbox is
    installed; a database installed without them stays so whatever is given later.
    """
    command.upgrade(alembic_config(database_url, registration=registration), revision)


def downgrade(database_url: str, revision: str) -> None:
    """Downgrade the schema to ``revision`` (``base`` removes every table it made)."""
    command.downgrade(alembic_config(database_url), revision)


def upgrade_or_exit(database_url: str, command_name: str, *, registration: bool = True) -> None:
    """:func:`upgrade`, turning a database error into a one-line message and exit status 1."""
    import asyncpg
    from alembic.util import CommandError
    from sqlalchemy.exc import SQLAlchemyError

    from outbox.dispatcher.db import redact

    try:
        upgrade(database_url, registration=registration)
    except RegistrationMismatch as exc:
        print(f"{command_name}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
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
