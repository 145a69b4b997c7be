"""The public outbox API: put a mail in the outbox inside the caller's transaction.

This is the one way mail enters the outbox. Call :func:`enqueue` on the same connection,
inside the same transaction, as the business write it belongs to: the mail then exists
if and only if that write commits, and the dispatchers are woken when it does. The
connection is an asyncpg connection, or a SQLAlchemy ``AsyncSession`` or
``AsyncConnection`` on the asyncpg driver (``postgresql+asyncpg://``); the statement runs
through SQLAlchemy then, in the transaction it manages.

A ``key`` makes a mail idempotent, permanently: a second enqueue with the same key, in
any transaction and at any later time (after ``outbox prune`` too, unless the key's own
longer window ran out), stores nothing and returns the mail the first one made.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from email.errors import NonASCIILocalPartDefect
from email.headerregistry import Address, HeaderRegistry
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeAlias

import asyncpg
from asyncpg import Record
from asyncpg.pool import PoolConnectionProxy

from outbox.dispatcher import queries, tracing
from outbox.dispatcher.addresses import (
    ascii_domain,
    email_key,
    plain_text,
    smtp_address,
    unsafe_text,
)
from outbox.dispatcher.db import Connection

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

#: What :func:`enqueue` runs on: an asyncpg connection (pooled or not; a pool runs each
#: statement in a transaction of its own), or a SQLAlchemy ``AsyncSession`` or
#: ``AsyncConnection`` on the asyncpg driver. (A string, so that importing this module
#: does not import SQLAlchemy.)
Executor: TypeAlias = "Connection | asyncpg.Pool | AsyncSession | AsyncConnection"

__all__ = [
    "DEFAULT_PRIORITY",
    "MAX_KEY_LENGTH",
    "Enqueued",
    "Executor",
    "Mail",
    "default_sender",
    "enqueue",
    "enqueue_with",
    "set_default_sender",
]

#: Longest idempotency key, in characters (checked by the database too).
MAX_KEY_LENGTH: Final = 200

#: The priority of mail enqueued without one: 0 is the most urgent, 9 the least.
DEFAULT_PRIORITY: Final = 5

_ASYNCPG_TYPES: Final = (asyncpg.Connection, PoolConnectionProxy, asyncpg.Pool)


@dataclass(frozen=True, slots=True, init=False)
class Mail:
    """A fully rendered email, ready to be stored and later sent as it is.

    ``recipient`` is an :class:`email.headerregistry.Address` or a string holding one
    address, with or without a display name: ``"ada@example.com"``,
    ``"Ada Lovelace <ada@example.com>"``, ``'"Lovelace, Ada" <ada@example.com>'``. A
    display name that looks like an RFC 2047 encoded word (``=?utf-8?q?...?=``) is
    refused in a string, where it would be decoded; pass an ``Address`` to send those
    characters as they are.
    """

    recipient: Address
    subject: str
    body_text: str
    body_html: str | None

    def __init__(
        self,
        recipient: Address | str,
        subject: str,
        body_text: str,
        body_html: str | None = None,
    ) -> None:
        if isinstance(recipient, str):
            recipient = _parse_recipient(recipient)
        object.__setattr__(self, "recipient", recipient)
        object.__setattr__(self, "subject", subject)
        object.__setattr__(self, "body_text", body_text)
        object.__setattr__(self, "body_html", body_html)
        # Header values must never carry a line break of any kind (CR, LF, U+2028, ...):
        # that is how header injection happens, and such a mail could never be rendered.
        for field, value in (
            ("subject", subject),
            ("recipient name", recipient.display_name),
            ("recipient", recipient.addr_spec),
        ):
            reason = unsafe_text(value)
            if reason is not None:
                raise ValueError(f"{field} {reason}")
        if not recipient.domain:
            raise ValueError("recipient must be a full address (user@domain)")
        smtp_address(recipient.addr_spec)  # the domain must have an ASCII form


def _parse_recipient(value: str) -> Address:
    """One address in header syntax, as an Address; ValueError naming what is wrong."""
    reason = unsafe_text(value)
    if reason is not None:
        raise ValueError(f"recipient {reason}")
    if "=?" in value:
        raise ValueError(
            "recipient must not contain '=?' in a string (it would be decoded as an RFC 2047 "
            "encoded word); pass an email.headerregistry.Address instead"
        )
    header = HeaderRegistry()("To", value)
    addresses: tuple[Address, ...] = getattr(header, "addresses", ())
    groups: tuple[Any, ...] = getattr(header, "groups", ())
    defects = [
        d
        for d in getattr(header, "defects", ())
        # An internationalised local part (用户@例子.广告) is fine: sent with SMTPUTF8.
        if not isinstance(d, NonASCIILocalPartDefect)
    ]
    if len(addresses) != 1 or defects or groups[0].display_name is not None:
        raise ValueError(
            f"recipient {value!r} is not one address like 'Ada <ada@example.com>' "
            "or 'ada@example.com'"
        )
    found = addresses[0]
    return Address(found.display_name, found.username, found.domain)


@dataclass(frozen=True, slots=True)
class Enqueued:
    """What :func:`enqueue` stored (or found): the outbox id and the stable Message-ID."""

    id: int
    message_id: str
    created_at: datetime
    #: The idempotency key the mail was enqueued with, if any.
    key: str | None = None
    #: True when the key had been used before: nothing was stored, and this is the mail
    #: the first enqueue made (which may have been sent, and even pruned, since).
    existed: bool = False


# --- The sender -------------------------------------------------------------------------

_default_sender: Address | None = None


@lru_cache(maxsize=64)
def _parse_sender(value: str) -> Address:
    from outbox.dispatcher.settings import parse_address  # pydantic only when a string is given

    try:
        return parse_address(value)
    except ValueError as exc:
        raise ValueError(f"sender {exc}") from None


def set_default_sender(sender: Address | str | None) -> None:
    """Make ``sender`` the From of mail enqueued without one; None restores the default
    (the ``MAIL_FROM`` environment variable, else ``Outbox <noreply@example.com>``)."""
    global _default_sender
    _default_sender = _parse_sender(sender) if isinstance(sender, str) else sender


def default_sender() -> Address:
    """The From of mail enqueued without a ``sender`` (see :func:`set_default_sender`)."""
    global _default_sender
    if _default_sender is None:
        from outbox.dispatcher.settings import Settings

        fallback: str = Settings.model_fields["mail_from"].default
        _default_sender = _parse_sender(os.environ.get("MAIL_FROM") or fallback)
    return _default_sender


def _sender(sender: Address | str | None) -> Address:
    if sender is None:
        return default_sender()
    if isinstance(sender, str):
        return _parse_sender(sender)
    return sender


def _check_priority(priority: int) -> None:
    # bool is an int, but True is no priority anyone means.
    if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 9:
        raise ValueError(
            f"priority must be a whole number from 0 (most urgent) to 9, got {priority!r}"
        )


def _check_key(key: str) -> None:
    if not isinstance(key, str):
        raise TypeError(f"key must be a str, got {type(key).__name__}")
    plain_text(key, "key", longest=MAX_KEY_LENGTH)  # NUL, lone surrogates: not storable


# --- Running a statement in the caller's transaction ---------------------------------------


class _Row(Protocol):
    def __getitem__(self, key: str, /) -> Any: ...


async def _fetchrow(conn: Executor, statement: str, args: tuple[object, ...]) -> _Row | None:
    """Run ``statement`` on ``conn`` in the transaction it is in; the first row or None."""
    if isinstance(conn, _ASYNCPG_TYPES):
        row: Record | None = await conn.fetchrow(statement, *args)
        return row
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

    if isinstance(conn, AsyncSession):
        # The session's connection in its current transaction (begun now if none is):
        # the statement commits or rolls back with everything else in the session.
        conn = await conn.connection()
    if not isinstance(conn, AsyncConnection):
        raise TypeError(
            "enqueue needs an asyncpg connection or a SQLAlchemy AsyncSession or "
            f"AsyncConnection, got {type(conn).__name__}"
        )
    if conn.dialect.driver != "asyncpg":
        raise TypeError(
            "enqueue needs SQLAlchemy's asyncpg driver (postgresql+asyncpg://), "
            f"got {conn.dialect.name}+{conn.dialect.driver}"
        )
    # The driver's own SQL ($1, $2, ...: the asyncpg dialect's numeric_dollar style), run
    # by SQLAlchemy on the connection, so it joins the transaction SQLAlchemy manages.
    result = await conn.exec_driver_sql(statement, args)
    first = result.first()
    return None if first is None else first._mapping


# --- Enqueue ------------------------------------------------------------------------------


def _mail_params(
    mail: Mail, sender: Address, not_before: datetime | None, priority: int
) -> tuple[str, tuple[object, ...]]:
    """The Message-ID, and the mail's parameters $1..$11 of ENQUEUE (in its order)."""
    _check_priority(priority)
    # 128 random bits from the OS (email.utils.make_msgid draws on the global `random`
    # module, which an app or a test may seed); the domain is the sender's, as ASCII.
    message_id = f"<{secrets.token_hex(16)}@{ascii_domain(sender.domain)}>"
    recipient = mail.recipient
    return message_id, (
        message_id,
        str(sender),
        recipient.addr_spec,
        recipient.display_name,
        mail.subject,
        mail.body_text,
        mail.body_html,
        not_before,
        priority,
        # The scope of the recipient's domain limits, and its suppression-list key.
        ascii_domain(recipient.domain),
        email_key(recipient.addr_spec),
    )


