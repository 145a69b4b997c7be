"""The public outbox API: put a mail in the outbox inside the caller's transaction.

This is the one way mail enters the outbox. Call :func:`enqueue` on the same connection,
inside the same transaction, as the business write it belongs to: the mail then exists
if and only if that write commits. The dispatcher delivers it afterwards.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from email.headerregistry import Address
from functools import lru_cache

from asyncpg import Record

from dispatcher import queries
from dispatcher.addresses import ascii_domain, smtp_address, unsafe_text
from dispatcher.db import Connection

__all__ = ["Enqueued", "Mail", "enqueue", "enqueue_with"]


@dataclass(frozen=True, slots=True)
class Mail:
    """A fully rendered email, ready to be stored and later sent as it is."""

    recipient: Address
    subject: str
    body_text: str
    body_html: str | None = None

    def __post_init__(self) -> None:
        # Header values must never carry a line break of any kind (CR, LF, U+2028, ...):
        # that is how header injection happens, and such a mail could never be rendered.
        for field, value in (
            ("subject", self.subject),
            ("recipient name", self.recipient.display_name),
            ("recipient", self.recipient.addr_spec),
        ):
            reason = unsafe_text(value)
            if reason is not None:
                raise ValueError(f"{field} {reason}")
        if not self.recipient.domain:
            raise ValueError("recipient must be a full address (user@domain)")
        smtp_address(self.recipient.addr_spec)  # the domain must have an ASCII form


@dataclass(frozen=True, slots=True)
class Enqueued:
    """What :func:`enqueue` stored: the outbox id and the stable Message-ID."""

    id: int
    message_id: str
    created_at: datetime


def _mail_params(
    mail: Mail, sender: Address, not_before: datetime | None
) -> tuple[str, tuple[object, ...]]:
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
    )


async def enqueue(
    conn: Connection,
    mail: Mail,
    *,
    sender: Address,
    not_before: datetime | None = None,
) -> Enqueued:
    """Store ``mail`` in the outbox on ``conn`` and notify the dispatchers at commit.

    Must be called inside the caller's transaction. The Message-ID is fixed here and kept
    across retries, so a duplicate delivery (only possible after a crash between the SMTP
    server's reply and recording it) carries the same Message-ID as the first copy.
    """
    message_id, params = _mail_params(mail, sender, not_before)
    row = await conn.fetchrow(queries.ENQUEUE, *params)
    assert row is not None
    return Enqueued(id=row["id"], message_id=message_id, created_at=row["created_at"])


@lru_cache(maxsize=64)
def _fused(write: str, write_params: int) -> str:
    numbers = {f"m{i}": write_params + i for i in range(1, 9)}
    return queries.ENQUEUE_WITH.format(write=write.strip().rstrip(";"), **numbers)


async def enqueue_with(
    conn: Connection,
    write: str,
    write_args: Sequence[object],
    mail: Mail,
    *,
    sender: Address,
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
    """
    message_id, params = _mail_params(mail, sender, not_before)
    row = await conn.fetchrow(_fused(write, len(write_args)), *write_args, *params)
    if row is None:
        return None
    queued = Enqueued(
        id=row["outbox_id"], message_id=message_id, created_at=row["outbox_created_at"]
    )
    return row, queued
