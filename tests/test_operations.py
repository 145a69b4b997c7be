"""dispatcher.operations against a real database: status, list, show, retry, cancel, prune."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from outbox.dispatcher import limits, policies, queries
from outbox.dispatcher import operations as ops
from outbox.dispatcher.db import Connection
from outbox.dispatcher.policy import Rate
from tests.audit_seed import (
    add_attempt,
    add_mail,
    backdate,
    live_dispatcher,
    set_status,
    statuses,
)

DAY = timedelta(days=1)


@pytest.fixture
async def conn(db: asyncpg.Pool) -> AsyncIterator[Connection]:
    """A connection for the operations (they run transactions on it)."""
    async with db.acquire() as connection:
        yield connection


async def claim(db: asyncpg.Pool, limit: int = 10) -> list[int]:
    """Claim due rows with the dispatcher's real claim statement."""
    rows = await db.fetch(queries.CLAIM, limit, "test-dispatcher", 60.0, 10.0, 5)
    return sorted(r["id"] for r in rows)


# --- status ---------------------------------------------------------------------------------


async def test_status_summary_counts_ages_dispatchers_and_failures(
    db: asyncpg.Pool, conn: Connection
) -> None:
    due = await add_mail(db)
    await backdate(db, due, timedelta(minutes=5))
    later = await add_mail(db)
    await db.execute(
        "UPDATE outbox SET next_attempt_at = now() + interval '1 hour' WHERE id = $1", later
    )
    await add_mail(db, status="sending")
    for _ in range(3):
        await add_mail(db, status="sent")
    failed = await add_mail(db, status="failed")
    await add_mail(db, status="cancelled")
    await add_attempt(db, failed, 1, "deferred", smtp_code=451)
    await add_attempt(db, failed, 2, "failed", smtp_code=550)
    await add_attempt(db, failed, 3, "failed", smtp_code=550, ago=timedelta(hours=2))
    await db.execute(
        """
        INSERT INTO dispatchers (name, hostname, pid, last_beat_at) VALUES
            ('alive', 'host-a', 10, now() - interval '2 seconds'),
            ('dead', 'host-b', 20, now() - interval '1 minute')
        """
    )

    summary = await ops.status_summary(conn)

    assert summary.queue.counts == {
        "pending": 2,
        "sending": 1,
        "sent": 3,
        "failed": 1,
        "cancelled": 1,
        "suppressed": 0,
    }
    assert not summary.queue.sent_estimated
    assert summary.queue.due_pending == 1
    assert 299 <= summary.queue.oldest_due_pending_seconds < 400
    assert summary.queue.live_dispatchers == 1
    assert [(d.name, d.live) for d in summary.dispatchers] == [("alive", True), ("dead", False)]
    assert summary.failures_last_hour == {
        "failed": 1,
        "deferred": 1,
        "unknown": 0,
        "abandoned": 0,
    }


async def test_status_of_an_empty_outbox(db: asyncpg.Pool, conn: Connection) -> None:
    summary = await ops.status_summary(conn)
    assert set(summary.queue.counts.values()) == {0}
    assert summary.queue.oldest_due_pending_seconds == 0.0
    assert summary.dispatchers == ()


async def test_sent_count_is_estimated_on_large_tables(
    db: asyncpg.Pool, conn: Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    for _ in range(4):
        await add_mail(db, status="sent")
    await add_mail(db)
    await db.execute("ANALYZE outbox")  # make the statistics current without waiting
    monkeypatch.setattr(ops, "EXACT_COUNT_MAX_BYTES", -1)
    queue = await ops.queue_counts(conn)
    assert queue.sent_estimated
    assert queue.counts["pending"] == 1  # the others stay exact
    assert queue.counts["sent"] == 4
    exact = await ops.queue_counts(conn, exact=True)
    assert not exact.sent_estimated and exact.counts["sent"] == 4


async def test_queue_queries_can_use_the_partial_indexes(
    db: asyncpg.Pool, conn: Connection
) -> None:
    await add_mail(db)
    async with db.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL enable_seqscan = off")
        plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + ops._QUEUE))
    # The live queue's partial indexes (the planner picks either claim index).
    assert "outbox_claim_idx" in plan or "outbox_domain_claim_idx" in plan
    assert "outbox_failed_cancelled_idx" in plan


# --- list -----------------------------------------------------------------------------------


