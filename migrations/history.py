"""The outbox's Alembic history in a database it may share with an application.

- Its own version table (:data:`VERSION_TABLE`, ``outbox_alembic_version``), so an
  application's own Alembic history (``alembic_version``) and the outbox's never meet.
- A history that an earlier version of the outbox recorded in ``alembic_version`` is
  adopted: the table moves to the new name before the migrations run
  (:func:`adopt_legacy_history`).
- The registration service's tables (``users``, ``registration_keys``) are optional:
  ``outbox migrate --without-registration`` (``alembic -x without-registration upgrade
  head``) installs the outbox without them, e.g. next to an application's own ``users``.
  The choice is made when the outbox is installed (revision 0001 records it as the comment
  of the version table) and every later run keeps it (:func:`decide`); the revision
  scripts ask :func:`registration`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection

from outbox.dispatcher.startup import (
    LEGACY_VERSION_TABLE,
    REGISTRATION_TABLES,
    VERSION_TABLE,
    WITHOUT_REGISTRATION,
)

__all__ = [
    "VERSION_TABLE",
    "WITHOUT_REGISTRATION",
    "WITHOUT_REGISTRATION_OPTION",
    "RegistrationMismatch",
    "adopt_legacy_history",
    "decide",
    "record_without_registration",
    "registration",
    "set_registration",
]

#: The ``Config.attributes`` key (and ``-x`` argument) asking for a schema without the
#: registration tables.
WITHOUT_REGISTRATION_OPTION: Final = "without-registration"
#: Where env.py leaves the decision for the revision scripts.
_DECIDED: Final = "outbox.registration"


class RegistrationMismatch(Exception):
    """``--without-registration`` given for a database that has the registration tables."""


def registration() -> bool:
    """True when the migrations being run include the registration service's tables."""
    return bool(context.config.attributes.get(_DECIDED, True))


def set_registration(included: bool) -> None:
    """Tell the revision scripts of this run whether the registration tables are included."""
    context.config.attributes[_DECIDED] = included


def adopt_legacy_history(connection: Connection, revisions: Iterable[str]) -> str | None:
    """Move the outbox's history from ``alembic_version`` to :data:`VERSION_TABLE`.

    Only a history that is certainly the outbox's moves: ``alembic_version`` holds one
    row, a revision of these migrations (``revisions``), the outbox's own tables exist,
    and :data:`VERSION_TABLE` holds nothing yet. An application's own ``alembic_version``
    is never touched. Returns the revision adopted, or None.
    """
    found = connection.execute(
        text(
            "SELECT to_regclass(:legacy) IS NOT NULL AND to_regclass('outbox') IS NOT NULL "
            "AND to_regclass('outbox_attempts') IS NOT NULL AS candidate, "
            "to_regclass(:table) IS NOT NULL AS versioned"
        ),
        {"legacy": LEGACY_VERSION_TABLE, "table": VERSION_TABLE},
    ).one()
    if not found.candidate:
        return None
    # The table names are constants of the outbox, never input.
    if found.versioned and connection.scalar(text(f"SELECT count(*) FROM {VERSION_TABLE}")):
        return None
    connection.execute(text(f"LOCK TABLE {LEGACY_VERSION_TABLE} IN ACCESS EXCLUSIVE MODE"))
    rows = connection.scalars(text(f"SELECT version_num FROM {LEGACY_VERSION_TABLE}")).all()
    if len(rows) != 1 or rows[0] not in set(revisions):
        return None
    if found.versioned:  # left empty by an attempt that failed: ours, and in the way
        connection.execute(text(f"DROP TABLE {VERSION_TABLE}"))
    connection.execute(text(f"ALTER TABLE {LEGACY_VERSION_TABLE} RENAME TO {VERSION_TABLE}"))
    # The primary key's index (and with it the constraint) follows Alembic's naming.
    connection.execute(
        text(f"ALTER INDEX IF EXISTS {LEGACY_VERSION_TABLE}_pkc RENAME TO {VERSION_TABLE}_pkc")
    )
    adopted: str = rows[0]
    return adopted


def decide(connection: Connection, *, without: bool) -> bool:
    """Whether this run includes the registration tables.

    On a database without the outbox's history, what was asked (``without``). Once the
    outbox is installed, what was chosen then, whatever is asked: a database installed
    without the tables stays so (an application's own ``users`` is never touched), and
    :class:`RegistrationMismatch` refuses ``without`` for one installed with them.
    """
    found = connection.execute(
        text(
            "SELECT to_regclass(:table) IS NOT NULL AS versioned, "
            "obj_description(to_regclass(:table), 'pg_class') AS note"
        ),
        {"table": VERSION_TABLE},
    ).one()
    installed = found.versioned and connection.scalar(text(f"SELECT count(*) FROM {VERSION_TABLE}"))
    if not installed:
        return not without
    included: bool = found.note != WITHOUT_REGISTRATION
    if without and included:
        raise RegistrationMismatch(
            "this database was migrated with the registration tables "
            f"({', '.join(REGISTRATION_TABLES)}): migrate it without --without-registration"
        )
    return included


def record_without_registration() -> str:
    """The statement (of revision 0001) that records an installation without them."""
    return f"COMMENT ON TABLE {VERSION_TABLE} IS '{WITHOUT_REGISTRATION}'"