async def enqueue(
    conn: Executor,
    mail: Mail,
    *,
    sender: Address | str | None = None,
    key: str | None = None,
    priority: int = DEFAULT_PRIORITY,
    not_before: datetime | None = None,
) -> Enqueued:
    """Store ``mail`` in the outbox on ``conn`` and notify the dispatchers at commit.

    Call it inside the caller's transaction (asyncpg: ``async with conn.transaction()``;
    SQLAlchemy: the session's or connection's transaction, begun here if none is): the
    mail is stored and the dispatchers are woken when that commits, and a rollback leaves
    nothing behind. One statement, one round trip. ``sender`` defaults to
    :func:`default_sender`; ``not_before`` delays the first attempt. ``priority`` orders
    the due mail: 0 (most urgent) to 9, 5 by default; ValueError for anything else.

    With ``key`` (1 to 200 characters of plain text, e.g. ``"welcome:42"``) the mail is
    stored once per key, ever: if the key was used before, nothing is stored and the
    result is that first mail, with ``existed=True``. An enqueue of a key that another
    transaction has just used and not yet committed waits for it, then returns its mail
    (or, if it rolled back, stores this one). Under REPEATABLE READ or SERIALIZABLE that
    wait ends in a serialization failure instead, to be retried as usual.

    The Message-ID is fixed here and kept across retries, so a duplicate delivery (only
    possible after a crash between the SMTP server's reply and recording it) carries the
    same Message-ID as the first copy.

    When an OpenTelemetry SDK records the current span, its trace context is stored with
    the mail, and the dispatcher's ``outbox.send`` span continues that trace.
    """
    message_id, params = _mail_params(mail, _sender(sender), not_before, priority)
    # The caller's trace continues in the dispatcher (NULL when the span is not recorded).
    trace_context = tracing.current_trace_context()
    if key is None:
        row = await _fetchrow(conn, queries.ENQUEUE, (*params, trace_context))
        assert row is not None
        return Enqueued(id=row["id"], message_id=message_id, created_at=row["created_at"])
    _check_key(key)
    # Twice at most: the key can vanish between the two statements only if `outbox prune
    # --keys-older-than` deletes it right then, and then it is free to be used again.
    for _ in range(2):
        row = await _fetchrow(conn, queries.ENQUEUE_KEYED, (*params, key, trace_context))
        if row is not None:
            return Enqueued(row["id"], message_id, row["created_at"], key=key)
        found = await _fetchrow(conn, queries.ENQUEUED_UNDER_KEY, (key,))
        if found is not None:
            return Enqueued(
                found["outbox_id"], found["message_id"], found["created_at"], key, existed=True
            )
    raise RuntimeError(f"the key {key!r} was taken and then pruned while enqueueing; retry")


