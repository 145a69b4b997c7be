"""Lease semantics at the SQL level: claims, the token guard, reclaiming the dead."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import asyncpg

from outbox.dispatcher import queries
from tests.dispatching import enqueue_many, wait_until

STALE_AFTER = 6.0


async def _beat(db: asyncpg.Pool, name: str, seconds_ago: float = 0.0) -> None:
    await db.execute(
        """
        INSERT INTO dispatchers (name, hostname, pid, last_beat_at)
        VALUES ($1, 'test-host', 1, now() - make_interval(secs => $2))
        ON CONFLICT (name) DO UPDATE SET last_beat_at = excluded.last_beat_at
        """,
        name,
        seconds_ago,
    )


def _outcome_args(
    claim: asyncpg.Record, name: str = "a", outcome: str = "sent", code: int = 250
) -> list[Any]:
    """RECORD's arguments for one outcome of ``claim``'s attempt."""
    now = datetime.now(UTC)
    return [
        [claim["id"]],
        [claim["lease_token"]],
        [claim["attempts"]],
        [outcome],
        [code],
        [f"{code} reply"],
        [None],
        [now],
        [now],
        [0.0],
        name,
        ["end_of_data"],
    ]


async def _record(
    db: asyncpg.Pool, claim: asyncpg.Record, name: str, outcome: str, code: int
) -> list[asyncpg.Record]:
    return await db.fetch(queries.RECORD, *_outcome_args(claim, name, outcome, code))


async def test_claim_leases_rows_and_skips_locked_and_leased_ones(db: asyncpg.Pool) -> None:
    await enqueue_many(db, 5)
    await _beat(db, "a")
    await _beat(db, "b")
    first = await db.fetch(queries.CLAIM, 3, "a", 30.0, STALE_AFTER, 5)
    second = await db.fetch(queries.CLAIM, 10, "b", 30.0, STALE_AFTER, 5)
    assert len(first) == 3 and len(second) == 2
    assert {r["id"] for r in first}.isdisjoint(r["id"] for r in second)
    assert await db.fetch(queries.CLAIM, 10, "b", 30.0, STALE_AFTER, 5) == []
    rows = await db.fetch("SELECT status, lease_owner, attempts FROM outbox")
    assert all(r["status"] == "sending" and r["attempts"] == 1 for r in rows)


async def test_future_retries_are_not_claimed(db: asyncpg.Pool) -> None:
    await enqueue_many(db, 2)
    await db.execute(
        "UPDATE outbox SET next_attempt_at = now() + interval '1 hour' WHERE id = "
        "(SELECT min(id) FROM outbox)"
    )
    claimed = await db.fetch(queries.CLAIM, 10, "a", 30.0, STALE_AFTER, 5)
    assert len(claimed) == 1


async def test_a_stale_owner_cannot_overwrite_the_new_owners_outcome(db: asyncpg.Pool) -> None:
    [queued] = await enqueue_many(db, 1)
    await _beat(db, "a")
    await _beat(db, "b")
    [old] = await db.fetch(queries.CLAIM, 10, "a", 30.0, STALE_AFTER, 5)
    # a's lease runs out (a was frozen, say); b takes the row over.
    await db.execute("UPDATE outbox SET lease_expires_at = now() - interval '1 second'")
    [new] = await db.fetch(queries.CLAIM, 10, "b", 30.0, STALE_AFTER, 5)
    assert new["id"] == queued.id and new["attempts"] == 2
    assert new["lease_token"] != old["lease_token"]

    # a wakes up and reports a permanent failure: nothing changes but the history.
    [late] = await _record(db, old, "a", "failed", 550)
    assert late["lease_lost"] is True
    row = await db.fetchrow("SELECT * FROM outbox")
    assert (row["status"], row["lease_owner"], row["lease_token"]) == (
        "sending",
        "b",
        new["lease_token"],
    )
    assert row["last_smtp_code"] is None

    # b's outcome is recorded normally.
    [ok] = await _record(db, new, "b", "sent", 250)
    assert ok["lease_lost"] is False
    row = await db.fetchrow("SELECT * FROM outbox")
    assert row["status"] == "sent" and row["lease_token"] is None

    history = await db.fetch(
        "SELECT attempt, dispatcher, outcome, lease_lost FROM outbox_attempts ORDER BY id"
    )
    assert [tuple(h.values()) for h in history] == [
        (1, "a", "abandoned", False),
        (1, "a", "failed", True),
        (2, "b", "sent", False),
    ]


async def test_recording_is_idempotent(db: asyncpg.Pool) -> None:
    await enqueue_many(db, 1)
    [claim] = await db.fetch(queries.CLAIM, 1, "a", 30.0, STALE_AFTER, 5)
    args = _outcome_args(claim)
    assert len(await db.fetch(queries.RECORD, *args)) == 1
    assert await db.fetch(queries.RECORD, *args) == []  # a retried batch writes nothing twice
    assert await db.fetchval("SELECT count(*) FROM outbox_attempts") == 1


async def test_a_batch_recorded_again_while_the_first_is_in_progress_is_written_once(
    db: asyncpg.Pool,
) -> None:
    # The recorder writes a batch again when it cannot tell whether its first commit
    # happened; the first may still be in progress on a connection it gave up on.
    await enqueue_many(db, 1)
    [claim] = await db.fetch(queries.CLAIM, 1, "a", 30.0, STALE_AFTER, 5)
    args = _outcome_args(claim)
    async with db.acquire() as first, db.acquire() as again:
        transaction = first.transaction()
        await transaction.start()
        assert len(await first.fetch(queries.RECORD, *args)) == 1
        retried = asyncio.create_task(again.fetch(queries.RECORD, *args))
        waiting = "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1"
        pid = again.get_server_pid()
        await wait_until(lambda: db.fetchval(waiting, pid), what="the second recording to wait")
        await transaction.commit()
        assert await retried == []
    history = await db.fetch("SELECT outcome, lease_lost FROM outbox_attempts")
    assert [tuple(row.values()) for row in history] == [("sent", False)]


async def test_rows_of_a_silent_dispatcher_are_reclaimed_before_their_lease_ends(
    db: asyncpg.Pool,
) -> None:
    await enqueue_many(db, 2)
    await _beat(db, "dead")
    await _beat(db, "alive")
    claimed = await db.fetch(queries.CLAIM, 10, "dead", 3600.0, STALE_AFTER, 5)
    assert len(claimed) == 2
    # While "dead" still beats, its hour-long leases are honoured.
    assert await db.fetch(queries.CLAIM, 10, "alive", 30.0, STALE_AFTER, 5) == []
    await _beat(db, "dead", seconds_ago=STALE_AFTER + 1)
    taken = await db.fetch(queries.CLAIM, 10, "alive", 30.0, STALE_AFTER, 5)
    assert {r["id"] for r in taken} == {r["id"] for r in claimed}
    abandoned = await db.fetch(
        "SELECT dispatcher, attempt FROM outbox_attempts WHERE outcome = 'abandoned'"
    )
    assert sorted(tuple(a.values()) for a in abandoned) == [("dead", 1), ("dead", 1)]


async def test_release_gives_the_attempt_back(db: asyncpg.Pool) -> None:
    await enqueue_many(db, 1)
    [claim] = await db.fetch(queries.CLAIM, 1, "a", 30.0, STALE_AFTER, 5)
    released = await db.fetch(queries.RELEASE, [claim["id"]], [claim["lease_token"]])
    assert len(released) == 1
    row = await db.fetchrow("SELECT status, attempts, lease_token FROM outbox")
    assert (row["status"], row["attempts"], row["lease_token"]) == ("pending", 0, None)
    # A second release with the same (now stale) token changes nothing.
    assert await db.fetch(queries.RELEASE, [claim["id"]], [claim["lease_token"]]) == []


async def test_claim_plan_uses_the_partial_index(db: asyncpg.Pool) -> None:
    async with db.acquire() as conn:
        await conn.execute("SET enable_seqscan = off")  # tiny table: show the planner's intent
        rows = await conn.fetch(
            "EXPLAIN "
            + queries.CLAIM.replace("$1", "10")
            .replace("$2", "'a'")
            .replace("$3", "30")
            .replace("$4", "6")
            .replace("$5", "5")
        )
    assert "outbox_claim_idx" in "\n".join(r[0] for r in rows)


async def test_overlapping_recordings_queue_instead_of_deadlocking(db: asyncpg.Pool) -> None:
    """Two dispatchers recording the same rows (one has lost its lease) in opposite orders."""
    import asyncio

    await enqueue_many(db, 40)
    claims = await db.fetch(queries.CLAIM, 40, "a", 30.0, STALE_AFTER, 5)
    now = datetime.now(UTC)

    async def record(order: list[asyncpg.Record], name: str) -> None:
        async with db.acquire() as conn, conn.transaction():
            await conn.execute(queries.LOCK_FOR_RECORD, [c["id"] for c in order])
            await conn.fetch(
                queries.RECORD,
                [c["id"] for c in order],
                [c["lease_token"] for c in order],
                [1] * len(order),
                ["sent"] * len(order),
                [250] * len(order),
                ["ok"] * len(order),
                [None] * len(order),
                [now] * len(order),
                [now] * len(order),
                [0.0] * len(order),
                name,
                ["end_of_data"] * len(order),
            )

    forward = sorted(claims, key=lambda c: c["id"])
    for _ in range(5):
        await asyncio.gather(record(forward, "a"), record(forward[::-1], "b"))
    assert await db.fetchval("SELECT count(*) FROM outbox WHERE status = 'sent'") == 40


async def test_rows_from_a_claim_whose_reply_was_lost_are_released(db: asyncpg.Pool) -> None:
    await enqueue_many(db, 3)
    await _beat(db, "a")
    claimed = await db.fetch(queries.CLAIM, 3, "a", 30.0, STALE_AFTER, 5)
    known = claimed[0]["id"]  # the dispatcher heard of one row; the reply for two was lost
    released = await db.fetch(queries.RELEASE_UNKNOWN, "a", [known])
    assert {r["id"] for r in released} == {c["id"] for c in claimed[1:]}
    rows = {r["id"]: r for r in await db.fetch("SELECT id, status, attempts FROM outbox")}
    assert rows[known]["status"] == "sending"
    assert all(
        rows[c["id"]]["status"] == "pending" and rows[c["id"]]["attempts"] == 0 for c in claimed[1:]
    )
