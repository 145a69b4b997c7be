"""Audit and operations on the outbox: status, list, show, explain, retry, cancel, prune.

The public, framework-free module behind ``outbox status|list|show|explain|retry|cancel|
prune`` and the admin HTTP endpoints; the operators' side of the sending policy is
:mod:`dispatcher.policies`. Every function takes an asyncpg connection (or one borrowed
from a pool) and returns frozen dataclasses. All SQL is parameterised.

Safety against running dispatchers: a dispatcher only ever changes a row in ``sending``,
guarded by its lease token, and only a claim moves a row into ``sending``. Every state
change here is one guarded ``UPDATE ... WHERE status IN (...)`` (or ``DELETE``) that
never matches a ``sending`` row whose lease is honoured, so it cannot race with a lease:
either the operator's change commits first (and the claim no longer sees a due row), or
the claim does (and the operator's guard no longer matches, which is reported as "not
retryable" or "not cancellable"). Cancelling a ``sending`` row whose dispatcher is gone
clears its lease token, so if that dispatcher was only frozen, what it records later
changes nothing.

Decisions (documented in docs/audit.md as well):

* **retry** puts ``failed`` rows, and ``cancelled`` or ``suppressed`` rows named by id
  (undoing a cancel; sending a suppressed mail once its address is off the list), back
  to ``pending``, due now, and wakes idle dispatchers with ``NOTIFY outbox_mail``.
  The ``attempts`` counter is kept, not reset: attempt numbers in ``outbox_attempts``
  stay unique and in order for the row, and the history rows are never touched. The
  retried row gets at least one fresh attempt; if that attempt fails transiently and the
  row is already past the dispatcher's retry limits, it goes back to ``failed`` (retry
  again once the cause is fixed). ``--all-failed`` retries only ``failed`` rows.
  ``--now`` also makes ``pending`` mail that waits for a later attempt due at once.
* **cancel** applies to ``pending`` and ``failed`` rows, and to a ``sending`` row whose
  dispatcher is gone (its lease expired, or it has not heartbeated for ``LIVE_SECONDS``),
  so a row that took its dispatcher down can be stopped without SQL. A ``sending`` row of
  a live dispatcher is being delivered right now and cannot be recalled.
* **prune** deletes ``sent`` and ``cancelled`` rows (and their attempts) older than a
  cutoff; ``failed`` rows only when asked (``include_failed``), because a failed row is
  an undelivered mail that an operator may still want to read or retry. ``pending`` and
  ``sending`` rows are never touched. A row is old when both its creation and its
  completion (``sent_at``, else ``updated_at``) are before the cutoff. Idempotency keys
  (``outbox_keys``) outlive their mail; they are pruned only with ``keys_older_than``, a
  window of their own at least as long as the mail's, and only once their mail is gone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Final, Literal

import asyncpg

from outbox.dispatcher.db import Connection
from outbox.dispatcher.message import build_message
from outbox.dispatcher.policies import (
    LIVE_SECONDS,
    Policy,
    Suppression,
    list_policies,
    mail_policies,
    rate_words,
    suppression_by_key,
)
from outbox.dispatcher.queries import NOTIFY_CHANNEL

__all__ = [
    "CANCELLABLE",
    "LIVE_SECONDS",
    "PRUNABLE",
    "RETRYABLE",
    "RETRYABLE_NOW",
    "STATUSES",
    "Attempt",
    "ChangeResult",
    "DispatcherInfo",
    "Explanation",
    "MailDetail",
    "MailRow",
    "Page",
    "PruneResult",
    "QueueCounts",
    "Refused",
    "Status",
    "StatusSummary",
    "cancel",
    "explain",
    "get",
    "hold_reasons",
    "list_mail",
    "prune",
    "queue_counts",
    "retry",
    "retry_all_failed",
    "rows_held",
    "sent_per_minute",
    "show",
    "status_summary",
]

Status = Literal["pending", "sending", "sent", "failed", "cancelled", "suppressed"]
STATUSES: Final[tuple[Status, ...]] = (
    "pending",
    "sending",
    "sent",
    "failed",
    "cancelled",
    "suppressed",
)
#: Statuses that ``retry`` moves back to pending when the ids are named.
RETRYABLE: Final[tuple[Status, ...]] = ("failed", "cancelled", "suppressed")
#: Statuses that ``retry(now=True)`` makes due at once.
RETRYABLE_NOW: Final[tuple[Status, ...]] = ("pending", "failed", "cancelled", "suppressed")
#: Statuses that ``cancel`` accepts.
CANCELLABLE: Final[tuple[Status, ...]] = ("pending", "failed")
#: Statuses that ``prune`` may delete (``failed`` only on request).
PRUNABLE: Final[tuple[Status, ...]] = ("sent", "cancelled", "failed")
#: Below this table size the ``sent`` count is exact; above, it is an estimate.
EXACT_COUNT_MAX_BYTES: Final = 32 * 1024 * 1024
#: Largest id PostgreSQL's bigint holds (ids beyond it cannot exist).
MAX_ID: Final = 2**63 - 1
#: The longest address ``list_mail`` filters by (RFC 5321 paths are shorter).
MAX_RECIPIENT_FILTER: Final = 320


# --- Results ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MailRow:
    """One outbox row without its body: what ``list`` shows."""

    id: int
    message_id: str
    sender: str
    recipient: str
    recipient_name: str
    subject: str
    status: Status
    attempts: int
    next_attempt_at: datetime
    lease_owner: str | None
    lease_expires_at: datetime | None
    last_error: str | None
    last_smtp_code: int | None
    created_at: datetime
    updated_at: datetime
    sent_at: datetime | None
    #: The idempotency key it was enqueued with (``enqueue(..., key=...)``), if any.
    idempotency_key: str | None = None


@dataclass(frozen=True, slots=True)
class Attempt:
    """One send attempt from ``outbox_attempts``."""

    attempt: int
    dispatcher: str
    started_at: datetime
    finished_at: datetime
    outcome: str
    smtp_code: int | None
    smtp_reply: str | None
    error: str | None
    lease_lost: bool
    #: The last SMTP step the attempt began (connect, mail, rcpt, data, end_of_data; render
    #: when the message could not be built); None for abandoned attempts.
    smtp_stage: str | None = None


@dataclass(frozen=True, slots=True)
class MailDetail:
    """One outbox row in full: the row, its body, every attempt and the rendered headers."""

    row: MailRow
    body_text: str
    body_html: str | None
    leased_at: datetime | None
    history: tuple[Attempt, ...]
    #: The headers of the MIME message exactly as the dispatcher sends it.
    headers: tuple[tuple[str, str], ...]
    #: Set when the row cannot be rendered (e.g. a sender edited by hand into garbage).
    render_error: str | None = None


@dataclass(frozen=True, slots=True)
class Page:
    """One page of ``list``: newest first; pass ``next_cursor`` as ``before`` for more."""

    items: tuple[MailRow, ...]
    #: The id to continue below, or None when this is the last page.
    next_cursor: int | None


@dataclass(frozen=True, slots=True)
class DispatcherInfo:
    """A row of the ``dispatchers`` table."""

    name: str
    hostname: str
    pid: int
    started_at: datetime
    last_beat_at: datetime
    live: bool
    #: Why it cannot reach its SMTP server (sending is paused), and since when.
    smtp_error: str | None = None
    smtp_unreachable_since: datetime | None = None


@dataclass(frozen=True, slots=True)
class QueueCounts:
    """Rows per status and the age of the oldest due pending mail (cheap to compute)."""

    counts: Mapping[str, int]
    #: True when ``counts["sent"]`` is an estimate (large tables, see :func:`queue_counts`).
    sent_estimated: bool
    #: Seconds since the oldest due pending mail became due; 0 when none is due.
    oldest_due_pending_seconds: float
    #: Number of pending mails that are due now.
    due_pending: int
    live_dispatchers: int


@dataclass(frozen=True, slots=True)
class StatusSummary:
    """What ``outbox status`` prints."""

    queue: QueueCounts
    dispatchers: tuple[DispatcherInfo, ...]
    #: Attempts of the last hour by outcome: failed (permanent), deferred, abandoned.
    failures_last_hour: Mapping[str, int]
    checked_at: datetime
    #: Every scope with a sending policy: limits, pauses, throttles (see ``outbox limit``).
    policies: tuple[Policy, ...] = ()


@dataclass(frozen=True, slots=True)
class Refused:
    """An id that retry/cancel did not change, and why."""

    id: int
    #: The row's status when the operation ran, or None if there is no such row.
    status: str | None
    reason: str


@dataclass(frozen=True, slots=True)
class ChangeResult:
    """Outcome of retry/cancel: the ids changed, and the ids refused with the reason."""

    changed: tuple[int, ...]
    refused: tuple[Refused, ...]


@dataclass(frozen=True, slots=True)
class PruneResult:
    """Progress or outcome of a prune (or what a dry run would delete)."""

    cutoff: datetime
    deleted: Mapping[str, int] = field(default_factory=dict)
    attempts_deleted: int = 0
    batches: int = 0
    dry_run: bool = False
    #: Idempotency keys made before this were deleted (None: keys were kept).
    keys_cutoff: datetime | None = None
    keys_deleted: int = 0

    @property
    def total(self) -> int:
        """Outbox rows deleted (or that would be)."""
        return sum(self.deleted.values())


# --- SQL ----------------------------------------------------------------------------------

_ROW_COLUMNS = """id, message_id, sender, recipient, recipient_name, subject, status, attempts,
       next_attempt_at, lease_owner, lease_expires_at, last_error, last_smtp_code,
       created_at, updated_at, sent_at, idempotency_key"""

# Counts per status. pending/sending come from the partial claim index (the live queue),
# failed/cancelled from the partial index of migration 0002: both stay small however large
# the history of sent mail grows. No partial index covers suppressed yet, so its count
# reads the table. The sent count is handled separately (see queue_counts).
# The oldest due pending mail is the first entry of outbox_claim_idx.
_QUEUE = f"""
SELECT (SELECT count(*) FROM outbox WHERE status = 'pending') AS pending,
       (SELECT count(*) FROM outbox WHERE status = 'sending') AS sending,
       (SELECT count(*) FROM outbox WHERE status = 'failed') AS failed,
       (SELECT count(*) FROM outbox WHERE status = 'cancelled') AS cancelled,
       (SELECT count(*) FROM outbox WHERE status = 'suppressed') AS suppressed,
       (SELECT count(*) FROM outbox
         WHERE status = 'pending' AND next_attempt_at <= now()) AS due_pending,
       (SELECT extract(epoch FROM now() - min(next_attempt_at)) FROM outbox
         WHERE status = 'pending' AND next_attempt_at <= now()) AS oldest_due_pending,
       (SELECT count(*) FROM dispatchers
         WHERE last_beat_at > now() - interval '{LIVE_SECONDS} seconds') AS live_dispatchers,
       pg_relation_size('outbox') AS table_bytes,
       (SELECT n_live_tup FROM pg_stat_user_tables
         WHERE relid = 'outbox'::regclass) AS live_tuples
