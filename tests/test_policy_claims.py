"""Sending policy through PostgreSQL: priorities, limits, pause, suppression, throttling."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from email.headerregistry import Address

import asyncpg
import pytest

from outbox.dispatcher import limits, policy, queries
from outbox.dispatcher.limits import Reply
from outbox.dispatcher.outbox import Mail, enqueue, enqueue_with

SENDER = Address("Outbox", "noreply", "example.org")
STALE = 6.0
INSERT_USER = "INSERT INTO users (email, email_key, name) VALUES ($1, $2, $3) RETURNING id"


# --- helpers ------------------------------------------------------------------------------


async def _beat(db: asyncpg.Pool, name: str, seconds_ago: float = 0.0) -> None:
    """Dispatcher ``name`` is alive (its leases are honoured), as of ``seconds_ago``."""
    await db.execute(
        """
        INSERT INTO dispatchers (name, hostname, pid, last_beat_at)
        VALUES ($1, 'test-host', 1, now() - make_interval(secs => $2))
        ON CONFLICT (name) DO UPDATE SET last_beat_at = excluded.last_beat_at
        """,
        name,
        seconds_ago,
    )


async def _fill(
    db: asyncpg.Pool, count: int, domain: str, *, priority: int = 5, ago: float = 0.0
) -> None:
    """``count`` due mails to ``domain``, due ``ago`` seconds ago (bulk SQL, as enqueue
    would store them)."""
    await db.execute(
        """
        INSERT INTO outbox (message_id, sender, recipient, recipient_domain, recipient_key,
                            subject, body_text, priority, next_attempt_at)
        SELECT format('<%s.%s.%s@test>', $2::text, i, gen_random_uuid()),
               'Outbox <noreply@example.org>', format('u%s@%s', i, $2::text), $2::text,
               format('u%s@%s', i, $2::text), 'Hi', 'Hello', $3, now() - make_interval(secs => $4)
        FROM generate_series(1, $1) AS i
        """,
        count,
        domain,
        priority,
        ago,
    )


async def _policy(
    db: asyncpg.Pool,
    domain: str,
    *,
    paused: bool = False,
    concurrency: int | None = None,
    rates: tuple[tuple[int, int, float], ...] = (),
) -> None:
    """A policy for scope ``domain``; ``rates``: (max_count, per_seconds, burst), full."""
    await db.execute(
        "INSERT INTO outbox_policies (domain, paused, concurrency) VALUES ($1, $2, $3)",
        domain,
        paused,
        concurrency,
    )
    for count, per, burst in rates:
        await db.execute(
            "INSERT INTO outbox_rate_limits (domain, per_seconds, max_count, burst, tokens) "
            "VALUES ($1, $2, $3, $4, $4)",
            domain,
            per,
            count,
            burst,
        )


async def _claim(
    db: asyncpg.Pool | asyncpg.Connection, name: str = "a", limit: int = 32
) -> list[asyncpg.Record]:
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn:
            return await _claim(conn, name, limit)
    claimed = await limits.claim(
        db, limit=limit, name=name, lease=60.0, stale_after=STALE, max_abandons=5
    )
    return claimed.rows


async def test_a_claim_says_whether_a_policy_was_in_force_and_takes_the_hint(
    db: asyncpg.Pool,
) -> None:
    await _fill(db, 4, "a.example")
    await _beat(db, "a")
    args = {"name": "a", "lease": 60.0, "stale_after": STALE, "max_abandons": 5}
    async with db.acquire() as conn:
        # No policy, though the caller expected one: the plain claim, and it says so.
        first = await limits.claim(conn, limit=1, policed=True, **args)
        assert len(first.rows) == 1 and not first.policed
        await _policy(db, "a.example", concurrency=2)
        # A policy now, though the caller expected none: it is found and kept to.
        second = await limits.claim(conn, limit=4, **args)
        assert len(second.rows) == 1 and second.policed
        third = await limits.claim(conn, limit=4, policed=True, **args)
        assert third.rows == [] and third.policed  # at its concurrency limit of 2


async def _record(
    db: asyncpg.Pool,
    claims: list[asyncpg.Record],
    outcome: str,
    code: int | None = None,
    reply: str | None = None,
    *,
    stage: str = "end_of_data",
    error: str | None = None,
    name: str = "a",
) -> list[asyncpg.Record]:
    now = datetime.now(UTC)
    n = len(claims)
    return await db.fetch(
        queries.RECORD,
        [c["id"] for c in claims],
        [c["lease_token"] for c in claims],
        [c["attempts"] for c in claims],
        [outcome] * n,
        [code] * n,
        [reply] * n,
        [error] * n,
        [now] * n,
        [now] * n,
        [1.0] * n,
        name,
        [stage] * n,
    )


async def _sending(db: asyncpg.Pool, domain: str) -> int:
    count: int = await db.fetchval(
        "SELECT count(*) FROM outbox WHERE status = 'sending' AND recipient_domain = $1", domain
    )
    return count


def _mail(recipient: str) -> Mail:
    return Mail(recipient, "Welcome", "Hello\n")


# --- enqueue --------------------------------------------------------------------------------


async def test_enqueue_stores_the_domain_and_the_mailbox_key(db: asyncpg.Pool) -> None:
    async with db.acquire() as conn:
        await enqueue(conn, _mail("Ada <ÄDA@Bücher.de>"), sender=SENDER)
        await enqueue(conn, _mail("bob@XN--BCHER-KVA.de"), sender=SENDER, key="k1")
        await enqueue_with(
            conn, INSERT_USER, ("c@example.org", "c@example.org", "C"), _mail("C@Example.ORG")
        )
    rows = await db.fetch(
        "SELECT recipient, recipient_domain, recipient_key, priority FROM outbox ORDER BY id"
    )
    assert [tuple(r.values()) for r in rows] == [
        ("ÄDA@Bücher.de", "xn--bcher-kva.de", "äda@xn--bcher-kva.de", 5),
        ("bob@XN--BCHER-KVA.de", "xn--bcher-kva.de", "bob@xn--bcher-kva.de", 5),
        ("C@Example.ORG", "example.org", "c@example.org", 5),
    ]


async def test_enqueue_priority(db: asyncpg.Pool) -> None:
    async with db.acquire() as conn:
        urgent = await enqueue(conn, _mail("a@example.org"), sender=SENDER, priority=0)
        late = await enqueue(conn, _mail("b@example.org"), sender=SENDER, key="k", priority=9)
        written = await enqueue_with(
            conn, INSERT_USER, ("c@example.org", "c@example.org", "C"), _mail("c@x.org"), priority=2
        )
        assert written is not None
        for bad in (-1, 10, 1.5, "1", None, True):
            with pytest.raises(ValueError, match="priority"):
                await enqueue(conn, _mail("d@example.org"), sender=SENDER, priority=bad)  # type: ignore[arg-type]
            with pytest.raises(ValueError, match="priority"):
                await enqueue_with(
                    conn,
                    INSERT_USER,
                    ("d@example.org", "d@example.org", "D"),
                    _mail("d@example.org"),
                    priority=bad,  # type: ignore[arg-type]
                )
    priorities = dict(await db.fetch("SELECT id, priority FROM outbox"))
    assert priorities == {urgent.id: 0, late.id: 9, written[1].id: 2}
    assert await db.fetchval("SELECT count(*) FROM users") == 1


# --- order ----------------------------------------------------------------------------------


async def test_the_most_urgent_mail_is_claimed_first(db: asyncpg.Pool) -> None:
    await _fill(db, 10_000, "example.com", ago=60.0)
    async with db.acquire() as conn:
        urgent = await enqueue(conn, _mail("urgent@example.org"), sender=SENDER, priority=0)
    await _beat(db, "a")
    [first] = await _claim(db, limit=1)
    assert (first["id"], first["priority"], first["recipient_domain"]) == (
        urgent.id,
        0,
        "example.org",
    )
    # The same under limits.
    await db.execute("UPDATE outbox SET priority = 1 WHERE id = (SELECT max(id) - 1 FROM outbox)")
    await _policy(db, "", rates=((1000, 1, 1000.0),))
    [second] = await _claim(db, limit=1)
    assert second["priority"] == 1


async def test_a_policed_claim_returns_the_columns_of_the_plain_claim(db: asyncpg.Pool) -> None:
    await _fill(db, 3, "example.com")
    await _beat(db, "a")
    [plain] = await db.fetch(queries.CLAIM, 1, "a", 60.0, STALE, 5)
    [unpoliced] = await _claim(db, limit=1)  # no policy: the plain claim
    await _policy(db, "example.com", concurrency=10)
    [policed] = await _claim(db, limit=1)
    assert list(plain.keys()) == list(unpoliced.keys()) == list(policed.keys())
    assert {"priority", "recipient_domain", "suppressed"} <= set(policed.keys())
    assert policed["attempts"] == 1 and policed["suppressed"] is False


# --- rates and concurrency ----------------------------------------------------------------


async def test_the_global_rate_is_never_exceeded(db: asyncpg.Pool) -> None:
    await _fill(db, 400, "a.example")
    await _fill(db, 400, "b.example")
    await _policy(db, "", rates=((10, 1, 10.0),))
    await _policy(db, "b.example", concurrency=1000)  # both branches of the claim
    await _beat(db, "a")
    await _beat(db, "b")
    start = await db.fetchval("SELECT refreshed_at FROM outbox_rate_limits")
    claimed = 0
    async with db.acquire() as one, db.acquire() as two:
        for _ in range(30):
            got = await asyncio.gather(_claim(one, "a"), _claim(two, "b"))
            claimed += sum(len(rows) for rows in got)
            elapsed = (await db.fetchval("SELECT clock_timestamp()") - start).total_seconds()
            assert claimed <= 10 * elapsed + 10 + 1e-6
            await asyncio.sleep(0.05)  # let time pass for the rate
    assert claimed >= 10 + 10 * 1.0  # and it does let mail through (30 rounds > 1.5 s)


async def test_domain_concurrency_and_rate_hold_across_dispatchers(db: asyncpg.Pool) -> None:
    slow = "slow.example"
    await _fill(db, 1000, slow, ago=3600.0)  # all of it ahead of the other mail
    await _fill(db, 300, "fast.example")
    await _policy(db, slow, concurrency=3, rates=((20, 1, 5.0),))
    await _beat(db, "a")
    await _beat(db, "b")
    start = await db.fetchval("SELECT refreshed_at FROM outbox_rate_limits")
    slow_claimed = 0
    async with db.acquire() as one, db.acquire() as two:
        for round_ in range(20):
            # Both stay alive however slow the machine: a dispatcher that stopped
            # beating no longer holds its mail in flight, by design.
            await _beat(db, "a")
            await _beat(db, "b")
            got = await asyncio.gather(_claim(one, "a", 10), _claim(two, "b", 10))
            rows = [row for batch in got for row in batch]
            in_flight = await _sending(db, slow)
            assert in_flight <= 3
            mine = [row for row in rows if row["recipient_domain"] == slow]
            slow_claimed += len(mine)
            elapsed = (await db.fetchval("SELECT clock_timestamp()") - start).total_seconds()
            assert slow_claimed <= 20 * elapsed + 5 + 1e-6
            if round_ < 15:  # no head-of-line block: the rest keeps flowing
                assert len(rows) - len(mine) >= 17
            for name, batch in zip("ab", got, strict=True):
                done = [row for row in batch if row["recipient_domain"] == slow]
                if done:
                    await _record(db, done, "sent", 250, "ok", name=name)
            await asyncio.sleep(0.05)
    assert slow_claimed >= 6  # the limited domain is served too


async def test_a_dead_dispatchers_mail_does_not_hold_a_concurrency_limit(db: asyncpg.Pool) -> None:
    await _fill(db, 2, "slow.example")
    await _policy(db, "slow.example", concurrency=1)
    await _beat(db, "dead")
    await _beat(db, "alive")
    [taken] = await _claim(db, "dead")
    await db.execute("UPDATE outbox SET priority = 9 WHERE status = 'pending'")
    assert await _claim(db, "alive") == []  # full, though another mail is due
    await _beat(db, "dead", seconds_ago=STALE + 1)
    [again] = await _claim(db, "alive")
    assert (again["id"], again["attempts"]) == (taken["id"], 2)
    assert await _claim(db, "alive") == []  # full again
    assert await db.fetchval("SELECT outcome FROM outbox_attempts") == "abandoned"


# --- pause ----------------------------------------------------------------------------------


async def test_pausing_all_mail_claims_nothing(db: asyncpg.Pool) -> None:
    await _fill(db, 5, "example.com")
    await _policy(db, "", paused=True, rates=((100, 1, 100.0),))
    await _beat(db, "a")
    assert await _claim(db) == []
    rows = await db.fetch("SELECT status, attempts FROM outbox")
    assert {(r["status"], r["attempts"]) for r in rows} == {("pending", 0)}
    await db.execute("UPDATE outbox_policies SET paused = false")
    assert len(await _claim(db)) == 5


async def test_pausing_a_domain_holds_only_its_mail(db: asyncpg.Pool) -> None:
    await _fill(db, 50, "held.example", ago=60.0)  # ahead of the rest
    await _fill(db, 5, "other.example")
    await _fill(db, 5, "more.example")
    await _policy(db, "held.example", paused=True)
    await _beat(db, "a")
    claimed = await _claim(db, limit=20)
    assert sorted({r["recipient_domain"] for r in claimed}) == ["more.example", "other.example"]
    assert len(claimed) == 10
    held = await db.fetch(
        "SELECT status, attempts FROM outbox WHERE recipient_domain = 'held.example'"
    )
    assert {(r["status"], r["attempts"]) for r in held} == {("pending", 0)}


# --- suppression ----------------------------------------------------------------------------


async def test_mail_to_a_suppressed_address_is_flagged_and_recorded(db: asyncpg.Pool) -> None:
    await db.execute(
        "INSERT INTO outbox_suppressions (address_key, address, source, reason) "
        "VALUES ('ada@example.org', 'ada@example.org', 'operator', 'asked us to stop')"
    )
    async with db.acquire() as conn:
        ada = await enqueue(conn, _mail("ADA@Example.org"), sender=SENDER)
        await enqueue(conn, _mail("bob@example.org"), sender=SENDER)
    # Under a rate: the suppressed mail takes no token, it is not sent.
    await _policy(db, "", rates=((10, 3600, 10.0),))
    await _beat(db, "a")
    claimed = await _claim(db)
    assert {r["id"]: r["suppressed"] for r in claimed}[ada.id] is True
    assert [r["suppressed"] for r in claimed].count(False) == 1
    tokens = await db.fetchval("SELECT tokens FROM outbox_rate_limits")
    assert tokens == pytest.approx(9.0, abs=0.01)

    [suppressed] = [r for r in claimed if r["suppressed"]]
    recorded = await _record(db, [suppressed], "suppressed", error="on the suppression list")
    assert [r["lease_lost"] for r in recorded] == [False]
    row = await db.fetchrow("SELECT status, sent_at, last_error FROM outbox WHERE id = $1", ada.id)
    assert tuple(row.values()) == ("suppressed", None, "on the suppression list")
    assert await db.fetchval(
        "SELECT outcome FROM outbox_attempts WHERE outbox_id = $1", ada.id
    ) == ("suppressed")


async def test_a_permanent_refusal_at_rcpt_suppresses_the_address(db: asyncpg.Pool) -> None:
    async with db.acquire() as conn:
        for recipient in ("Carol@example.org", "carol@EXAMPLE.org", "dan@example.org"):
            await enqueue(conn, _mail(recipient), sender=SENDER)
    await _beat(db, "a")
    claimed = await _claim(db)
    carol = [r for r in claimed if r["recipient"].lower().startswith("carol")]
    [dan] = [r for r in claimed if r["recipient"].startswith("dan")]
    # Two refusals of one mailbox in one batch make one entry.
    await _record(db, carol, "failed", 550, "5.1.1 no such user", stage="rcpt")
    # A refusal of the message, not of the recipient, suppresses nothing.
    await _record(db, [dan], "failed", 554, "5.7.1 spam", stage="end_of_data")
    rows = await db.fetch("SELECT address_key, source, reason, outbox_id FROM outbox_suppressions")
    assert [tuple(r.values())[:3] for r in rows] == [
        ("carol@example.org", "smtp", "550 5.1.1 no such user")
    ]
    assert rows[0]["outbox_id"] in {r["id"] for r in carol}
    statuses = await db.fetch("SELECT DISTINCT status FROM outbox")
    assert [r["status"] for r in statuses] == ["failed"]
    # The next mail to Carol is flagged at claim.
    async with db.acquire() as conn:
        await enqueue(conn, _mail("CAROL@example.org"), sender=SENDER)
    [next_one] = await _claim(db)
    assert next_one["suppressed"] is True


async def test_a_refusal_recorded_after_losing_the_lease_suppresses_nothing(
    db: asyncpg.Pool,
) -> None:
    async with db.acquire() as conn:
        await enqueue(conn, _mail("erin@example.org"), sender=SENDER)
    [old] = await _claim(db, "gone")  # "gone" never heartbeats: its lease is not honoured
    await _beat(db, "b")
    [new] = await _claim(db, "b")
    assert new["id"] == old["id"]
    recorded = await _record(
        db, [old], "failed", 550, "5.1.1 no such user", stage="rcpt", name="gone"
    )
    assert [r["lease_lost"] for r in recorded] == [True]
    assert await db.fetchval("SELECT count(*) FROM outbox_suppressions") == 0


# --- adaptive throttling --------------------------------------------------------------------


async def _throttle(db: asyncpg.Pool, domain: str) -> asyncpg.Record:
    row = await db.fetchrow(
        "SELECT throttle_rate, throttle_base, throttled_at, throttle_tokens "
        "FROM outbox_policies WHERE domain = $1",
        domain,
    )
    assert row is not None
    return row


async def _effective(db: asyncpg.Pool, domain: str) -> float | None:
    """The throttle's effective rate as `outbox limit list` would show it."""
    [row] = [r for r in await db.fetch(queries.LIST_POLICIES) if r["domain"] == domain]
    return policy.effective_rate(row["throttle_rate"], row["throttled_at"], row["now"])


