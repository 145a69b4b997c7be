"""Fleet-wide sending policy, enforced through PostgreSQL: the policed claim and the throttle.

Every dispatcher, on every machine, claims through :func:`claim`. With no policy at all
it is the plain claim, one statement (``queries.CLAIM_UNLESS_POLICED``). With any, the
claim runs in a transaction that locks every ``outbox_policies`` row first: policed claims
of the whole fleet take turns, so each sees the tokens and the mail in flight exactly as
the previous one left them, and no limit is overrun by dispatchers claiming at once. The
turns are short (four statements) and mail of domains without limits still comes from one
index scan.

:func:`record_throttles` turns "slow down" replies (421, 450, 451, 454) into the adaptive
throttle of their scope (see :mod:`dispatcher.policy`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import asyncpg

from outbox.dispatcher import policy, queries
from outbox.dispatcher.db import Connection

__all__ = ["Claimed", "Reply", "claim", "record_throttles"]


@dataclass(frozen=True, slots=True)
class Claimed:
    """What :func:`claim` took, and whether any sending policy was in force."""

    rows: list[asyncpg.Record]
    #: True when the claim went the policed way: pass it as the next claim's ``policed``.
    policed: bool


async def claim(
    conn: Connection,
    *,
    limit: int,
    name: str,
    lease: float,
    stale_after: float,
    max_abandons: int,
    policed: bool = False,
) -> Claimed:
    """Claim up to ``limit`` due mails for dispatcher ``name`` within every sending policy.

    The rows are those of ``queries.CLAIM`` (same columns), leased for ``lease`` seconds;
    a ``sending`` row whose owner has not heartbeated for ``stale_after`` seconds is taken
    back, and failed on its ``max_abandons``-th abandonment. Runs in a transaction of its
    own, or in the caller's (which must be READ COMMITTED; the policy rows then stay
    locked until it ends). ``policed``: the previous claim found a policy, so this one
    goes the policed way at once (and falls back to the plain claim if none is left).
    """
    args = (limit, name, lease, stale_after, max_abandons)
    if not policed:
        # No policy: exactly the claim without limits (one statement, one round trip). It
        # claims nothing while any policy exists; only then is the policed claim needed.
        claimed = await conn.fetch(queries.CLAIM_UNLESS_POLICED, *args)
        if claimed or not await conn.fetchval(queries.POLICIES_EXIST):
            return Claimed(claimed, policed=False)
    if conn.is_in_transaction():
        return await _policed_claim(conn, *args)
    async with conn.transaction(isolation="read_committed"):
        return await _policed_claim(conn, *args)


async def _policed_claim(
    conn: Connection, limit: int, name: str, lease: float, stale_after: float, max_abandons: int
) -> Claimed:
    # (a) Lock every policy row, in domain order. Policed claims of all dispatchers take
    # turns from here to commit: that is what makes limits exact across the fleet. A
    # statement of its own, so that the next one reads what the previous turn committed.
    locked = [row["domain"] for row in await conn.fetch(queries.LOCK_POLICIES)]
    if not locked:  # no policy (any more): the plain claim
        rows = await conn.fetch(queries.CLAIM, limit, name, lease, stale_after, max_abandons)
        return Claimed(rows, policed=False)

    # (b) Each scope's buckets (refilled with the database's clock), pause, concurrency
    # and mail in flight, as of now, with every other claim's effect visible.
    rows = await conn.fetch(queries.POLICY_STATE, locked, stale_after)
    states = [
        policy.ScopeState(
            domain=row["domain"],
            paused=row["paused"],
            concurrency=row["concurrency"],
            in_flight=row["in_flight"],
            window_tokens=tuple(row["window_tokens"]),
            throttle_tokens=row["throttle_tokens"],
        )
        for row in rows
    ]
    clock = rows[0]["clock"] if rows else None
    # A throttle that ran its course no longer limits (POLICY_STATE gave it no tokens);
    # clear it now, while its row is locked, and drop a row it leaves empty.
    expired = [row["domain"] for row in rows if row["throttle_expired"]]
    if expired:
        await conn.execute(queries.EXPIRE_THROTTLES, expired, clock)

    # (c) What may be claimed: pure arithmetic (dispatcher.policy.allowance).
    allowed = policy.allowance(states)
    total = limit if allowed.total is None else min(limit, allowed.total)
    if total <= 0:  # all mail paused, or out of tokens or room: nothing is claimed
        return Claimed([], policed=True)

    # (d) Claim: mail of unlimited domains as usual, each limited domain up to its own
    # allowance, all of it in priority order and at most ``total``; a domain that may
    # take nothing now holds up nobody else's mail.
    open_domains = [domain for domain, n in allowed.domains.items() if n > 0]
    claimed: list[asyncpg.Record] = await conn.fetch(
        queries.POLICED_CLAIM,
        total,
        name,
        lease,
        stale_after,
        max_abandons,
        list(allowed.domains),
        open_domains,
        [allowed.domains[domain] for domain in open_domains],
    )

    # (e) One token per mail to be sent from every bucket of its domain and of all mail.
    # A suppressed recipient's mail is not sent, so it takes none.
    taken = policy.tokens_to_take(
        (row["recipient_domain"] for row in claimed if not row["suppressed"]), states
    )
    if taken:
        await conn.execute(queries.TAKE_TOKENS, list(taken), list(taken.values()), clock)
    return Claimed(claimed, policed=True)


@dataclass(frozen=True, slots=True)
class Reply:
    """The outcome of one attempt, as far as throttling is concerned."""

    #: The attempt's outcome ('sent', 'deferred', 'failed', ...).
    outcome: str
    smtp_code: int | None
    #: The SMTP step the reply answered (dispatcher.smtp.Stage).
    stage: str | None
    #: The mail's ``recipient_domain`` (a claimed row has it).
    recipient_domain: str


async def record_throttles(
    conn: Connection, events: Iterable[Reply], recent: policy.SlowDowns | None = None
) -> dict[str, float]:
    """Slow down the scopes that enough of ``events`` asked to (``policy.SlowDowns``).

    See :func:`dispatcher.policy.throttle_scope` for which replies count and for which
    scope, and ``policy.SLOW_DOWN_SHARE`` for how many make a signal: counted over the
    recent attempts of ``recent`` (a dispatcher keeps one), else over ``events`` alone.
    Each such scope's
    rate is halved, at most once a second however many replies and dispatchers report
    it; it then recovers over a minute. One statement; joins the
    caller's transaction if there is one (the recorder's, say). Returns the scopes halved
    now, with their new rate in mails per second.
    """
    attempts = [
        (
            policy.throttle_scope(
                event.outcome, event.smtp_code, event.stage, event.recipient_domain
            ),
            event.recipient_domain,
        )
        for event in events
    ]
    scopes = (recent or policy.SlowDowns()).add(time.monotonic(), attempts)
    if not scopes:
        return {}
    rows = await conn.fetch(queries.THROTTLE, sorted(scopes))
    return {row["domain"]: row["throttle_rate"] for row in rows}