"""

_COUNT_SENT = "SELECT count(*) FROM outbox WHERE status = 'sent'"

_DISPATCHERS = f"""
SELECT name, hostname, pid, started_at, last_beat_at,
       last_beat_at > now() - interval '{LIVE_SECONDS} seconds' AS live,
       smtp_error, smtp_unreachable_since
FROM dispatchers
ORDER BY name
"""

_FAILURES_LAST_HOUR = """
SELECT outcome, count(*) AS n
FROM outbox_attempts
WHERE finished_at > now() - interval '1 hour' AND outcome <> 'sent'
GROUP BY outcome
"""

_GET = f"SELECT {_ROW_COLUMNS}, body_text, body_html, leased_at FROM outbox WHERE id = $1"

_HISTORY = """
SELECT attempt, dispatcher, started_at, finished_at, outcome, smtp_code, smtp_reply, error,
       lease_lost, smtp_stage
FROM outbox_attempts
WHERE outbox_id = $1
ORDER BY attempt, id
"""

# Retry/cancel: one guarded UPDATE. The rows are locked in id order first, so two
# operators changing overlapping sets of ids at once cannot deadlock; a row a claim has
# just taken fails the guard once the claim commits. The final SELECT reads the snapshot
# the statement started with, so it reports each id's status before the change (the
# reason for a refusal). {guard} is checked on the locked row again, {history} may add
# attempts for the changed rows.
_CHANGE = """
WITH wanted AS (
    SELECT DISTINCT unnest($1::bigint[]) AS id
),
locked AS (
    SELECT id, status, attempts, lease_owner, leased_at FROM outbox
    WHERE id IN (SELECT id FROM wanted) AND ({guard})
    ORDER BY id
    FOR UPDATE
),
changed AS (
    UPDATE outbox
    SET {assignments}, updated_at = now()
    FROM locked
    WHERE outbox.id = locked.id AND ({guard})
    RETURNING outbox.id
){history}
SELECT w.id, o.status, o.lease_owner, c.id IS NOT NULL AS changed
FROM wanted w
LEFT JOIN outbox o ON o.id = w.id
LEFT JOIN changed c ON c.id = w.id
ORDER BY w.id
"""
_RETRY = _CHANGE.format(
    guard="outbox.status = ANY($2::text[])",
    assignments="status = 'pending', next_attempt_at = now()",
    history="",
)
# Retry with now: pending mail waiting for a later attempt becomes due at once too (a
# pending row already due keeps its place in the queue).
_RETRY_NOW = _CHANGE.format(
    guard="outbox.status = ANY($2::text[])",
    assignments="""status = 'pending', next_attempt_at = CASE
        WHEN outbox.status = 'pending' THEN least(outbox.next_attempt_at, now()) ELSE now()
    END""",
    history="",
)
# Cancel also takes a 'sending' row whose lease can no longer be honoured: it expired, or
# its dispatcher has not heartbeated for $3 seconds (killed, or stuck on this very row).
# Its lease is cleared, so a dispatcher that comes back records its outcome as lease_lost
# without changing the row, and the attempt it never finished is written as abandoned.
_CANCEL = _CHANGE.format(
    guard="""outbox.status = ANY($2::text[]) OR (
        outbox.status = 'sending' AND (
            outbox.lease_expires_at <= now()
            OR NOT EXISTS (
                SELECT 1 FROM dispatchers d
                WHERE d.name = outbox.lease_owner
                  AND d.last_beat_at > now() - make_interval(secs => $3)
            )
        )
    )""",
    assignments="""status = 'cancelled', lease_owner = NULL, lease_token = NULL,
        leased_at = NULL, lease_expires_at = NULL""",
    history=""",