async def test_list_filters(db: asyncpg.Pool, conn: Connection) -> None:
    ada = await add_mail(db, "Ada@Example.com")
    bob = await add_mail(db, "bob@example.com", status="failed")
    old = await add_mail(db, "ada@example.com", status="sent", age=3 * DAY)

    async def ids(**filters: object) -> list[int]:
        page = await ops.list_mail(conn, **filters)
        return [r.id for r in page.items]

    assert await ids() == [old, bob, ada]
    assert await ids(recipient="ADA@example.COM") == [old, ada]
    assert await ids(status="failed") == [bob]
    assert await ids(status="sent", recipient="ada@example.com") == [old]
    now = datetime.now(UTC)
    assert await ids(since=now - DAY) == [bob, ada]
    assert await ids(until=now - DAY) == [old]
    assert await ids(since=now - 4 * DAY, until=now - 2 * DAY) == [old]
    assert await ids(recipient="nobody@example.com") == []


async def test_list_pagination_boundaries(db: asyncpg.Pool, conn: Connection) -> None:
    created = [await add_mail(db, f"user{i}@example.com") for i in range(5)]
    newest_first = created[::-1]

    first = await ops.list_mail(conn, limit=2)
    assert [r.id for r in first.items] == newest_first[:2]
    assert first.next_cursor == newest_first[1]
    second = await ops.list_mail(conn, limit=2, before=first.next_cursor)
    assert [r.id for r in second.items] == newest_first[2:4]
    last = await ops.list_mail(conn, limit=2, before=second.next_cursor)
    assert [r.id for r in last.items] == newest_first[4:]
    assert last.next_cursor is None

    # Exactly one page's worth: no cursor to an empty page.
    exact = await ops.list_mail(conn, limit=5)
    assert len(exact.items) == 5 and exact.next_cursor is None
    # Below the smallest id: empty.
    empty = await ops.list_mail(conn, before=min(created))
    assert empty.items == () and empty.next_cursor is None


async def test_list_rejects_bad_arguments(db: asyncpg.Pool, conn: Connection) -> None:
    with pytest.raises(ValueError, match="limit"):
        await ops.list_mail(conn, limit=0)
    with pytest.raises(ValueError, match="status"):
        await ops.list_mail(conn, status="lost")


# --- show -----------------------------------------------------------------------------------


async def test_show_returns_row_history_and_rendered_headers(
    db: asyncpg.Pool, conn: Connection
) -> None:
    mail = await add_mail(db, "ada@example.com", name="Ada Lovelace", status="sent")
    await add_attempt(db, mail, 1, "deferred", smtp_code=421, reply="try later")
    await add_attempt(db, mail, 2, "sent", smtp_code=250, reply="OK", lease_lost=True)

    detail = await ops.show(conn, mail)

    assert detail is not None
    assert detail.row.status == "sent"
    assert [(a.attempt, a.outcome, a.smtp_code, a.lease_lost) for a in detail.history] == [
        (1, "deferred", 421, False),
        (2, "sent", 250, True),
    ]
    headers = dict(detail.headers)
    assert headers["To"] == "Ada Lovelace <ada@example.com>"
    assert headers["From"] == "Outbox <noreply@example.org>"
    assert headers["Message-ID"] == detail.row.message_id
    assert headers["Subject"] == "Welcome"
    assert "Date" in headers
    assert detail.body_text == "Hello Ada Lovelace\n"
    assert await ops.show(conn, mail + 1000) is None
    assert await ops.show(conn, 2**63) is None


async def test_show_reports_a_row_that_cannot_be_rendered(
    db: asyncpg.Pool, conn: Connection
) -> None:
    mail = await add_mail(db)
    await db.execute("UPDATE outbox SET sender = 'not an address' WHERE id = $1", mail)
    detail = await ops.show(conn, mail)
    assert detail is not None and detail.headers == () and detail.render_error


# --- retry ----------------------------------------------------------------------------------


