"""Every ```sql block of docs/audit.md runs against a seeded database and answers correctly."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from tests.audit_seed import add_attempt, add_mail

DOC = Path(__file__).resolve().parent.parent / "docs" / "audit.md"
MINUTE = timedelta(minutes=1)
DAY = timedelta(days=1)


def sql_blocks() -> dict[str, str]:
    """The doc's SQL blocks by title (each block's first line is ``-- title``)."""
    blocks = re.findall(r"^```sql\n(.*?)^```", DOC.read_text(), flags=re.M | re.S)
    titled: dict[str, str] = {}
    for block in blocks:
        first = block.splitlines()[0]
        assert first.startswith("-- "), f"an SQL block in {DOC.name} lacks a '-- title' line"
        titled[first[3:].strip()] = block
    assert len(titled) == len(blocks), "two SQL blocks share a title"
    return titled


@dataclass
class Seeded:
    ada_old: int
    ada_new: int
    bob: int
    carol: int
    dave: int
    erin: int
    frank: int
    old: int


async def seed(db: asyncpg.Pool) -> Seeded:
    """A small outbox with one example of everything the doc asks about."""
    ada_old = await add_mail(db, "Ada@example.com", status="sent", age=2 * DAY)
    await add_attempt(
        db,
        ada_old,
        1,
        "deferred",
        smtp_code=451,
        reply="4.7.1 greylisted",
        ago=2 * DAY + 5 * MINUTE,
    )
    await add_attempt(db, ada_old, 2, "sent", smtp_code=250, reply="2.0.0 OK", ago=2 * DAY)
    ada_new = await add_mail(db, "ada@example.com", subject="Your receipt", key="receipt:ada")

    bob = await add_mail(db, "bob@example.com", status="failed", age=DAY)
    await add_attempt(db, bob, 1, "failed", smtp_code=550, reply="5.1.1 no such user", ago=DAY)

    carol = await add_mail(db, "carol@example.com", status="sent")
    await add_attempt(db, carol, 1, "abandoned", dispatcher="d-2", error="no outcome recorded")
    await add_attempt(
        db, carol, 2, "sent", smtp_code=250, reply="OK", dispatcher="d-1", lease_lost=True
    )
    await add_attempt(db, carol, 3, "sent", smtp_code=250, reply="OK", dispatcher="d-1")

    dave = await add_mail(db, "dave@example.com", age=30 * MINUTE)
    erin = await add_mail(db, "erin@example.com", status="sending")
    await db.execute(
        "UPDATE outbox SET leased_at = now() - interval '20 minutes' WHERE id = $1", erin
    )

    frank = await add_mail(db, "frank@example.com")
    await add_attempt(
        db,
        frank,
        1,
        "deferred",
        smtp_code=421,
        reply="4.3.2 service not available",
        dispatcher="d-1",
    )
    await add_attempt(
        db,
        frank,
        2,
        "deferred",
        error="ConnectionRefusedError: connection refused",
        dispatcher="d-1",
    )
    await db.execute(
        "UPDATE outbox SET next_attempt_at = now() + interval '5 minutes' WHERE id = $1", frank
    )

    old = await add_mail(db, "old@example.com", status="sent", age=10 * DAY)
    await add_attempt(db, old, 1, "failed", smtp_code=554, reply="old rejection", ago=10 * DAY)

    # attempts as the history says
    for mail, attempts in ((ada_old, 2), (bob, 1), (carol, 3), (frank, 2), (old, 1)):
        await db.execute("UPDATE outbox SET attempts = $2 WHERE id = $1", mail, attempts)

    await db.execute(
        """
        INSERT INTO users (email, email_key, name, created_at) VALUES
            ('Ada@example.com', 'ada@example.com', 'Ada', now() - interval '2 days'),
            ('bob@example.com', 'bob@example.com', 'Bob', now() - interval '1 day'),
            ('carol@example.com', 'carol@example.com', 'Carol', now()),
            ('orphan@example.com', 'orphan@example.com', 'Orphan', now() - interval '1 hour'),
            ('ancient@example.com', 'ancient@example.com', 'Ancient', now() - interval '60 days')
        """
    )
    await db.execute(
        """
        INSERT INTO dispatchers (name, hostname, pid, last_beat_at) VALUES
            ('d-1', 'mail-1', 100, now()),
            ('d-2', 'mail-2', 200, now() - interval '1 hour')
        """
    )
    return Seeded(ada_old, ada_new, bob, carol, dave, erin, frank, old)


Rows = Sequence[asyncpg.Record]


def check_sent_to_address(rows: Rows, s: Seeded) -> None:
    assert [(r["id"], r["status"]) for r in rows] == [(s.ada_new, "pending"), (s.ada_old, "sent")]
    assert rows[1]["sent_at"] is not None and rows[0]["sent_at"] is None


def check_attempts_of_latest(rows: Rows, s: Seeded) -> None:
    assert [(r["attempt"], r["outcome"], r["lease_lost"]) for r in rows] == [
        (1, "abandoned", False),
        (2, "sent", True),
        (3, "sent", False),
    ]
    assert rows[1]["took"] == timedelta(seconds=1)


def check_rows_per_status(rows: Rows, s: Seeded) -> None:
    assert {r["status"]: r["mails"] for r in rows} == {
        "failed": 1,
        "pending": 3,
        "sending": 1,
        "sent": 3,
    }


def check_failures_by_code(rows: Rows, s: Seeded) -> None:
    assert {(r["smtp_code"], r["outcome"]): r["attempts"] for r in rows} == {
        (451, "deferred"): 1,
        (550, "failed"): 1,
        (421, "deferred"): 1,
        (None, "deferred"): 1,
    }
    by_code = {r["smtp_code"]: r["example"] for r in rows}
    assert by_code[None].startswith("ConnectionRefusedError")
    assert by_code[550] == "5.1.1 no such user"


def check_mean_attempts(rows: Rows, s: Seeded) -> None:
    (row,) = rows
    assert row["sent"] == 2
    assert row["mean_attempts"] == Decimal("2.50")
    assert row["max_attempts"] == 3
    assert row["needed_a_retry"] == 2
    assert row["median_latency"] >= timedelta(0)


def check_stuck(rows: Rows, s: Seeded) -> None:
    assert [r["id"] for r in rows] == [s.dave, s.erin]
    assert rows[0]["stuck_for"] >= 30 * MINUTE
    assert 20 * MINUTE <= rows[1]["stuck_for"] < 30 * MINUTE


def check_duplicates(rows: Rows, s: Seeded) -> None:
    assert [r["id"] for r in rows] == [s.carol]
    (row,) = rows
    assert (row["sent_attempts"], row["lease_lost_attempts"], row["abandoned_attempts"]) == (
        2,
        1,
        1,
    )
    assert row["history"] == "abandoned@d-2, sent@d-1, sent@d-1"


def check_failed_this_week(rows: Rows, s: Seeded) -> None:
    assert [(r["id"], r["last_smtp_code"]) for r in rows] == [(s.bob, 550)]


def check_dispatchers(rows: Rows, s: Seeded) -> None:
    assert [(r["name"], r["live"], r["attempts_last_hour"], r["sent_last_hour"]) for r in rows] == [
        ("d-1", True, 4, 2),
        ("d-2", False, 1, 0),
    ]


def check_users_without_mail(rows: Rows, s: Seeded) -> None:
    assert [r["email"] for r in rows] == ["orphan@example.com"]


def check_mail_of_a_key(rows: Rows, s: Seeded) -> None:
    assert [(r["key"], r["outbox_id"], r["status"]) for r in rows] == [
        ("receipt:ada", s.ada_new, "pending")
    ]


def check_table_health(rows: Rows, s: Seeded) -> None:
    assert [r["relname"] for r in rows] == ["outbox", "outbox_attempts"]
    assert all(r["table_size"] and r["indexes_size"] for r in rows)
    assert rows[0]["claim_index_size"]


CHECKS: dict[str, Callable[[Rows, Seeded], None]] = {
    "what was sent to an address, and when": check_sent_to_address,
    "every attempt at the latest mail to an address": check_attempts_of_latest,
    "rows per status": check_rows_per_status,
    "failures by SMTP code this week": check_failures_by_code,
    "mean attempts and delivery latency of mail sent this week": check_mean_attempts,
    "mail stuck for more than 15 minutes": check_stuck,
    "duplicate suspects": check_duplicates,
    "mail that failed for good this week": check_failed_this_week,
    "dispatchers and their work in the last hour": check_dispatchers,
    "users without a welcome mail": check_users_without_mail,
    "the mail an idempotency key made": check_mail_of_a_key,
    "table health: size and dead rows": check_table_health,
}


def test_every_sql_block_has_a_check() -> None:
    assert set(sql_blocks()) == set(CHECKS)


@pytest.mark.parametrize("title", list(CHECKS))
async def test_sql_block(db: asyncpg.Pool, title: str) -> None:
    seeded = await seed(db)
    rows = await db.fetch(sql_blocks()[title])
    CHECKS[title](rows, seeded)