history AS (
    INSERT INTO outbox_attempts (outbox_id, attempt, dispatcher, started_at, finished_at,
                                 outcome, error)
    SELECT l.id, l.attempts, l.lease_owner, l.leased_at, now(), 'abandoned',
           'no outcome recorded: cancelled after its dispatcher stopped'
    FROM locked l JOIN changed c ON c.id = l.id
    WHERE l.status = 'sending'
)""",
)

# Retry every failed row, a chunk at a time in id order (each row at most once per run,
# even if it fails again meanwhile). Uses outbox_failed_cancelled_idx.
_RETRY_FAILED_CHUNK = """
WITH chunk AS (
    SELECT id FROM outbox
    WHERE status = 'failed' AND id > $1
    ORDER BY status, id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE outbox o
SET status = 'pending', next_attempt_at = now(), updated_at = now()
FROM chunk
WHERE o.id = chunk.id AND o.status = 'failed'
RETURNING o.id
"""

_NOTIFY = "SELECT pg_notify($1, '')"

# Prune walks outbox_created_at_id_idx upwards from the keyset cursor ($1, $2) to the
# cutoff $3: each batch starts where the previous one stopped, so the rows it keeps
# (failed, pending, sending, or completed after the cutoff) are passed over once, and the
# entries of rows already deleted are never read again. Attempts go with their row
# (ON DELETE CASCADE); they are counted first.
_PRUNE_CUTOFF = "SELECT coalesce($1::timestamptz, now() - $2::interval)"

_PRUNE_MATCH = """
    created_at < $3 AND coalesce(sent_at, updated_at) < $3 AND status = ANY($4::text[])
"""

_PRUNE_CHUNK = f"""
WITH doomed AS (
    SELECT id, created_at FROM outbox
    WHERE (created_at, id) > ($1, $2) AND {_PRUNE_MATCH}
    ORDER BY created_at, id
    LIMIT $5
    FOR UPDATE SKIP LOCKED
),
gone AS (
    DELETE FROM outbox o
    USING doomed
    WHERE o.id = doomed.id AND o.status = ANY($4::text[])
    RETURNING o.id, o.status
),
last AS (
    SELECT created_at, id FROM doomed ORDER BY created_at DESC, id DESC LIMIT 1
)
SELECT (SELECT created_at FROM last) AS last_created_at,
       (SELECT id FROM last) AS last_id,
       (SELECT coalesce(array_agg(status), '{{}}') FROM gone) AS statuses,
       (SELECT count(*) FROM outbox_attempts a
         WHERE a.outbox_id IN (SELECT id FROM gone)) AS attempts
"""

_PRUNE_DRY_RUN = f"""
SELECT o.status, count(*) AS n, coalesce(sum(a.n), 0) AS attempts
FROM outbox o
CROSS JOIN LATERAL (SELECT count(*) AS n FROM outbox_attempts a WHERE a.outbox_id = o.id) a
WHERE {_PRUNE_MATCH.replace("$3", "$1").replace("$4", "$2")}
GROUP BY o.status
"""

# Idempotency keys outlive their mail: there is no foreign key between outbox_keys and
# outbox, so the mail prune above leaves them, and a repeat of a key still finds it. They
# go only when asked, before a cutoff of their own ($3), and only once their mail is gone
# (a key whose mail is still there, e.g. failed and kept, stays with it). Walks
# outbox_keys_created_at_idx from the keyset cursor ($1, $2), as the mail prune walks its
# index; a batch whose keys all stay still moves the cursor on.
_PRUNE_KEYS_CHUNK = """
WITH doomed AS (
    SELECT key, created_at, outbox_id FROM outbox_keys
    WHERE (created_at, outbox_id) > ($1, $2) AND created_at < $3
    ORDER BY created_at, outbox_id
    LIMIT $4
    FOR UPDATE SKIP LOCKED
),
gone AS (
    DELETE FROM outbox_keys k
    USING doomed
    WHERE k.key = doomed.key
      AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.id = doomed.outbox_id)
    RETURNING k.key
),
last AS (
    SELECT created_at, outbox_id FROM doomed ORDER BY created_at DESC, outbox_id DESC LIMIT 1
)
SELECT (SELECT created_at FROM last) AS last_created_at,
       (SELECT outbox_id FROM last) AS last_id,
       (SELECT count(*) FROM gone) AS deleted
"""

# Keys made before $1 whose mail is gone, or would go now (cutoff $2, statuses $3).
_PRUNE_KEYS_DRY_RUN = f"""
SELECT count(*) FROM outbox_keys k
WHERE k.created_at < $1
  AND NOT EXISTS (
        SELECT 1 FROM outbox o
        WHERE o.id = k.outbox_id
          AND NOT ({_PRUNE_MATCH.replace("$3", "$2").replace("$4", "$3")})
  )
"""


# --- Reading ------------------------------------------------------------------------------


def _mail_row(record: asyncpg.Record) -> MailRow:
    return MailRow(
        id=record["id"],
        message_id=record["message_id"],
        sender=record["sender"],
        recipient=record["recipient"],
        recipient_name=record["recipient_name"],
        subject=record["subject"],
        status=record["status"],
        attempts=record["attempts"],
        next_attempt_at=record["next_attempt_at"],
        lease_owner=record["lease_owner"],
        lease_expires_at=record["lease_expires_at"],
        last_error=record["last_error"],
        last_smtp_code=record["last_smtp_code"],
        created_at=record["created_at"],
        updated_at=record["updated_at"],
        sent_at=record["sent_at"],
        idempotency_key=record["idempotency_key"],
    )


async def queue_counts(conn: Connection, *, exact: bool = False) -> QueueCounts:
    """Rows per status, oldest due pending age and live dispatchers, cheaply.

    pending, sending, failed and cancelled are exact counts over partial indexes, so their
    cost follows the live queue and the problem rows, not the history. ``sent`` is the
    bulk of the table: it is counted exactly while the table is under 32 MiB (a few
    thousand rows; a sub-millisecond-to-milliseconds scan) or when ``exact`` is true, and
    otherwise estimated as PostgreSQL's running live-row count of the table
    (``pg_stat_user_tables.n_live_tup``, updated at every commit, no ANALYZE needed) minus
    the exact counts of the other statuses.
    """
    record = await conn.fetchrow(_QUEUE)
    assert record is not None
    counts: dict[str, int] = {s: int(record[s]) for s in STATUSES if s != "sent"}
    estimated = False
    if exact or record["table_bytes"] <= EXACT_COUNT_MAX_BYTES or record["live_tuples"] is None:
        sent = await conn.fetchval(_COUNT_SENT)
        counts["sent"] = int(sent)
    else:
        counts["sent"] = max(0, int(record["live_tuples"]) - sum(counts.values()))
        estimated = True
    oldest = record["oldest_due_pending"]
    return QueueCounts(
        counts={status: counts[status] for status in STATUSES},
        sent_estimated=estimated,
        oldest_due_pending_seconds=max(0.0, float(oldest)) if oldest is not None else 0.0,
        due_pending=int(record["due_pending"]),
        live_dispatchers=int(record["live_dispatchers"]),
    )


async def status_summary(conn: Connection, *, exact: bool = False) -> StatusSummary:
    """Counts per status, oldest due pending age, dispatchers, failures in the last hour,
    and the sending policies."""
    queue = await queue_counts(conn, exact=exact)
    dispatchers = tuple(
        DispatcherInfo(
            name=r["name"],
            hostname=r["hostname"],
            pid=r["pid"],
            started_at=r["started_at"],
            last_beat_at=r["last_beat_at"],
            live=r["live"],
            smtp_error=r["smtp_error"],
            smtp_unreachable_since=r["smtp_unreachable_since"],
        )
        for r in await conn.fetch(_DISPATCHERS)
    )
    failures = {r["outcome"]: int(r["n"]) for r in await conn.fetch(_FAILURES_LAST_HOUR)}
    policies = await list_policies(conn)
    checked_at = await conn.fetchval("SELECT now()")
    return StatusSummary(
        queue=queue,
        dispatchers=dispatchers,
        failures_last_hour={
            k: failures.get(k, 0) for k in ("failed", "deferred", "unknown", "abandoned")
        },
        checked_at=checked_at,
        policies=policies,
    )


# Sent mail per minute over the last ``$1`` whole minutes and the current one, oldest
# first, zeros included. The attempts are counted per minute first, then joined to the
# series of minutes (a range join per minute would read the attempts once per minute).
_SENT_PER_MINUTE = """
WITH sent AS (
    SELECT date_trunc('minute', finished_at) AS minute, count(*) AS n
    FROM outbox_attempts
    WHERE outcome = 'sent'
      AND finished_at >= date_trunc('minute', now()) - make_interval(mins => $1)
    GROUP BY 1
)
SELECT m.minute, coalesce(s.n, 0) AS n
FROM generate_series(date_trunc('minute', now()) - make_interval(mins => $1),
                     date_trunc('minute', now()), interval '1 minute') AS m(minute)
