"""The start-up check every entry point runs before it uses the database.

In order: ``DATABASE_URL`` parses; the server answers; the role and the database exist;
the schema is at the head revision of ``migrations/`` (shipped in this package; the
history is kept in a version table of its own, :data:`VERSION_TABLE`). Each failure
becomes one :class:`StartupError` whose message is one line naming the setting (or the
command that fixes it), with the exit status the CLI uses: 2 for a configuration problem
(a bad URL, an unknown role or database, a schema that is not at head), 1 for a database
that cannot be reached right now. Only the second is worth retrying: ``outbox
dispatcher`` waits for an unreachable database and stops at once on a misconfigured one;
the API answers 503 and reports the reason on ``/readyz`` for both.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.resources
import sys
from pathlib import Path
from typing import Final, Literal
from urllib.parse import parse_qs, urlsplit

import asyncpg

from outbox.dispatcher.db import CONNECTION_ERRORS, asyncpg_dsn, redact

#: Exit status for a configuration problem (and for bad flags, like argparse).
CONFIGURATION: Final = 2
#: Exit status for a database that cannot be reached.
UNREACHABLE: Final = 1
#: Seconds to wait for the server when connecting.
CONNECT_TIMEOUT: Final = 5.0
#: The outbox's Alembic version table (one row per head revision applied): a name of its
#: own, so that an application's own Alembic history (``alembic_version``) can live in the
#: same database.
VERSION_TABLE: Final = "outbox_alembic_version"
#: Where earlier versions of the outbox kept it; ``outbox migrate`` moves the row from there.
LEGACY_VERSION_TABLE: Final = "alembic_version"
#: The registration service's tables, which ``outbox migrate --without-registration``
#: leaves out (the library, the dispatcher and the audit commands never use them).
REGISTRATION_TABLES: Final = ("users", "registration_keys")
#: The comment on :data:`VERSION_TABLE` of a database migrated without them: the choice is
#: made when the outbox is installed and kept by every later migration.
WITHOUT_REGISTRATION: Final = (
    "outbox schema without the registration tables (outbox migrate --without-registration)"
)
#: The migrations, shipped inside the package (``outbox.migrations``).
MIGRATIONS: Final = Path(str(importlib.resources.files("outbox.migrations")))

Kind = Literal["url", "unreachable", "database", "role", "schema"]


class StartupError(Exception):
    """Why the database cannot be used: a one-line ``message`` and the exit status."""

    def __init__(self, kind: Kind, message: str) -> None:
        super().__init__(message)
        self.kind: Kind = kind
        self.message = message

    def __str__(self) -> str:
        return self.message

    @property
    def exit_code(self) -> int:
        return UNREACHABLE if self.kind == "unreachable" else CONFIGURATION

    @property
    def retryable(self) -> bool:
        """True only for an unreachable database (a misconfiguration stays one)."""
        return self.kind == "unreachable"


def check_url(url: str) -> str:
    """The URL as an asyncpg DSN, or ValueError saying what is wrong (never the password)."""
    dsn = asyncpg_dsn(url)
    parts = urlsplit(dsn)
    hosts = parts.netloc.rpartition("@")[2]
    ports = [host.rpartition("]")[2] if host.startswith("[") else host for host in hosts.split(",")]
    ports = [spec.partition(":")[2] for spec in ports if ":" in spec]
    ports += parse_qs(parts.query).get("port", [])
    for port in ports:
        for one in port.split(","):
            if not one.isdigit() or not 1 <= int(one) <= 65535:
                raise ValueError(
                    f"the port must be a number from 1 to 65535, got {one!r} "
                    "(postgresql://user:password@host:5432/database)"
                )
    return dsn


def _where(url: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2] or "the local socket"
    return host


def classify(exc: BaseException, url: str) -> StartupError | None:
    """The :class:`StartupError` a connection or query error means, or None if it is none."""
    where = _where(url)
    reason = " ".join(str(exc).split()) or type(exc).__name__
    password = urlsplit(url).password
    if password:
        reason = reason.replace(password, "***")
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return StartupError(
            "database",
            f"invalid setting DATABASE_URL: {reason} on {where} "
            "(create it, or fix the database name)",
        )
    if isinstance(exc, asyncpg.InvalidPasswordError):
        return StartupError(
            "role", f"invalid setting DATABASE_URL: {reason} on {where} (fix the password)"
        )
    if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):
        return StartupError(
            "role",
            f"invalid setting DATABASE_URL: {reason} on {where} "
            "(fix the user name, or create the role)",
        )
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        return StartupError(
            "role",
            f"invalid setting DATABASE_URL: {reason} on {where} "
            "(grant the role access, or use another user)",
        )
    if isinstance(exc, asyncpg.UndefinedTableError | asyncpg.UndefinedColumnError):
        return StartupError("schema", f"{reason}: the schema is not at head; run `outbox migrate`")
    if isinstance(exc, ValueError):  # includes asyncpg's ClientConfigurationError
        return StartupError("url", f"invalid setting DATABASE_URL: {reason}")
    if isinstance(exc, CONNECTION_ERRORS):
        return StartupError(
            "unreachable",
            f"cannot reach the database at {redact(url)} (DATABASE_URL): "
            f"{type(exc).__name__}: {reason}",
        )
    if isinstance(exc, asyncpg.PostgresError):
        return StartupError("unreachable", f"the database at {where} refused: {reason}")
    return None


async def connect(
    url: str, *, application_name: str = "outbox", connect_timeout: float = CONNECT_TIMEOUT
) -> asyncpg.Connection:
    """A connection (UTC session time zone), or the :class:`StartupError` that prevents it."""
    try:
        conn: asyncpg.Connection = await asyncpg.connect(
            check_url(url),
            timeout=connect_timeout,
            server_settings={"timezone": "UTC", "application_name": application_name[:63]},
        )
    except Exception as exc:
        problem = classify(exc, url)
        if problem is None:
            raise
        raise problem from None
    return conn


@functools.cache
def _revisions() -> tuple[frozenset[str], frozenset[str]]:
    """The head revisions of ``migrations/``, and every revision it knows."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    script = ScriptDirectory.from_config(config)
    known = frozenset(rev.revision for rev in script.walk_revisions())
    return frozenset(script.get_heads()), known