async def test_a_421_at_rcpt_halves_the_domain_once_a_second_and_it_recovers(
    db: asyncpg.Pool,
) -> None:
    slow = "slow.example"
    await _policy(db, slow, rates=((100, 1, 100.0),))
    await _policy(db, "fine.example", concurrency=5)
    reply = Reply("deferred", 421, "rcpt", slow)
    async with db.acquire() as conn:
        assert await limits.record_throttles(conn, [reply]) == {slow: 50.0}
        # More replies in the same second (other mail in flight): no further halving.
        assert await limits.record_throttles(conn, [reply, reply]) == {}
        assert await limits.record_throttles(conn, [Reply("sent", 250, "end_of_data", slow)]) == {}
    first = await _throttle(db, slow)
    assert (first["throttle_rate"], first["throttle_base"], first["throttle_tokens"]) == (
        50.0,
        100.0,
        0.0,
    )
    # Other scopes are untouched.
    others = await db.fetch("SELECT * FROM outbox_policies WHERE domain <> $1", slow)
    assert [(r["domain"], r["throttle_rate"]) for r in others] == [("fine.example", None)]

    # It rises linearly, by the halved rate every RAMP_SECONDS: after 5 s, by half of it.
    await db.execute(
        "UPDATE outbox_policies SET throttled_at = throttled_at - interval '5 seconds', "
        "throttle_refreshed_at = throttle_refreshed_at - interval '5 seconds' WHERE domain = $1",
        slow,
    )
    halfway = await _effective(db, slow)
    assert halfway == pytest.approx(75.0, abs=0.5)
    await asyncio.sleep(0.2)  # let time pass
    later = await _effective(db, slow)
    assert later is not None and later > halfway
    # A signal now halves the effective rate, and remembers the rate it halved.
    async with db.acquire() as conn:
        [(scope, rate)] = (await limits.record_throttles(conn, [reply])).items()
    assert scope == slow and rate == pytest.approx(later / 2, rel=0.02)
    assert (await _throttle(db, slow))["throttle_base"] == pytest.approx(later, rel=0.02)

    # Once recovered, the next claim clears the throttle; the configured rate stays.
    await db.execute(
        "UPDATE outbox_policies SET throttled_at = throttled_at - interval '61 seconds' "
        "WHERE domain = $1",
        slow,
    )
    assert await _effective(db, slow) is None
    await _claim(db)
    cleared = await _throttle(db, slow)
    assert (cleared["throttle_rate"], cleared["throttled_at"]) == (None, None)