async def test_retry_makes_a_failed_row_claimable_and_keeps_history(
    db: asyncpg.Pool, conn: Connection
) -> None:
    mail = await add_mail(db, status="failed")
    await add_attempt(db, mail, 1, "failed", smtp_code=550)
    await db.execute(
        "UPDATE outbox SET next_attempt_at = now() - interval '3 days' WHERE id = $1", mail
    )
    assert await claim(db) == []  # a failed row is never claimed

    async with db.acquire() as listener:
        woken = asyncio.Event()
        wake = lambda *_: woken.set()  # noqa: E731
        await listener.add_listener(queries.NOTIFY_CHANNEL, wake)
        result = await ops.retry(conn, [mail])
        await asyncio.wait_for(woken.wait(), 5)  # an idle dispatcher is woken
        await listener.remove_listener(queries.NOTIFY_CHANNEL, wake)

    assert result.changed == (mail,) and result.refused == ()
    row = await db.fetchrow("SELECT * FROM outbox WHERE id = $1", mail)
    assert row["status"] == "pending"
    assert row["attempts"] == 3  # kept, not reset
    assert row["next_attempt_at"] <= await db.fetchval("SELECT now()")
    assert await db.fetchval("SELECT count(*) FROM outbox_attempts WHERE outbox_id = $1", mail)
    assert await claim(db) == [mail]


async def test_retry_reports_what_it_refused_and_why(db: asyncpg.Pool, conn: Connection) -> None:
    pending = await add_mail(db)
    sending = await add_mail(db, status="sending")
    sent = await add_mail(db, status="sent")
    failed = await add_mail(db, status="failed")
    cancelled = await add_mail(db, status="cancelled")

    result = await ops.retry(conn, [failed, pending, sending, sent, cancelled, 999_999, failed])

    assert result.changed == (failed, cancelled)
    refused = {r.id: (r.status, r.reason) for r in result.refused}
    assert refused[pending][0] == "pending" and "already pending" in refused[pending][1]
    assert refused[sending][0] == "sending" and "worker-1" in refused[sending][1]
    assert refused[sent] == ("sent", "already sent")
    assert refused[999_999] == (None, "no such mail")
    after = await statuses(db)
    assert after[sending] == "sending" and after[sent] == "sent"
    assert after[failed] == after[cancelled] == "pending"


async def test_retry_rejects_bad_ids(db: asyncpg.Pool, conn: Connection) -> None:
    with pytest.raises(ValueError):
        await ops.retry(conn, [])
    with pytest.raises(ValueError):
        await ops.retry(conn, [0])


async def test_retry_all_failed_in_chunks(db: asyncpg.Pool, conn: Connection) -> None:
    failed = [await add_mail(db, status="failed") for _ in range(5)]
    others = [await add_mail(db, status=s) for s in ("sent", "cancelled", "sending")]
    seen: list[int] = []

    total = await ops.retry_all_failed(conn, batch_size=2, progress=seen.append)

    assert total == 5
    assert seen == [2, 4, 5]
    after = await statuses(db)
    assert all(after[i] == "pending" for i in failed)
    assert [after[i] for i in others] == ["sent", "cancelled", "sending"]
    assert await ops.retry_all_failed(conn) == 0


# --- cancel ---------------------------------------------------------------------------------


async def _live_dispatcher(db: asyncpg.Pool, name: str = "worker-1") -> None:
    await db.execute("INSERT INTO dispatchers (name, hostname, pid) VALUES ($1, 'host', 1)", name)


async def test_cancel_pending_and_failed_only(db: asyncpg.Pool, conn: Connection) -> None:
    pending = await add_mail(db)
    failed = await add_mail(db, status="failed")
    sending = await add_mail(db, status="sending")
    await live_dispatcher(db)  # its owner, worker-1, is alive
    sent = await add_mail(db, status="sent")

    result = await ops.cancel(conn, [pending, failed, sending, sent])

    assert result.changed == (pending, failed)
    refused = {r.id: r for r in result.refused}
    assert refused[sending].status == "sending"
    assert "cannot be recalled" in refused[sending].reason
    assert refused[sent].reason == "already sent"
    after = await statuses(db)
    assert after == {pending: "cancelled", failed: "cancelled", sending: "sending", sent: "sent"}
    # The lease of the row being sent is untouched.
    assert await db.fetchval("SELECT lease_token IS NOT NULL FROM outbox WHERE id = $1", sending)
    again = await ops.cancel(conn, [pending])
    assert again.changed == () and again.refused[0].reason == "already cancelled"
    assert pending not in await claim(db)


