"""Idempotency keys of ``POST /register``: a retried registration gets the first answer.

A client that sends ``Idempotency-Key: <key>`` (1 to 255 printable ASCII characters, a
UUID say) and retries after a timeout or a dropped connection gets the original ``201``
body, with ``Idempotent-Replayed: true``, instead of a ``409`` for its own registration.
The key row is written in the same transaction as the user and the welcome mail (see
``api.registration``), so the three commit together or not at all, and two requests with
one key serialise on its primary key: however many repeats race, one user and one mail.

Keys are kept for :data:`TTL` (24 hours). A key past it is ignored when read (a repeat
then registers again, which for an existing user is the usual ``409``) and may be used
again; ``outbox prune`` deletes expired keys (:func:`prune_expired`).

Every statement on ``registration_keys`` is here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Final

from outbox.dispatcher.db import Connection

if TYPE_CHECKING:  # `outbox prune` imports this module without the api extra installed
    from starlette.datastructures import Headers

__all__ = [
    "HEADER",
    "MAX_LENGTH",
    "REPLAYED_HEADER",
    "TTL",
    "BadKey",
    "Stored",
    "find",
    "key_from",
    "prune_expired",
    "record",
    "request_hash",
]

#: The request header carrying the key.
HEADER: Final = "Idempotency-Key"
#: The response header that marks a replayed answer.
REPLAYED_HEADER: Final = "Idempotent-Replayed"
#: Longest key accepted.
MAX_LENGTH: Final = 255
#: How long a key is honoured after its registration committed.
TTL: Final = timedelta(hours=24)

# Store the key of a registration, in its transaction. A live key (a concurrent request
# with the same key committed first) stores nothing and returns no row: the caller rolls
# back and answers from that key. An expired one is taken over. A concurrent insert of the
# same key that has not committed yet makes this wait for its outcome (the primary key).
_RECORD = """
INSERT INTO registration_keys AS k
       (key, request_hash, user_id, outbox_id, response, expires_at)
VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6))
ON CONFLICT (key) DO UPDATE
SET request_hash = EXCLUDED.request_hash, user_id = EXCLUDED.user_id,
    outbox_id = EXCLUDED.outbox_id, response = EXCLUDED.response,
    created_at = EXCLUDED.created_at, expires_at = EXCLUDED.expires_at
WHERE k.expires_at <= now()
RETURNING true
"""

_FIND = """
SELECT request_hash, response FROM registration_keys WHERE key = $1 AND expires_at > now()
"""

# One batch of expired keys, oldest first, by registration_keys_expires_idx. Rows another
# transaction holds (a registration taking the key over) are skipped.
_PRUNE_CHUNK = """
WITH doomed AS (
    SELECT key FROM registration_keys
    WHERE expires_at <= now()
    ORDER BY expires_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
DELETE FROM registration_keys k USING doomed WHERE k.key = doomed.key
"""

_COUNT_EXPIRED = "SELECT count(*) FROM registration_keys WHERE expires_at <= now()"


class BadKey(ValueError):
    """An ``Idempotency-Key`` header that is not a usable key (the message says why)."""


@dataclass(frozen=True, slots=True)
class Stored:
    """What a live key holds: the hash of its request and the answer sent."""

    request_hash: bytes
    response: str


def key_from(headers: Headers) -> str | None:
    """The request's key, None without the header; :class:`BadKey` for a bad one."""
    values = headers.getlist(HEADER)
    if not values:
        return None
    if len(values) > 1:
        raise BadKey(f"give one {HEADER} header, not {len(values)}")
    key = values[0].strip(" \t")
    if not key:
        raise BadKey("must not be empty")
    if len(key) > MAX_LENGTH:
        raise BadKey(f"must be at most {MAX_LENGTH} characters long (a UUID is 36)")
    if not all(" " <= ch <= "~" for ch in key):
        raise BadKey("must be printable ASCII (letters, digits, punctuation, spaces)")
    return key


def request_hash(canonical: str) -> bytes:
    """SHA-256 of the validated request body (``Registration.model_dump_json()``)."""
    return hashlib.sha256(canonical.encode()).digest()


async def record(
    conn: Connection,
    key: str,
    hashed: bytes,
    user_id: int,
    outbox_id: int,
    response: str,
) -> bool:
    """Store the key with its answer, inside the registration's transaction.

    False when the key is live already (answered by someone else): roll back then.
    """
    stored = await conn.fetchval(
        _RECORD, key, hashed, user_id, outbox_id, response, TTL.total_seconds()
    )
    return stored is not None


async def find(conn: Connection, key: str) -> Stored | None:
    """The live key's request hash and stored answer, or None (unknown or expired)."""
    row = await conn.fetchrow(_FIND, key)
    if row is None:
        return None
    return Stored(request_hash=bytes(row["request_hash"]), response=row["response"])


async def prune_expired(conn: Connection, *, batch_size: int = 1000, dry_run: bool = False) -> int:
    """Delete the expired keys in batches (each its own transaction); how many went.

    With ``dry_run`` nothing is deleted and the count is of what would be.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if dry_run:
        count: int = await conn.fetchval(_COUNT_EXPIRED)
        return count
    total = 0
    while True:
        status = await conn.execute(_PRUNE_CHUNK, batch_size)
        deleted = int(status.rpartition(" ")[2])
        total += deleted
        if deleted < batch_size:
            return total