@lru_cache(maxsize=64)
def _fused(write: str, write_params: int) -> str:
    numbers = {f"m{i}": write_params + i for i in range(1, 13)}
    return queries.ENQUEUE_WITH.format(write=write.strip().rstrip(";"), **numbers)


async def enqueue_with(
    conn: Connection,
    write: str,
    write_args: Sequence[object],
    mail: Mail,
    *,
    sender: Address | str | None = None,
    priority: int = DEFAULT_PRIORITY,
    not_before: datetime | None = None,
) -> tuple[Record, Enqueued] | None:
    """Run ``write`` and enqueue ``mail`` in one statement: the mail exists iff the row does.

    ``write`` is a constant single-row ``INSERT ... RETURNING ...`` of the caller's, with
    ``write_args`` as its parameters $1..$n. It is the same as running ``write`` and
    :func:`enqueue` in one transaction, in one round trip instead of three or four (no
    BEGIN and COMMIT needed: a statement is atomic on its own; inside the caller's
    transaction it joins it). Returns the written row (its RETURNING columns) and what was
    enqueued, or None when ``write`` stored nothing (``ON CONFLICT DO NOTHING``); an error
    of ``write`` (a unique violation, say) is raised as it is, with nothing stored.
    ``priority`` as in :func:`enqueue`.
    """
    message_id, params = _mail_params(mail, _sender(sender), not_before, priority)
    row = await conn.fetchrow(
        _fused(write, len(write_args)),
        *write_args,
        *params,
        tracing.current_trace_context(),
    )
    if row is None:
        return None
    queued = Enqueued(
        id=row["outbox_id"], message_id=message_id, created_at=row["outbox_created_at"]
    )
    return row, queued