async def test_a_throttled_domain_waits_while_the_rest_flows(db: asyncpg.Pool) -> None:
    await _fill(db, 20, "slow.example", ago=60.0)
    await _fill(db, 20, "fast.example")
    await _beat(db, "a")
    async with db.acquire() as conn:
        halved = await limits.record_throttles(
            conn, [Reply("deferred", 450, "rcpt", "slow.example")]
        )
    # No configured rate and nothing sent lately: from the floor of 1/s, halved.
    assert halved == {"slow.example": 0.5}
    claimed = await _claim(db, limit=50)
    assert {r["recipient_domain"] for r in claimed} == {"fast.example"}
    # Two seconds of refill at 0.5/s make one token.
    await db.execute(
        "UPDATE outbox_policies SET throttle_refreshed_at = throttle_refreshed_at "
        "- interval '2 seconds'"
    )
    [one] = await _claim(db)
    assert one["recipient_domain"] == "slow.example"
    assert await _claim(db) == []
    # Recovered: the throttle goes, and with it the row that held nothing else.
    await db.execute(
        "UPDATE outbox_policies SET throttled_at = throttled_at - interval '60 seconds'"
    )
    assert len(await _claim(db, limit=50)) == 19
    assert await db.fetchval("SELECT count(*) FROM outbox_policies") == 0