def head_revisions() -> frozenset[str]:
    """The revisions ``outbox migrate`` upgrades to (loaded once per process)."""
    return _revisions()[0]


def _schema_problem(current: set[str], legacy: set[str]) -> StartupError | None:
    heads, known = _revisions()
    if current == set(heads):
        return None
    need = ", ".join(sorted(heads))
    if not current and legacy and legacy <= known:
        return StartupError(
            "schema",
            f"the schema is at revision {', '.join(sorted(legacy))} (recorded in "
            f"{LEGACY_VERSION_TABLE} by an earlier version of outbox), this version of outbox "
            f"needs {need}: run `outbox migrate`",
        )
    if not current:
        return StartupError(
            "schema",
            "DATABASE_URL points to a database without the outbox schema: run `outbox migrate`",
        )
    have = ", ".join(sorted(current))
    if current <= known:
        return StartupError(
            "schema",
            f"the schema is at revision {have}, this version of outbox needs {need}: "
            "run `outbox migrate`",
        )
    return StartupError(
        "schema",
        f"the schema is at revision {have}, which this version of outbox does not know "
        f"(it needs {need}; a newer version migrated it): upgrade outbox, or fix DATABASE_URL",
    )


# Which of the outbox's bookkeeping tables exist, and the version table's comment. The
# names are constants of this module, passed as parameters.
_SCHEMA_STATE = """
SELECT to_regclass($1) IS NOT NULL AS versioned,
       to_regclass($2) IS NOT NULL AND to_regclass('outbox') IS NOT NULL AS legacy,
       obj_description(to_regclass($1), 'pg_class') AS note,
       to_regclass($3) IS NOT NULL AND to_regclass($4) IS NOT NULL AS registration
"""


async def check_schema(
    conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy, *, registration: bool = False
) -> str:
    """The schema revision, or the :class:`StartupError` saying it is not at head.

    With ``registration`` (the registration service's check) the database must also have
    the registration tables, which ``outbox migrate --without-registration`` leaves out.
    """
    state = await conn.fetchrow(
        _SCHEMA_STATE, VERSION_TABLE, LEGACY_VERSION_TABLE, *REGISTRATION_TABLES
    )
    assert state is not None  # one row, always
    current: set[str] = set()
    legacy: set[str] = set()
    if state["versioned"]:
        # The table names are our constants, never input.
        rows = await conn.fetch(f"SELECT version_num FROM {VERSION_TABLE}")
        current = {row["version_num"] for row in rows}
    if not current and state["legacy"]:
        rows = await conn.fetch(f"SELECT version_num FROM {LEGACY_VERSION_TABLE}")
        legacy = {row["version_num"] for row in rows}
    problem = _schema_problem(current, legacy)
    if problem is not None:
        raise problem
    if registration and not state["registration"]:
        tables = " and ".join(REGISTRATION_TABLES)
        if state["note"] == WITHOUT_REGISTRATION:
            raise StartupError(
                "schema",
                "the database was migrated with `outbox migrate --without-registration`: it "
                f"has no {tables} tables, which the registration service needs (give `outbox "
                "api` a database migrated without that option)",
            )
        raise StartupError(
            "schema",
            f"the registration service's tables {tables} are missing: it needs a database "
            "migrated by `outbox migrate` without --without-registration",
        )
    return ", ".join(sorted(current))


async def check(
    url: str,
    *,
    schema: bool = True,
    application_name: str = "outbox",
    connect_timeout: float = CONNECT_TIMEOUT,
) -> str | None:
    """Run the whole check; return the schema revision (None when ``schema`` is false)."""
    conn = await connect(url, application_name=application_name, connect_timeout=connect_timeout)
    try:
        return await check_schema(conn) if schema else None
    except Exception as exc:
        problem = exc if isinstance(exc, StartupError) else classify(exc, url)
        if problem is None:
            raise
        raise problem from None
    finally:
        with contextlib.suppress(*CONNECTION_ERRORS):
            await conn.close(timeout=2)


def check_or_exit(url: str, command: str, *, schema: bool = True) -> None:
    """:func:`check`, turning a failure into one line on stderr and its exit status."""
    try:
        asyncio.run(check(url, schema=schema, application_name=f"outbox {command}"))
    except StartupError as problem:
        print(f"outbox {command}: {problem}", file=sys.stderr)
        raise SystemExit(problem.exit_code) from None
