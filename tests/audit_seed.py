"""Seeding helpers for the audit and operations tests.

Mail enters through the real :func:`dispatcher.outbox.enqueue`; the other statuses are
reached with direct SQL that respects the schema's constraints (a lease while sending,
sent_at when sent), the way a dispatcher leaves the rows.
"""

from __future__ import annotations

from datetime import timedelta
from email.headerregistry import Address

import asyncpg

from outbox.dispatcher.outbox import Mail, enqueue

SENDER = Address("Outbox", "noreply", "example.org")


async def add_mail(
    db: asyncpg.Pool,
    recipient: str = "ada@example.com",
    *,
    name: str = "Ada",
    subject: str = "Welcome",
    status: str = "pending",
    age: timedelta | None = None,
    key: str | None = None,
) -> int:
    """Enqueue one mail (under idempotency ``key``), move it to ``status`` and backdate it
    by ``age``; return its id."""
    local, _, domain = recipient.rpartition("@")
    mail = Mail(
        recipient=Address(name, local, domain),
        subject=subject,
        body_text=f"Hello {name}\n",
        body_html=f"<p>Hello {name}</p>",
    )
    async with db.acquire() as conn, conn.transaction():
        queued = await enqueue(conn, mail, sender=SENDER, key=key)
    if status != "pending":
        await set_status(db, queued.id, status)
    if age is not None:
        await backdate(db, queued.id, age)
    return queued.id


async def set_status(db: asyncpg.Pool, outbox_id: int, status: str) -> None:
    """Put the row in ``status`` as a dispatcher (or operator) would have left it."""
    lease = "lease_owner = NULL, lease_token = NULL, leased_at = NULL, lease_expires_at = NULL"
    sql = {
        "pending": f"status = 'pending', sent_at = NULL, {lease}",
        "sending": "status = 'sending', sent_at = NULL, attempts = attempts + 1, "
        "lease_owner = 'worker-1', lease_token = gen_random_uuid(), leased_at = now(), "
        "lease_expires_at = now() + interval '2 minutes'",
        "sent": f"status = 'sent', sent_at = now(), attempts = attempts + 1, "
        f"last_smtp_code = 250, {lease}",
        "failed": f"status = 'failed', sent_at = NULL, attempts = attempts + 3, "
        f"last_smtp_code = 550, last_error = '550 5.1.1 no such user', {lease}",
        "cancelled": f"status = 'cancelled', sent_at = NULL, {lease}",
        "suppressed": f"status = 'suppressed', sent_at = NULL, attempts = attempts + 1, "
        f"last_error = 'recipient is on the suppression list', {lease}",
    }[status]
    await db.execute(f"UPDATE outbox SET {sql}, updated_at = now() WHERE id = $1", outbox_id)


async def live_dispatcher(db: asyncpg.Pool, name: str = "worker-1") -> None:
    """Register dispatcher ``name`` (the owner of rows set to ``sending``) as alive."""
    await db.execute(
        "INSERT INTO dispatchers (name, hostname, pid) VALUES ($1, 'host', 1) "
        "ON CONFLICT (name) DO UPDATE SET last_beat_at = now()",
        name,
    )


async def backdate(db: asyncpg.Pool, outbox_id: int, age: timedelta) -> None:
    """Shift every timestamp of the row (and its attempts) ``age`` into the past."""
    await db.execute(
        """
        UPDATE outbox
        SET created_at = created_at - $2::interval, updated_at = updated_at - $2::interval,
            next_attempt_at = next_attempt_at - $2::interval, sent_at = sent_at - $2::interval
        WHERE id = $1
        """,
        outbox_id,
        age,
    )
    await db.execute(
        """
        UPDATE outbox_attempts
        SET started_at = started_at - $2::interval, finished_at = finished_at - $2::interval
        WHERE outbox_id = $1
        """,
        outbox_id,
        age,
    )


async def add_attempt(
    db: asyncpg.Pool,
    outbox_id: int,
    attempt: int,
    outcome: str,
    *,
    smtp_code: int | None = None,
    reply: str | None = None,
    error: str | None = None,
    dispatcher: str = "worker-1",
    lease_lost: bool = False,
    ago: timedelta = timedelta(0),
    stage: str | None = None,
) -> None:
    """Write one row of attempt history (``stage``: how far the SMTP dialogue got)."""
    await db.execute(
        """
        INSERT INTO outbox_attempts (outbox_id, attempt, dispatcher, started_at, finished_at,
                                     outcome, smtp_code, smtp_reply, error, lease_lost,
                                     smtp_stage)
        VALUES ($1, $2, $3, now() - $9::interval - interval '1 second', now() - $9::interval,
                $4, $5, $6, $7, $8, $10)
        """,
        outbox_id,
        attempt,
        dispatcher,
        outcome,
        smtp_code,
        reply,
        error,
        lease_lost,
        ago,
        stage,
    )


async def statuses(db: asyncpg.Pool) -> dict[int, str]:
    """Every row's status by id."""
    return {r["id"]: r["status"] for r in await db.fetch("SELECT id, status FROM outbox")}