async def test_a_throttle_at_mail_slows_the_relay_from_its_observed_rate(db: asyncpg.Pool) -> None:
    await _fill(db, 50, "x.example")
    # 10 attempts finished in the last 2 seconds (OBSERVED_SECONDS): 5 mails a second.
    await db.execute(
        "INSERT INTO outbox_attempts (outbox_id, attempt, dispatcher, started_at, finished_at, "
        "outcome) SELECT id, 1, 'a', now() - interval '2 seconds', now() - interval '1 second', "
        "'sent' FROM outbox ORDER BY id LIMIT 10"
    )
    await _beat(db, "a")
    async with db.acquire() as conn:
        halved = await limits.record_throttles(conn, [Reply("deferred", 451, "mail", "x.example")])
    assert halved == {"": 2.5}
    relay = await _throttle(db, "")
    assert (relay["throttle_rate"], relay["throttle_base"]) == (2.5, 5.0)
    assert await db.fetchval("SELECT count(*) FROM outbox_policies") == 1
    assert await _claim(db) == []  # the bucket starts empty
    await db.execute(
        "UPDATE outbox_policies SET throttle_refreshed_at = throttle_refreshed_at "
        "- interval '1 second'"
    )
    assert len(await _claim(db)) == 2  # one second at 2.5/s