@pytest.mark.parametrize("gone", ["no heartbeat", "lease expired"])
async def test_cancel_takes_a_sending_row_whose_dispatcher_is_gone(
    db: asyncpg.Pool, conn: Connection, gone: str
) -> None:
    # A row that took its dispatcher down stays 'sending': the operator can stop it.
    sending = await add_mail(db, status="sending")
    await live_dispatcher(db)
    if gone == "no heartbeat":
        await db.execute("UPDATE dispatchers SET last_beat_at = now() - interval '1 minute'")
    else:
        await db.execute(
            "UPDATE outbox SET lease_expires_at = now() - interval '1 second' WHERE id = $1",
            sending,
        )
    token = await db.fetchval("SELECT lease_token FROM outbox WHERE id = $1", sending)

    result = await ops.cancel(conn, [sending])

    assert result.changed == (sending,)
    row = await db.fetchrow("SELECT status, lease_token, lease_owner FROM outbox")
    assert tuple(row.values()) == ("cancelled", None, None)
    [attempt] = await db.fetch("SELECT outcome, dispatcher, error FROM outbox_attempts")
    assert (attempt["outcome"], attempt["dispatcher"]) == ("abandoned", "worker-1")
    # The old owner, should it come back, changes nothing (its token is void).
    assert await db.fetch(queries.RELEASE, [sending], [token]) == []
    assert await statuses(db) == {sending: "cancelled"}


async def test_cancel_cannot_race_a_claim(db: asyncpg.Pool, conn: Connection) -> None:
    """A claim that commits first wins: the cancel's guard no longer matches."""
    mail = await add_mail(db)
    await live_dispatcher(db, "racer")
    async with db.acquire() as dispatcher, dispatcher.transaction():
        claimed = await dispatcher.fetch(queries.CLAIM, 10, "racer", 60.0, 10.0, 5)
        assert [r["id"] for r in claimed] == [mail]
        # The operator's cancel waits for the claim's row lock, then re-checks its guard.
        cancelling = asyncio.create_task(ops.cancel(conn, [mail]))
        await asyncio.sleep(0.2)
        assert not cancelling.done()
    result = await cancelling
    assert result.changed == ()
    assert result.refused[0].reason == "changed concurrently; look again"
    assert (await statuses(db))[mail] == "sending"


# --- prune ----------------------------------------------------------------------------------


async def test_prune_deletes_old_finished_rows_and_never_pending_or_sending(
    db: asyncpg.Pool, conn: Connection
) -> None:
    old = 40 * DAY
    old_sent = [await add_mail(db, status="sent", age=old) for _ in range(5)]
    await add_mail(db, status="cancelled", age=old)
    await add_mail(db, status="suppressed", age=old)
    old_failed = await add_mail(db, status="failed", age=old)
    old_pending = await add_mail(db, age=old)
    old_sending = await add_mail(db, status="sending", age=old)
    new_sent = await add_mail(db, status="sent", age=DAY)
    for mail in old_sent:
        await add_attempt(db, mail, 1, "deferred", smtp_code=451)
        await add_attempt(db, mail, 2, "sent", smtp_code=250)
    # Created long ago, but only completed recently: kept.
    late_sent = await add_mail(db, age=old)
    await set_status(db, late_sent, "sent")
    progress: list[ops.PruneResult] = []

    dry = await ops.prune(conn, older_than=30 * DAY, dry_run=True)
    assert dry.deleted == {"sent": 5, "cancelled": 1, "suppressed": 1}
    assert dry.attempts_deleted == 10
    assert len(await statuses(db)) == 12

    result = await ops.prune(conn, older_than=30 * DAY, batch_size=2, progress=progress.append)

    assert result.deleted == {"sent": 5, "cancelled": 1, "suppressed": 1}
    assert result.attempts_deleted == 10
    assert result.batches == 4
    assert [p.total for p in progress] == [2, 4, 6, 7]
    remaining = await statuses(db)
    assert set(remaining) == {old_failed, old_pending, old_sending, new_sent, late_sent}
    assert await db.fetchval("SELECT count(*) FROM outbox_attempts") == 0

    with_failed = await ops.prune(conn, older_than=30 * DAY, include_failed=True)
    assert with_failed.deleted == {"sent": 0, "cancelled": 0, "suppressed": 0, "failed": 1}
    assert set(await statuses(db)) == {old_pending, old_sending, new_sent, late_sent}

    # Even a cutoff in the future never touches pending or sending rows.
    everything = await ops.prune(
        conn,
        before=datetime.now(UTC) + DAY,
        include_failed=True,
    )
    assert everything.total == 2
    assert await statuses(db) == {old_pending: "pending", old_sending: "sending"}


