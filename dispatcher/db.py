"""PostgreSQL connection helpers shared by the API, the dispatcher and the CLI."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import asyncpg
from asyncpg.pool import PoolConnectionProxy

#: A plain connection or one borrowed from a pool: both run queries the same way.
Connection = asyncpg.Connection | PoolConnectionProxy

#: Errors that mean "the database is unreachable or went away", as opposed to a bad query.
CONNECTION_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.InterfaceError,
    asyncpg.AdminShutdownError,
    asyncpg.ConnectionFailureError,
    asyncpg.TooManyConnectionsError,
    # A pooled connection the server terminated while it sat idle (pg_terminate_backend, a
    # restart) fails its next use with this instead, until asyncpg notices the close.
    asyncpg.InternalClientError,
)

_SCHEMES = {"postgresql", "postgres", "postgresql+asyncpg"}


def asyncpg_dsn(url: str) -> str:
    """Return the URL as a plain ``postgresql://`` DSN that asyncpg accepts.

    Accepts ``postgresql://``, ``postgres://`` and SQLAlchemy's ``postgresql+asyncpg://``.
    """
    parts = urlsplit(url)
    if parts.scheme not in _SCHEMES:
        raise ValueError(
            "must start with postgresql:// or postgresql+asyncpg:// "
            f"(got scheme {parts.scheme or '(none)'!r})"
        )
    # The scheme is swapped textually: urlunsplit would drop the "//" of a URL without a
    # host (postgresql:///db?host=/run/postgresql), which asyncpg then refuses.
    return "postgresql" + url.strip()[len(parts.scheme) :]


def sqlalchemy_url(url: str) -> str:
    """Return the URL with SQLAlchemy's asyncpg driver name, for Alembic."""
    return "postgresql+asyncpg" + asyncpg_dsn(url)[len("postgresql") :]


def redact(url: str) -> str:
    """The URL with its password replaced, safe to log or print."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit((parts.scheme, netloc, *parts[2:]))


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool reset hook: nothing to undo, so release sends no query.

    Pool users keep no session state (no SET, advisory lock, cursor or LISTEN; asyncpg
    still rolls back an open transaction first). asyncpg's default reset runs a query on
    every release, and when the server terminates the connection just after a statement
    succeeded, that query fails and the release raises, discarding the statement's
    result: a committed claim was then unknown to its dispatcher until its lease expired.
    """


async def create_pool(
    url: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    command_timeout: float = 30.0,
    connect_timeout: float = 5.0,
    application_name: str = "outbox",
) -> asyncpg.Pool:
    """Open an asyncpg pool for the URL (UTC session time zone, bounded connect time)."""
    pool = await asyncpg.create_pool(
        asyncpg_dsn(url),
        timeout=connect_timeout,
        min_size=min_size,
        max_size=max_size,
        command_timeout=command_timeout,
        reset=_keep_session,
        server_settings={"timezone": "UTC", "application_name": application_name[:63]},
    )
    assert pool is not None
    return pool