async def test_the_database_and_python_agree_on_the_throttle(db: asyncpg.Pool) -> None:
    await _policy(db, "a.example", rates=((30, 1, 30.0), (1000, 3600, 5.0)))
    async with db.acquire() as conn:
        await limits.record_throttles(conn, [Reply("deferred", 421, "rcpt", "a.example")])
    await db.execute(
        "UPDATE outbox_policies SET throttled_at = throttled_at - interval '7 seconds', "
        "throttle_refreshed_at = throttle_refreshed_at - interval '7 seconds'"
    )
    row = await _throttle(db, "a.example")
    # The slowest configured rate was halved.
    assert row["throttle_base"] == pytest.approx(1000 / 3600)
    [state] = await db.fetch(queries.POLICY_STATE, ["a.example"], STALE)
    expected = policy.effective_rate(row["throttle_rate"], row["throttled_at"], state["clock"])
    assert state["throttle_rate"] == pytest.approx(expected)
    assert state["throttle_tokens"] == pytest.approx(
        min(policy.bucket_capacity(expected), 7 * expected)
    )
    [listed] = await db.fetch(queries.LIST_POLICIES)
    assert list(listed["per_seconds"]) == [1, 3600]
    assert list(listed["max_counts"]) == [30, 1000]
    configured = [
        policy.Rate(c, p) for c, p in zip(listed["max_counts"], listed["per_seconds"], strict=True)
    ]
    throttle = policy.effective_rate(listed["throttle_rate"], listed["throttled_at"], listed["now"])
    assert policy.limiting_rate(configured, throttle) == throttle