async def test_prune_skips_rows_locked_by_someone_else(db: asyncpg.Pool, conn: Connection) -> None:
    locked = await add_mail(db, status="sent", age=40 * DAY)
    free = await add_mail(db, status="sent", age=40 * DAY)
    async with db.acquire() as other, other.transaction():
        await other.execute("SELECT 1 FROM outbox WHERE id = $1 FOR UPDATE", locked)
        result = await asyncio.wait_for(
            ops.prune(conn, older_than=30 * DAY),
            5,
        )
    assert result.deleted["sent"] == 1
    assert set(await statuses(db)) == {locked}
    assert free not in await statuses(db)


async def test_prune_rejects_bad_arguments(db: asyncpg.Pool, conn: Connection) -> None:
    with pytest.raises(ValueError):
        await ops.prune(conn)
    with pytest.raises(ValueError):
        await ops.prune(conn, older_than=DAY, batch_size=0)
    with pytest.raises(ValueError):
        await ops.prune(conn, older_than=-DAY)


# --- sending policy ---------------------------------------------------------------------------


async def test_policy_operations_refuse_bad_input(conn: Connection) -> None:
    for bad in [
        {"rates": None, "concurrency": None},
        {"rates": []},
        {"rates": [Rate(1, 1), Rate(5, 1)]},
        {"concurrency": 0},
        {"concurrency": policies.MAX_CONCURRENCY + 1},
    ]:
        with pytest.raises(ValueError):
            await policies.set_limits(conn, None, **bad)  # type: ignore[arg-type]
    for domain in ["", "a b", "-x.com", "x" * 300, "[::1]"]:
        with pytest.raises(ValueError):
            await policies.pause(conn, domain)
    for address in ["", "ada", "ada@", "a b@example.com", "ada@exa mple.com", "x" * 400]:
        with pytest.raises(ValueError):
            await policies.suppress(conn, address)
    with pytest.raises(ValueError):
        await policies.suppress(conn, "ada@example.com", "two\nlines")
    assert await conn.fetchval("SELECT count(*) FROM outbox_policies") == 0
    assert await conn.fetchval("SELECT count(*) FROM outbox_suppressions") == 0


async def test_policy_changes_never_deadlock_with_policed_claims(db: asyncpg.Pool) -> None:
    # Operators change scopes (locking a policy row, then its rate windows) while
    # dispatchers claim under limits (locking every policy row in order, then taking
    # tokens): the lock order is the same, so neither ever waits for the other in a cycle.
    for i in range(30):
        await add_mail(db, f"user{i}@d{i % 3}.example")
    for name in ("c-1", "c-2"):
        await live_dispatcher(db, name)  # their leases are honoured
    claimed: list[int] = []

    async def claimer(name: str) -> None:
        for _ in range(25):
            async with db.acquire() as conn:
                taken = await limits.claim(
                    conn, limit=2, name=name, lease=60.0, stale_after=10.0, max_abandons=5
                )
            claimed.extend(r["id"] for r in taken.rows)

    async def operator(domain: str | None) -> None:
        for _ in range(15):
            async with db.acquire() as conn:
                await policies.set_limits(conn, domain, rates=[Rate(1000, 1)], concurrency=100)
                await policies.pause(conn, domain)
                await policies.resume(conn, domain)
                await policies.remove_limits(conn, domain)

    await asyncio.wait_for(
        asyncio.gather(claimer("c-1"), claimer("c-2"), operator(None), operator("d1.example")),
        60,
    )
    assert len(claimed) == len(set(claimed))  # no mail claimed twice
    assert await db.fetchval("SELECT count(*) FROM outbox_policies") == 0


# --- migration --------------------------------------------------------------------------------


async def test_migration_0002_downgrades_and_upgrades(database_url: str, db: asyncpg.Pool) -> None:
    from outbox.cli import migrate

    async def indexes() -> set[str]:
        rows = await db.fetch("SELECT indexname FROM pg_indexes WHERE tablename LIKE 'outbox%'")
        return {r[0] for r in rows}

    added = {"outbox_failed_cancelled_idx", "outbox_created_at_id_idx"}
    added.add("outbox_attempts_finished_at_idx")
    await add_mail(db, status="failed")
    assert added <= await indexes()
    assert "outbox_created_at_idx" not in await indexes()
    await asyncio.to_thread(migrate.downgrade, database_url, "0001")
    assert not added & await indexes()
    assert "outbox_created_at_idx" in await indexes()
    await asyncio.to_thread(migrate.upgrade, database_url)
    assert added <= await indexes()
    assert (await statuses(db)) == {1: "failed"}
