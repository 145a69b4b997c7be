"""Audit and operations on the outbox: status, list, show, retry, cancel, prune.

The public, framework-free module behind ``outbox status|list|show|retry|cancel|prune``
and the admin HTTP endpoints. Every function takes an asyncpg connection (or one borrowed
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

* **retry** puts ``failed`` rows, and ``cancelled`` rows named by id (undoing a cancel),
  back to ``pending``, due now, and wakes idle dispatchers with ``NOTIFY outbox_mail``.
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
  completion (``sent_at``, else ``updated_at``) are before the cutoff.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final, Literal

import asyncpg

from dispatcher.db import Connection
from dispatcher.message import build_message
from dispatcher.queries import NOTIFY_CHANNEL

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
    "MailDetail",
    "MailRow",
    "Page",
    "PruneResult",
    "QueueCounts",
    "Refused",
    "Status",
    "StatusSummary",
    "cancel",
    "get",
    "list_mail",
    "prune",
    "queue_counts",
    "retry",
    "retry_all_failed",
    "show",
    "status_summary",
]

Status = Literal["pending", "sending", "sent", "failed", "cancelled"]
STATUSES: Final[tuple[Status, ...]] = ("pending", "sending", "sent", "failed", "cancelled")
#: Statuses that ``retry`` moves back to pending when the ids are named.
RETRYABLE: Final[tuple[Status, ...]] = ("failed", "cancelled")
#: Statuses that ``retry(now=True)`` makes due at once.
RETRYABLE_NOW: Final[tuple[Status, ...]] = ("pending", "failed", "cancelled")
#: Statuses that ``cancel`` accepts.
CANCELLABLE: Final[tuple[Status, ...]] = ("pending", "failed")
#: Statuses that ``prune`` may delete (``failed`` only on request).
PRUNABLE: Final[tuple[Status, ...]] = ("sent", "cancelled", "failed")
#: A dispatcher is live if it heartbeated within this many seconds.
LIVE_SECONDS: Final = 10
#: Below this table size the ``sent`` count is exact; above, it is an estimate.
EXACT_COUNT_MAX_BYTES: Final = 32 * 1024 * 1024
#: Largest id PostgreSQL's bigint holds (ids beyond it cannot exist).
MAX_ID: Final = 2**63 - 1


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

    @property
    def total(self) -> int:
        """Outbox rows deleted (or that would be)."""
        return sum(self.deleted.values())


# --- SQL ----------------------------------------------------------------------------------

_ROW_COLUMNS = """id, message_id, sender, recipient, recipient_name, subject, status, attempts,
       next_attempt_at, lease_owner, lease_expires_at, last_error, last_smtp_code,
       created_at, updated_at, sent_at"""

# Counts per status. pending/sending come from the partial claim index (the live queue),
# failed/cancelled from the partial index of migration 0002: both stay small however large
# the history of sent mail grows. The sent count is handled separately (see queue_counts).
# The oldest due pending mail is the first entry of outbox_claim_idx.
_QUEUE = f"""
SELECT (SELECT count(*) FROM outbox WHERE status = 'pending') AS pending,
       (SELECT count(*) FROM outbox WHERE status = 'sending') AS sending,
       (SELECT count(*) FROM outbox WHERE status = 'failed') AS failed,
       (SELECT count(*) FROM outbox WHERE status = 'cancelled') AS cancelled,
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
    """Counts per status, oldest due pending age, dispatchers, failures in the last hour."""
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
    checked_at = await conn.fetchval("SELECT now()")
    return StatusSummary(
        queue=queue,
        dispatchers=dispatchers,
        failures_last_hour={
            k: failures.get(k, 0) for k in ("failed", "deferred", "unknown", "abandoned")
        },
        checked_at=checked_at,
    )


async def list_mail(
    conn: Connection,
    *,
    status: Status | None = None,
    recipient: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    before: int | None = None,
    limit: int = 50,
) -> Page:
    """Outbox rows, newest first, filtered; keyset pagination on id.

    ``recipient`` matches the whole address, case-insensitively. ``since`` is inclusive,
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
) -> PruneResult:
    """Delete old ``sent`` and ``cancelled`` rows (and ``failed`` ones if asked) in chunks.

    The cutoff is ``before``, or the database's ``now() - older_than``. A row goes when it
    was created and completed before the cutoff; its attempts go with it. Each chunk of
    ``batch_size`` rows is its own short transaction, and ``progress`` gets the running
    totals after each. ``pending`` and ``sending`` rows are never touched. With
    ``dry_run`` nothing is deleted and the result says what would be.
    """
    if (older_than is None) == (before is None):
        raise ValueError("give exactly one of older_than and before")
    if older_than is not None and older_than < timedelta(0):
        raise ValueError("older_than must not be negative")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    statuses = ["sent", "cancelled", *(["failed"] if include_failed else [])]
    cutoff: datetime = await conn.fetchval(_PRUNE_CUTOFF, before, older_than)
    result = PruneResult(cutoff=cutoff, deleted=dict.fromkeys(statuses, 0), dry_run=dry_run)
    if dry_run:
        deleted = dict(result.deleted)
        attempts = 0
        for r in await conn.fetch(_PRUNE_DRY_RUN, cutoff, statuses):
            deleted[r["status"]] = int(r["n"])
            attempts += int(r["attempts"])
        return PruneResult(cutoff, deleted, attempts_deleted=attempts, dry_run=True)
    cursor: tuple[datetime, int] = (datetime.min.replace(tzinfo=UTC), 0)
    while True:
        async with conn.transaction():
            record = await conn.fetchrow(_PRUNE_CHUNK, *cursor, cutoff, statuses, batch_size)
        assert record is not None
        if record["last_id"] is None:
            return result
        cursor = (record["last_created_at"], record["last_id"])
        result = _tally(result, record["statuses"], record["attempts"], batches=1)
        if progress is not None:
            progress(result)


def _tally(
    result: PruneResult, statuses: Sequence[str], attempts: int, batches: int
) -> PruneResult:
    deleted = dict(result.deleted)
    for status in statuses:
        deleted[status] = deleted.get(status, 0) + 1
    return PruneResult(
        cutoff=result.cutoff,
        deleted=deleted,
        attempts_deleted=result.attempts_deleted + int(attempts),
        batches=result.batches + batches,
        dry_run=result.dry_run,
    )