LEFT JOIN sent s USING (minute)
ORDER BY m.minute
"""

# Rows each dispatcher holds under a lease (in the claim index: small).
_HELD = """
SELECT lease_owner, count(*) AS n FROM outbox
WHERE status = 'sending' AND lease_owner IS NOT NULL
GROUP BY lease_owner
"""


async def sent_per_minute(
    conn: Connection, *, minutes: int = 60
) -> tuple[tuple[datetime, int], ...]:
    """Mail sent in each of the last ``minutes`` minutes (the current one last, still
    counting), as (start of the minute, count), from ``outbox_attempts``."""
    if not 1 <= minutes <= 24 * 60:
        raise ValueError("minutes must be between 1 and 1440")
    records = await conn.fetch(_SENT_PER_MINUTE, minutes - 1)
    return tuple((r["minute"], int(r["n"])) for r in records)


async def rows_held(conn: Connection) -> Mapping[str, int]:
    """How many rows each dispatcher holds under a lease (status ``sending``), by name."""
    return {r["lease_owner"]: int(r["n"]) for r in await conn.fetch(_HELD)}


async def list_mail(
    conn: Connection,
    *,
    status: Status | None = None,
    recipient: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    before: int | None = None,
    limit: int = 50,
    key: str | None = None,
) -> Page:
    """Outbox rows, newest first, filtered; keyset pagination on id.

    ``recipient`` matches the whole address, case-insensitively; ``key`` the idempotency
    key exactly (the one mail it made, if that is still there). ``since`` is inclusive,
    ``until`` exclusive (on ``created_at``). ``before`` is the cursor: only rows with a
    smaller id (pass the previous page's ``next_cursor``).
    """
    if not 1 <= limit <= 10_000:
        raise ValueError("limit must be between 1 and 10000")
    if status is not None and status not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(STATUSES)}")
    # The WHERE clause is assembled from fixed fragments; values are always parameters.
    # (A fixed "$1 IS NULL OR ..." statement would defeat the indexes under a generic plan.)
    conditions: list[str] = []
    values: list[object] = []

    def add(fragment: str, value: object) -> None:
        values.append(value)
        conditions.append(fragment.format(f"${len(values)}"))

    if status is not None:
        add("status = {}", status)
    if recipient is not None:
        add("lower(recipient) = lower({})", recipient)
    if since is not None:
        add("created_at >= {}", since)
    if until is not None:
        add("created_at < {}", until)
    if before is not None:
        add("id < {}", before)
    if key is not None:
        # outbox_keys' primary key names the mail: two index lookups, however large.
        add("id = (SELECT outbox_id FROM outbox_keys WHERE key = {})", key)
    where = " AND ".join(conditions) or "true"
    values.append(limit + 1)
    records = await conn.fetch(
        f"SELECT {_ROW_COLUMNS} FROM outbox WHERE {where} ORDER BY id DESC LIMIT ${len(values)}",
        *values,
    )
    items = tuple(_mail_row(r) for r in records[:limit])
    more = len(records) > limit
    return Page(items=items, next_cursor=items[-1].id if more else None)


async def get(conn: Connection, outbox_id: int) -> MailRow | None:
    """One row without body and history, or None."""
    if not 1 <= outbox_id <= MAX_ID:
        return None
    record = await conn.fetchrow(_GET, outbox_id)
    return _mail_row(record) if record is not None else None


async def show(conn: Connection, outbox_id: int) -> MailDetail | None:
    """The row, its body, every attempt and the rendered headers; None if there is none."""
    if not 1 <= outbox_id <= MAX_ID:
        return None
    record = await conn.fetchrow(_GET, outbox_id)
    if record is None:
        return None
    history = tuple(
        Attempt(
            attempt=r["attempt"],
            dispatcher=r["dispatcher"],
            started_at=r["started_at"],
            finished_at=r["finished_at"],
            outcome=r["outcome"],
            smtp_code=r["smtp_code"],
            smtp_reply=r["smtp_reply"],
            error=r["error"],
            lease_lost=r["lease_lost"],
            smtp_stage=r["smtp_stage"],
        )
        for r in await conn.fetch(_HISTORY, outbox_id)
    )
    headers: tuple[tuple[str, str], ...] = ()
    render_error = None
    try:
        # As written on the wire (encoded-words stay encoded), unfolded to one line each.
        headers = tuple(
            (name, value.replace("\r\n", "")) for name, value in build_message(record).headers
        )
    except (ValueError, TypeError) as exc:
        render_error = str(exc)
    return MailDetail(
        row=_mail_row(record),
        body_text=record["body_text"],
        body_html=record["body_html"],
        leased_at=record["leased_at"],
        history=history,
        headers=headers,
        render_error=render_error,
    )


# --- Explaining ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Explanation:
    """Why a mail has not gone yet (or when and how it went), in plain words."""

    outbox_id: int
    status: str
    #: One sentence: where the mail stands.
    summary: str
    #: The plain-words lines behind the summary, most important first.
    reasons: tuple[str, ...]
    #: When the next attempt is due (pending mail only).
    next_attempt_at: datetime | None
    #: The dispatcher holding its lease (sending mail only).
    lease_owner: str | None
    #: Whether that dispatcher still heartbeats (None: no lease).
    owner_alive: bool | None
    #: The last SMTP reply (code and text) or error, and how far the dialogue got.
    last_reply: str | None


async def hold_reasons(conn: Connection, row: MailRow) -> tuple[str, ...]:
    """Why the operator's controls hold this mail back now, one plain line each.

    A pause of all mail or of its domain (``outbox pause``), its recipient on the
    suppression list (``outbox suppress``), and the sending limits of all mail and of its
    domain (``outbox limit``) when they bind now: the concurrency limit reached, a rate
    window used up, the adaptive throttle slowing the scope down. :func:`explain` puts
    these first (and the first in its summary) for mail that is due. Read in one snapshot
    (the caller's, if it has one).
    """
    found = await mail_policies(conn, row.id)
    if found is None:
        return ()
    scopes, entry = found
    holds: list[str] = []
    for p in scopes:
        if p.paused:
            release = "outbox resume" + (f" --domain {p.domain}" if p.domain else "")
            holds.append(f"{_scope_words(p)} is paused by an operator ({release} releases it)")
    if entry is not None:
        holds.append(
            f"Its recipient is on the suppression list since {_at(entry.created_at)} "
            f"({_suppression_words(entry)}), so a dispatcher marks it "
            "suppressed instead of sending it"
        )
    for p in scopes:
        if p.concurrency is not None and p.in_flight >= p.concurrency:
            holds.append(
                f"{_scope_words(p)} is at its concurrency limit ({p.in_flight:,} being "
                f"sent, at most {p.concurrency:,} at once)"
            )
    for p in scopes:
        for window in p.rates:
            if window.tokens < 1:
                wait = (1 - window.tokens) / window.per_second
                holds.append(
                    f"{_scope_words(p)} has used up its rate of {window.rate} (the next "
                    f"mail may go {_soon(wait)})"
                )
    for p in scopes:
        if p.throttle is not None:
            holds.append(
                f"{_scope_words(p)} is slowed down by the adaptive throttle since "
                f"{_at(p.throttle.since)}, after temporary refusals of the SMTP server (now "
                f"{rate_words(p.throttle.rate)}, halved from {rate_words(p.throttle.base)})"
            )
    return tuple(holds)


def _scope_words(p: Policy) -> str:
    return "All mail" if p.domain is None else f"Mail to {p.domain}"


def _suppression_words(entry: Suppression) -> str:
    reason = " ".join(entry.reason.split())  # a server's reply may span lines
    if entry.source == "smtp":
        mail = f" (mail {entry.outbox_id})" if entry.outbox_id is not None else ""
        return f"the SMTP server refused it permanently{mail}: {reason}"
    return f"added by an operator: {reason}"


def _soon(seconds: float) -> str:
    return "within a second" if seconds < 1 else f"in {_duration(seconds)}"


#: How far an SMTP dialogue got (``outbox_attempts.smtp_stage``), in words.
_STAGE_WORDS: Final = {
    "render": "while building the message",
    "connect": "while connecting to the SMTP server",
    "mail": "at MAIL FROM",
    "rcpt": "at RCPT TO",
    "data": "at DATA",
    "end_of_data": "at the end of the message",
}
#: Most mails counted as due ahead of one (an explanation stays cheap in a large backlog).
_AHEAD_MAX: Final = 10_000

# The row, its lease holder's heartbeat, and the due mail ahead of it in the claim order
# (outbox_claim_idx; counted only for due pending mail, and at most _AHEAD_MAX + 1).
_EXPLAIN_ROW = f"""
SELECT {_ROW_COLUMNS}, o.abandons, o.leased_at, o.recipient_key, now() AS now,
       d.name IS NOT NULL AS owner_registered,
       d.last_beat_at > now() - interval '{LIVE_SECONDS} seconds' AS owner_alive,
       extract(epoch FROM now() - d.last_beat_at) AS owner_silent_for,
       d.smtp_error AS owner_smtp_error,
       CASE WHEN o.status = 'pending' AND o.next_attempt_at <= now() THEN (
           SELECT count(*) FROM (
               SELECT 1 FROM outbox q
               WHERE q.status = 'pending' AND q.next_attempt_at < o.next_attempt_at
               LIMIT {_AHEAD_MAX + 1}
           ) ahead
       ) END AS due_ahead
FROM outbox o
LEFT JOIN dispatchers d ON d.name = o.lease_owner
WHERE o.id = $1
"""

# The latest attempt, and how many attempts may have been delivered without a 250 on
# record (the reply never came, or the dispatcher vanished mid-attempt).
_EXPLAIN_ATTEMPTS = """
SELECT last.*, counts.unknown, counts.abandoned
FROM (
    SELECT count(*) FILTER (WHERE outcome = 'unknown') AS unknown,
           count(*) FILTER (WHERE outcome = 'abandoned') AS abandoned
    FROM outbox_attempts WHERE outbox_id = $1
) counts
LEFT JOIN LATERAL (
    SELECT attempt, dispatcher, finished_at, outcome, smtp_code, smtp_reply, error,
           lease_lost, smtp_stage
    FROM outbox_attempts WHERE outbox_id = $1
    ORDER BY attempt DESC, id DESC
    LIMIT 1
) last ON true
"""

_EXPLAIN_FLEET = f"""
SELECT name, smtp_error, smtp_unreachable_since FROM dispatchers
WHERE last_beat_at > now() - interval '{LIVE_SECONDS} seconds'
ORDER BY name
"""


@dataclass(frozen=True, slots=True)
class _Facts:
    """Everything an explanation is made from, read in one snapshot."""

    row: MailRow
    record: asyncpg.Record
    attempts: asyncpg.Record
    #: Live dispatchers: (name, SMTP error or None, unreachable since).
    fleet: tuple[tuple[str, str | None, datetime | None], ...]
    holds: tuple[str, ...]
    now: datetime
    max_attempts: int
    max_age: float
    #: The suppression list's entry for the recipient (suppressed mail only).
    suppression: Suppression | None = None


async def explain(
    conn: Connection,
    outbox_id: int,
    *,
    max_attempts: int | None = None,
    max_age: float | None = None,
) -> Explanation | None:
    """Why mail ``outbox_id`` has not gone yet, or when and how it went; None if none.

    Its state and next attempt, who holds its lease and whether that dispatcher is alive,
    the last reply and how far the SMTP dialogue got, the attempts used against the retry
    limits, whether any dispatcher is running and whether they can reach the SMTP server,
    and, for mail that went, when and why. ``max_attempts`` and ``max_age`` are the
    dispatchers' retry limits (``DISPATCHER_MAX_ATTEMPTS``, ``DISPATCHER_MAX_AGE``; their
    defaults when not given). Read-only, in one snapshot.
    """
    if not 1 <= outbox_id <= MAX_ID:
        return None
    async with _snapshot(conn):
        record, attempts, fleet = await _read_explain(conn, outbox_id)
        if record is None:
            return None
        row = _mail_row(record)
        holds = await hold_reasons(conn, row) if row.status == "pending" else ()
        entry = None
        if row.status == "suppressed":
            entry = await suppression_by_key(conn, record["recipient_key"])
    if max_attempts is None or max_age is None:
        from outbox.dispatcher.settings import Settings  # the dispatchers' defaults

        fields = Settings.model_fields
        if max_attempts is None:
            max_attempts = int(fields["dispatcher_max_attempts"].default)
        if max_age is None:
            max_age = float(fields["dispatcher_max_age"].default)
    facts = _Facts(
        row=row,
        record=record,
        attempts=attempts,
        fleet=tuple((r["name"], r["smtp_error"], r["smtp_unreachable_since"]) for r in fleet),
        holds=holds,
        now=record["now"],
        max_attempts=max_attempts,
        max_age=max_age,
        suppression=entry,
    )
    return _explanation(facts)


async def _read_explain(
    conn: Connection, outbox_id: int
) -> tuple[asyncpg.Record | None, asyncpg.Record, list[asyncpg.Record]]:
    record = await conn.fetchrow(_EXPLAIN_ROW, outbox_id)
    attempts = await conn.fetchrow(_EXPLAIN_ATTEMPTS, outbox_id)
    assert attempts is not None
    fleet = await conn.fetch(_EXPLAIN_FLEET) if record is not None else []
    return record, attempts, fleet


def _snapshot(conn: Connection) -> contextlib.AbstractAsyncContextManager[object]:
    """One read-only snapshot for several statements (the caller's, if it has one)."""
    if conn.is_in_transaction():
        return contextlib.nullcontext()
    return conn.transaction(isolation="repeatable_read", readonly=True)


def _explanation(f: _Facts) -> Explanation:
    row = f.row
    if row.status == "pending":
        summary, reasons = _explain_pending(f)
    elif row.status == "sending":
        summary, reasons = _explain_sending(f)
    elif row.status == "sent":
        summary, reasons = _explain_sent(f)
    elif row.status == "failed":
        summary, reasons = _explain_failed(f)
    elif row.status == "cancelled":
        summary, reasons = _explain_cancelled(f)
    elif row.status == "suppressed":
        summary, reasons = _explain_suppressed(f)
    else:  # a status added after this code was written
        summary, reasons = f"Mail {row.id} is {row.status}.", []
    owner_alive = None
    if row.lease_owner is not None:
        owner_alive = bool(f.record["owner_alive"])
    return Explanation(
        outbox_id=row.id,
        status=row.status,
        summary=summary,
        reasons=tuple(reasons),
        next_attempt_at=row.next_attempt_at if row.status == "pending" else None,
        lease_owner=row.lease_owner,
        owner_alive=owner_alive,
        last_reply=_last_reply(f),
    )


def _explain_pending(f: _Facts) -> tuple[str, list[str]]:
    row = f.row
    wait = (row.next_attempt_at - f.now).total_seconds()
    due = wait <= 0
    live = len(f.fleet)
    unreachable = [(name, error, since) for name, error, since in f.fleet if error is not None]
    reasons: list[str] = []
    if due:
        reasons.extend(_sentence(hold) for hold in f.holds)
        late = f" for {_duration(-wait)}" if -wait >= 1 else ""
        reasons.append(f"Pending: due now{late}.")
    elif row.attempts == 0:
        reasons.append(
            f"Pending: scheduled for its first attempt at {_at(row.next_attempt_at)} ({_in(wait)})."
        )
    else:
        reasons.append(f"Pending: next attempt {_in(wait)}, at {_at(row.next_attempt_at)}.")
    reasons.extend(_last_attempt_lines(f))
    reasons.append(_attempts_line(f))
    ahead = f.record["due_ahead"]
    if due and ahead:
        if ahead > _AHEAD_MAX:
            reasons.append(f"More than {_AHEAD_MAX:,} due mails are ahead of it in the queue.")
        else:
            verb = "mail is" if ahead == 1 else "mails are"
            reasons.append(f"{ahead:,} due {verb} ahead of it in the queue.")
    reasons.extend(_fleet_lines(f))

    if due and f.holds:
        summary = f"Mail {row.id} is due but held back: {_sentence(f.holds[0])}"
    elif due and live == 0:
        summary = f"Mail {row.id} is due, but no dispatcher is running to send it."
    elif due and len(unreachable) == live:
        summary = f"Mail {row.id} is due, but sending is paused: the SMTP server cannot be reached."
    elif due and f.attempts["outcome"] == "unknown":
        summary = (
            f"Mail {row.id} may have been delivered (the reply to its last attempt never "
            "came); it is due to be sent again, with the same Message-ID."
        )
    elif due:
        summary = f"Mail {row.id} is due now and goes with the next claim of a dispatcher."
    elif row.attempts == 0:
        summary = f"Mail {row.id} is scheduled: its first attempt is {_in(wait)}."
    elif f.attempts["outcome"] == "unknown":
        summary = (
            f"Mail {row.id} may have been delivered (the reply to its last attempt never "
            f"came); it is sent again {_in(wait)}, with the same Message-ID."
        )
    else:
        summary = (
            f"Mail {row.id} has not gone yet: {_tries(row.attempts)} failed for now, "
            f"and the next one is {_in(wait)}."
        )
    return summary, reasons


def _explain_sending(f: _Facts) -> tuple[str, list[str]]:
    row, record = f.row, f.record
    owner = row.lease_owner or "?"
    alive = bool(record["owner_alive"])
    expired = row.lease_expires_at is not None and row.lease_expires_at <= f.now
    claimed = ""
    if record["leased_at"] is not None:
        claimed = f", claimed {_ago((f.now - record['leased_at']).total_seconds())}"
    reasons = [f"Sending: attempt {row.attempts}, by dispatcher {owner}{claimed}."]
    if not record["owner_registered"]:
        heartbeat = f"Dispatcher {owner} is gone: it is no longer registered."
    else:
        silent = _ago(float(record["owner_silent_for"]))
        state = "alive" if alive else "gone"
        heartbeat = f"Dispatcher {owner} is {state}: its last heartbeat was {silent}."
    reasons.append(heartbeat)
    if row.lease_expires_at is not None:
        left = (row.lease_expires_at - f.now).total_seconds()
        when = f"expired {_ago(-left)}" if expired else f"runs out {_in(left)}"
        reasons.append(f"Its lease {when}, at {_at(row.lease_expires_at)}.")
    if alive and not expired:
        if record["owner_smtp_error"] is not None:
            reasons.append(
                f"Dispatcher {owner} reports the SMTP server unreachable "
                f"({record['owner_smtp_error']}): it hands the mail back without using "
                "up an attempt."
            )
        reasons.extend(_last_attempt_lines(f))
        reasons.append(_attempts_line(f))
        summary = (
            f"Mail {row.id} is being sent right now by dispatcher {owner} (attempt {row.attempts})."
        )
        return summary, reasons
    cause = f"dispatcher {owner} is gone" if not alive else "its lease expired"
    reasons.append(
        "It will be taken over by the next claim (the unfinished attempt is written as "
        f"abandoned; if it got far enough it may have been delivered), or it can be "
        f"cancelled: outbox cancel {row.id}."
    )
    reasons.extend(_last_attempt_lines(f))
    reasons.append(_attempts_line(f))
    reasons.extend(_fleet_lines(f))
    if not f.fleet:
        summary = f"Mail {row.id} is stuck: {cause}, and no dispatcher is running to take it over."
    else:
        summary = f"Mail {row.id} is stuck: {cause}; the next claim will take it over."
    return summary, reasons


def _explain_sent(f: _Facts) -> tuple[str, list[str]]:
    row = f.row
    sent_at = row.sent_at or row.updated_at
    reply = _last_reply(f)
    reasons = [
        f"Sent: the SMTP server accepted it at {_at(sent_at)} "
        f"({_ago((f.now - sent_at).total_seconds())})" + (f": {reply}." if reply else "."),
        f"Attempts: {row.attempts}.",
    ]
    maybe = int(f.attempts["unknown"]) + int(f.attempts["abandoned"])
    if maybe:
        reasons.append(
            f"{_tries(maybe).capitalize()} before it ended without a reply on record, so "
            "the recipient may have more than one copy (all with the same Message-ID)."
        )
    summary = f"Mail {row.id} was sent {_ago((f.now - sent_at).total_seconds())}"
    summary += f", on attempt {row.attempts}." if row.attempts else "."
    return summary, reasons


def _explain_failed(f: _Facts) -> tuple[str, list[str]]:
    row, last = f.row, f.attempts
    error = _last_error_text(row) or "no reason recorded"
    why: str
    if last["outcome"] == "failed" and last["smtp_stage"] == "render":
        why = "the message could not be built, so no server could take it"
    elif row.last_error is not None and row.last_error.startswith("gave up after"):
        why = "the retry limits ran out"
    elif row.last_error is not None and row.last_error.startswith("abandoned"):
        why = (
            "every dispatcher that took it stopped before recording an outcome, so it was "
            "taken out of the queue"
        )
    elif row.last_smtp_code is not None and row.last_smtp_code >= 500:
        why = "the SMTP server refused it permanently"
    else:
        why = "it could not be delivered"
    reasons = [f"Failed at {_at(row.updated_at)}: {why}: {error}."]
    reasons.extend(_last_attempt_lines(f))
    reasons.append(f"Attempts: {row.attempts}.")
    reasons.append(f"Once the cause is fixed it can be sent again: outbox retry {row.id}.")
    summary = (
        f"Mail {row.id} failed for good {_ago((f.now - row.updated_at).total_seconds())}: {error}."
    )
    return summary, reasons


def _explain_cancelled(f: _Facts) -> tuple[str, list[str]]:
    row = f.row
    ago = _ago((f.now - row.updated_at).total_seconds())
    reasons = [
        f"Cancelled by an operator at {_at(row.updated_at)} ({ago}); it will not be sent.",
        *_last_attempt_lines(f),
        f"Attempts: {row.attempts}.",
        f"Retrying it undoes the cancel: outbox retry {row.id}.",
    ]
    return f"Mail {row.id} was cancelled {ago} and will not be sent.", reasons


def _explain_suppressed(f: _Facts) -> tuple[str, list[str]]:
    row, entry = f.row, f.suppression
    ago = _ago((f.now - row.updated_at).total_seconds())
    reasons = [
        f"Suppressed at {_at(row.updated_at)} ({ago}): its recipient is on the suppression "
        "list, so it was not sent."
    ]
    if entry is not None:
        reasons.append(
            f"{entry.address} is on the list since {_at(entry.created_at)}: "
            f"{_sentence(_suppression_words(entry))}"
        )
        reasons.append(
            f"To send it anyway: outbox unsuppress {entry.address}, then outbox retry {row.id}."
        )
    else:
        reasons.append(
            f"Its recipient is no longer on the suppression list: outbox retry {row.id} sends it."
        )
    if f.attempts["outcome"] != "suppressed":
        reasons.extend(_last_attempt_lines(f))
    reasons.append(f"Attempts: {row.attempts}.")
    summary = (
        f"Mail {row.id} was suppressed {ago} and will not be sent: its recipient is on the "
        "suppression list."
    )
    return summary, reasons


def _last_attempt_lines(f: _Facts) -> list[str]:
    last = f.attempts
    if last["attempt"] is None:
        return []
    ago = _ago((f.now - last["finished_at"]).total_seconds())
    by = f"attempt {last['attempt']}, {ago}, dispatcher {last['dispatcher']}"
    lost = " (recorded after its lease was lost)" if last["lease_lost"] else ""
    if last["outcome"] == "abandoned":
        return [
            f"Last attempt ({by}) was abandoned: the dispatcher stopped before recording an "
            "outcome, so it may have been delivered."
        ]
    if last["outcome"] == "unknown":
        return [
            f"Last attempt ({by}){lost} ended without a reply: {_reply_words(last)}. Its "
            "outcome is unknown: the server had the whole message, so it may have been "
            "delivered; the next attempt sends it with the same Message-ID."
        ]
    return [f"Last reply ({by}){lost}: {_reply_words(last)}."]


def _attempts_line(f: _Facts) -> str:
    """The attempts used against the dispatchers' retry limits (transient failures)."""
    row = f.row
    used = (
        f"none yet, of at most {f.max_attempts}"
        if row.attempts == 0
        else f"{row.attempts} of at most {f.max_attempts} used"
    )
    give_up = row.created_at + timedelta(seconds=f.max_age)
    if give_up <= f.now:
        return (
            f"Attempts: {used}; it is older than the age limit ({_duration(f.max_age)}), "
            "so if the next attempt fails, the mail fails for good."
        )
    left = f.max_attempts - row.attempts
    if left <= 1:
        return (
            f"Attempts: {used}; the next attempt is the last: if it fails too, the mail "
            "fails for good."
        )
    until = f"{_at(give_up)} at the latest ({_duration(f.max_age)} after it was queued)"
    if row.attempts == 0:
        return f"Attempts: {used}; a mail that keeps failing is retried until {until}."
    return f"Attempts: {used}; it fails for good after {left} more failed attempts, or at {until}."


def _fleet_lines(f: _Facts) -> list[str]:
    live = len(f.fleet)
    if live == 0:
        return [
            f"No dispatcher is running (none has heartbeated in the last {LIVE_SECONDS} "
            "seconds): nothing is sent until one starts (outbox dispatcher)."
        ]
    unreachable = [(name, error, since) for name, error, since in f.fleet if error is not None]
    if not unreachable:
        return [f"{live} {'dispatcher is' if live == 1 else 'dispatchers are'} running."]
    lines = []
    if len(unreachable) == live:
        lines.append(
            "Sending is paused: every running dispatcher reports the SMTP server unreachable."
        )
    else:
        lines.append(
            f"{len(unreachable)} of {live} running dispatchers report the SMTP server "
            "unreachable; the others send."
        )
    for name, error, since in unreachable:
        when = f" since {_at(since)}" if since is not None else ""
        lines.append(f"Dispatcher {name}: SMTP server unreachable{when}: {error}.")
    return lines


def _reply_words(last: asyncpg.Record) -> str:
    """A recorded attempt's reply (code and text) or error, and how far it got."""
    parts = [str(p) for p in (last["smtp_code"], last["smtp_reply"]) if p is not None]
    text = " ".join(parts) if parts else None
    if last["error"] is not None and (text is None or last["error"] != last["smtp_reply"]):
        text = f"{text}: {last['error']}" if text else last["error"]
    stage = _STAGE_WORDS.get(last["smtp_stage"] or "")
    text = text or "no reply"
    return f"{text} ({stage})" if stage else text


def _last_reply(f: _Facts) -> str | None:
    if f.attempts["attempt"] is not None:
        return _reply_words(f.attempts)
    return _last_error_text(f.row) if f.row.status != "sent" else None


def _last_error_text(row: MailRow) -> str | None:
    """The row's last failure: its SMTP code and error (the code once)."""
    code, error = row.last_smtp_code, row.last_error
    if code is None or (error is not None and str(code) in error):
        return error
    return f"{code} {error}" if error is not None else str(code)


def _sentence(text: str) -> str:
    text = text.rstrip()
    return text if text.endswith(".") else text + "."


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _tries(n: int) -> str:
    return "one attempt" if n == 1 else f"{n} attempts"


def _duration(seconds: float) -> str:
    """``12 seconds``, ``5 minutes``, ``3 hours``, ``4 days``: rounded to one unit."""
    seconds = max(0.0, seconds)
    if seconds < 59.5:
        return _plural(round(seconds), "second")
    if seconds < 59.5 * 60:
        return _plural(round(seconds / 60), "minute")
    if seconds < 47.5 * 3600:
        return _plural(round(seconds / 3600), "hour")
    return _plural(round(seconds / 86400), "day")


def _in(seconds: float) -> str:
    return "now" if seconds < 1 else f"in {_duration(seconds)}"


def _ago(seconds: float) -> str:
    return "just now" if seconds < 1 else f"{_duration(seconds)} ago"


def _at(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


# --- Changing -----------------------------------------------------------------------------

_RETRY_REASONS = {
    "pending": "already pending: it is queued and will be sent",
    "sending": "being sent right now; wait for the outcome",
    "sent": "already sent",
}
_CANCEL_REASONS = {
    "sending": "being sent right now and cannot be recalled; wait for the outcome",
    "sent": "already sent",
    "cancelled": "already cancelled",
}


def _check_ids(ids: Sequence[int]) -> list[int]:
    if not ids:
        raise ValueError("no ids given")
    out_of_range = [i for i in ids if not 1 <= i <= MAX_ID]
    if out_of_range:
        raise ValueError(f"ids must be between 1 and {MAX_ID}, got {out_of_range[0]}")
    return list(ids)


async def _change(
    conn: Connection,
    statement: str,
    ids: Sequence[int],
    allowed: Sequence[str],
    reasons: Mapping[str, str],
    *args: object,
    notify: bool,
) -> ChangeResult:
    changed: list[int] = []
    refused: list[Refused] = []
    async with conn.transaction():
        for r in await conn.fetch(statement, _check_ids(ids), list(allowed), *args):
            if r["changed"]:
                changed.append(r["id"])
            elif r["status"] is None:
                refused.append(Refused(r["id"], None, "no such mail"))
            elif r["status"] in allowed:
                # It matched the guard in our snapshot, but a concurrent change won.
                refused.append(Refused(r["id"], r["status"], "changed concurrently; look again"))
            else:
                reason = reasons.get(r["status"], f"status is {r['status']}")
                if r["status"] == "sending" and r["lease_owner"]:
                    reason += f" (dispatcher {r['lease_owner']})"
                refused.append(Refused(r["id"], r["status"], reason))
        if notify and changed:
            await conn.execute(_NOTIFY, NOTIFY_CHANNEL)  # delivered at commit
    return ChangeResult(changed=tuple(changed), refused=tuple(refused))


async def retry(conn: Connection, ids: Sequence[int], *, now: bool = False) -> ChangeResult:
    """Put the named ``failed`` or ``cancelled`` rows back to pending, due now.

    With ``now``, ``pending`` rows waiting for a later attempt (deferred, or enqueued with
    ``not_before``) are made due at once as well. The attempts counter and the attempt
    history are kept. Idle dispatchers are woken with NOTIFY. Ids in any other status (or
    missing) are reported in ``refused``.
    """
    if now:
        return await _change(conn, _RETRY_NOW, ids, RETRYABLE_NOW, _RETRY_REASONS, notify=True)
    return await _change(conn, _RETRY, ids, RETRYABLE, _RETRY_REASONS, notify=True)


async def retry_all_failed(
    conn: Connection,
    *,
    batch_size: int = 1000,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Retry every ``failed`` row, ``batch_size`` rows per transaction; return the count.

    Each chunk commits (and notifies) on its own, so dispatchers start on the first rows
    while the rest are still being retried. ``progress`` gets the running total.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    total = 0
    cursor = 0
    while True:
        async with conn.transaction():
            ids = [r["id"] for r in await conn.fetch(_RETRY_FAILED_CHUNK, cursor, batch_size)]
            if ids:
                await conn.execute(_NOTIFY, NOTIFY_CHANNEL)
        if not ids:
            return total
        total += len(ids)
        cursor = max(ids)
        if progress is not None:
            progress(total)


async def cancel(conn: Connection, ids: Sequence[int]) -> ChangeResult:
    """Cancel the named ``pending`` or ``failed`` rows, and ``sending`` rows whose
    dispatcher is gone (lease expired, or no heartbeat for ``LIVE_SECONDS``); never a
    row a live dispatcher is sending."""
    return await _change(
        conn, _CANCEL, ids, CANCELLABLE, _CANCEL_REASONS, LIVE_SECONDS, notify=False
    )


async def prune(
    conn: Connection,
    *,
    older_than: timedelta | None = None,
    before: datetime | None = None,
    include_failed: bool = False,
    batch_size: int = 1000,
    dry_run: bool = False,
    progress: Callable[[PruneResult], None] | None = None,
    keys_older_than: timedelta | None = None,
) -> PruneResult:
    """Delete old ``sent``, ``cancelled`` and ``suppressed`` rows (and ``failed`` ones if
    asked) in chunks.

    The cutoff is ``before``, or the database's ``now() - older_than``. A row goes when it
    was created and completed before the cutoff; its attempts go with it. Each chunk of
    ``batch_size`` rows is its own short transaction, and ``progress`` gets the running
    totals after each. ``pending`` and ``sending`` rows are never touched. With
    ``dry_run`` nothing is deleted and the result says what would be.

    Idempotency keys are kept when their mail goes (a repeat of the key still finds it).
    With ``keys_older_than`` (a window at least as long as the mail's), keys made before
    ``now() - keys_older_than`` are deleted too, once their mail is gone: a repeat of
    such a key then stores a new mail.
    """
    if (older_than is None) == (before is None):
        raise ValueError("give exactly one of older_than and before")
    if older_than is not None and older_than < timedelta(0):
        raise ValueError("older_than must not be negative")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    statuses = ["sent", "cancelled", "suppressed", *(["failed"] if include_failed else [])]
    cutoff: datetime = await conn.fetchval(_PRUNE_CUTOFF, before, older_than)
    keys_cutoff: datetime | None = None
    if keys_older_than is not None:
        keys_cutoff = await conn.fetchval(_PRUNE_CUTOFF, None, keys_older_than)
        if keys_cutoff is not None and keys_cutoff > cutoff:
            raise ValueError("keys_older_than must not be shorter than the mail's window")
    result = PruneResult(
        cutoff=cutoff,
        deleted=dict.fromkeys(statuses, 0),
        dry_run=dry_run,
        keys_cutoff=keys_cutoff,
    )
    if dry_run:
        deleted = dict(result.deleted)
        attempts = 0
        for r in await conn.fetch(_PRUNE_DRY_RUN, cutoff, statuses):
            deleted[r["status"]] = int(r["n"])
            attempts += int(r["attempts"])
        keys = 0
        if keys_cutoff is not None:
            keys = await conn.fetchval(_PRUNE_KEYS_DRY_RUN, keys_cutoff, cutoff, statuses)
        return replace(result, deleted=deleted, attempts_deleted=attempts, keys_deleted=keys)
    start: tuple[datetime, int] = (datetime.min.replace(tzinfo=UTC), 0)
    cursor = start
    while True:
        async with conn.transaction():
            record = await conn.fetchrow(_PRUNE_CHUNK, *cursor, cutoff, statuses, batch_size)
        assert record is not None
        if record["last_id"] is None:
            break
        cursor = (record["last_created_at"], record["last_id"])
        result = _tally(result, record["statuses"], record["attempts"], batches=1)
        if progress is not None:
            progress(result)
    cursor = start
    while keys_cutoff is not None:
        async with conn.transaction():
            record = await conn.fetchrow(_PRUNE_KEYS_CHUNK, *cursor, keys_cutoff, batch_size)
        assert record is not None
        if record["last_id"] is None:
            break
        cursor = (record["last_created_at"], record["last_id"])
        result = replace(
            result,
            keys_deleted=result.keys_deleted + int(record["deleted"]),
            batches=result.batches + 1,
        )
        if progress is not None:
            progress(result)
    return result


def _tally(
    result: PruneResult, statuses: Sequence[str], attempts: int, batches: int
) -> PruneResult:
    deleted = dict(result.deleted)
    for status in statuses:
        deleted[status] = deleted.get(status, 0) + 1
    return replace(
        result,
        deleted=deleted,
        attempts_deleted=result.attempts_deleted + int(attempts),
        batches=result.batches + batches,
    )
