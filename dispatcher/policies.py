"""The operators' side of the sending policy: limits, pauses, the suppression list.

The public, framework-free module behind ``outbox limit|pause|resume|suppress|unsuppress|
suppressions`` and the admin endpoints of the sending policy; the dispatchers' side is
:mod:`dispatcher.limits`, the arithmetic :mod:`dispatcher.policy`. Every function takes an
asyncpg connection (or one borrowed from a pool) and returns frozen dataclasses. All SQL
is parameterised.

It writes outbox_policies, outbox_rate_limits and outbox_suppressions (migration 0007);
the dispatchers read them at every claim. A scope is all mail (``domain=None`` here,
``policy.ALL_MAIL`` in the tables) or one recipient domain, as its A-label in lower case.
A change to a scope locks its outbox_policies row first and its rate windows after it,
the order a claim takes them in, so it never deadlocks with a claim. A scope's row goes
once nothing is left on it (no limit, not paused, no throttle), so outbox_policies only
ever holds the scopes that have a policy.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final

import asyncpg

from outbox.dispatcher.addresses import (
    DOT_ATOM,
    QUOTED_STRING,
    ascii_domain,
    email_key,
    plain_text,
    smtp_address,
    unsafe_text,
)
from outbox.dispatcher.db import Connection
from outbox.dispatcher.policy import ALL_MAIL, Rate, effective_rate
from outbox.dispatcher.queries import NOTIFY_CHANNEL

__all__ = [
    "LIVE_SECONDS",
    "MAX_ADDRESS_LENGTH",
    "MAX_CONCURRENCY",
    "MAX_RATES",
    "MAX_REASON_LENGTH",
    "Policy",
    "RateWindow",
    "Suppression",
    "SuppressionPage",
    "Throttle",
    "address_key",
    "check_concurrency",
    "check_rates",
    "check_reason",
    "domain_name",
    "get_policy",
    "get_suppression",
    "list_policies",
    "list_suppressions",
    "mail_policies",
    "pause",
    "rate_words",
    "remove_limits",
    "resume",
    "scope_name",
    "set_limits",
    "suppress",
    "suppression_by_key",
    "unsuppress",
]

#: A dispatcher is live if it heartbeated within this many seconds.
LIVE_SECONDS: Final = 10
#: Most rate windows one scope may have (a claim takes a token from each).
MAX_RATES: Final = 10
#: Largest concurrency limit (mail of one scope in flight at once, fleet-wide).
MAX_CONCURRENCY: Final = 1_000_000
#: Longest suppression reason, in characters.
MAX_REASON_LENGTH: Final = 500
#: Longest address accepted for the suppression list (RFC 5321 allows 254 octets).
MAX_ADDRESS_LENGTH: Final = 320

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


@dataclass(frozen=True, slots=True)
class RateWindow:
    """One rate of a scope and its token bucket now."""

    count: int
    per_seconds: int
    #: Most mails that may go at once (the bucket's size).
    burst: float
    #: Tokens in the bucket now: mails that may go before the next refill.
    tokens: float

    @property
    def rate(self) -> Rate:
        """As operators write it (``str(window.rate) == "40/s"``)."""
        return Rate(self.count, self.per_seconds)

    @property
    def per_second(self) -> float:
        """The bucket's refill rate, mails per second."""
        return self.count / self.per_seconds


@dataclass(frozen=True, slots=True)
class Throttle:
    """The adaptive throttle of a scope: temporary refusals slowed it down."""

    #: Mails per second now (rising linearly until the next refusal: policy.effective_rate).
    rate: float
    #: Mails per second the last refusal halved.
    base: float
    #: When the last temporary refusal slowed it down.
    since: datetime


@dataclass(frozen=True, slots=True)
class Policy:
    """One scope's policy and its traffic now: all mail (``domain`` None) or a domain."""

    domain: str | None
    rates: tuple[RateWindow, ...] = ()
    #: Most mails of the scope being sent at once, fleet-wide; None: no limit.
    concurrency: int | None = None
    paused: bool = False
    #: Set while the adaptive throttle holds the scope below its base rate.
    throttle: Throttle | None = None
    #: Mails of the scope being sent now (``sending`` by a live dispatcher).
    in_flight: int = 0
    #: Pending mails of the scope that are due now.
    waiting: int = 0
    #: The last change of the scope's row; None when the scope has no policy.
    updated_at: datetime | None = None

    @property
    def name(self) -> str:
        """``all mail`` or the domain: how messages name the scope."""
        return scope_name(self.domain)


@dataclass(frozen=True, slots=True)
class Suppression:
    """An address no mail goes to."""

    address: str
    #: ``addresses.email_key`` of the address: one entry per mailbox.
    address_key: str
    #: ``smtp`` (the server refused the recipient permanently) or ``operator``.
    source: str
    reason: str
    #: The mail whose refusal put it on the list (None for an operator's entry).
    outbox_id: int | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class SuppressionPage:
    """The newest suppressions, and how many there are in all."""

    items: tuple[Suppression, ...]
    total: int


def scope_name(domain: str | None) -> str:
    """``all mail`` for None (or ``ALL_MAIL``), else the domain."""
    return domain or "all mail"


def rate_words(rate: float) -> str:
    """A rate in mails per second, in the unit that reads best: 2.5/s, 12/min, 3/h."""
    if rate >= 1:
        return f"{rate:.3g}/s"
    if rate * 60 >= 1:
        return f"{rate * 60:.3g}/min"
    return f"{rate * 3600:.3g}/h"


def domain_name(text: str) -> str:
    """A recipient domain as the limits name it: its A-label, lower case.

    ``bücher.de`` and ``XN--BCHER-KVA.de`` are both ``xn--bcher-kva.de``. ValueError
    saying what is wrong for anything that is not a domain name (no address literals, no
    trailing dot).
    """
    if not text:
        raise ValueError("a domain cannot be empty (leave it out for all mail)")
    if len(text) > 1000:  # before any IDNA work on it
        raise ValueError("a domain is at most 253 characters long")
    reason = unsafe_text(text)
    if reason is not None:
        raise ValueError(f"a domain {reason}")
    name = ascii_domain(text)
    if len(name) > 253 or not all(_LABEL.match(label) for label in name.split(".")):
        raise ValueError(
            f"{text!r} is not a domain name like example.com (labels of letters, digits "
            "and hyphens)"
        )
    return name


def _scope(domain: str | None) -> str:
    """The scope's key in the tables: ``ALL_MAIL`` for None, else the normalised domain."""
    return ALL_MAIL if domain is None else domain_name(domain)


def _domain(scope: str) -> str | None:
    return None if scope == ALL_MAIL else scope


def check_rates(rates: Sequence[Rate]) -> tuple[Rate, ...]:
    """The rates of one scope, shortest window first; ValueError when two share a window."""
    if len(rates) > MAX_RATES:
        raise ValueError(f"at most {MAX_RATES} rates, one per window")
    by_window: dict[int, Rate] = {}
    for rate in rates:
        if rate.count < 1 or not 1 <= rate.per_seconds <= 366 * 86400:
            raise ValueError(f"{rate} is not a rate: at least 1 mail per 1 second to 1 year")
        other = by_window.get(rate.per_seconds)
        if other is not None:
            raise ValueError(f"{other} and {rate} have the same window: give one rate per window")
        by_window[rate.per_seconds] = rate
    return tuple(by_window[seconds] for seconds in sorted(by_window))


def check_concurrency(value: int) -> int:
    """A concurrency limit, 1 to :data:`MAX_CONCURRENCY`; ValueError otherwise."""
    if not 1 <= value <= MAX_CONCURRENCY:
        raise ValueError(f"must be between 1 and {MAX_CONCURRENCY}, got {value}")
    return value


def address_key(address: str) -> str:
    """The suppression list's key of ``address`` (``addresses.email_key``); ValueError
    saying what is wrong for anything that is not one sendable address."""
    if not address:
        raise ValueError("an address cannot be empty")
    if len(address) > MAX_ADDRESS_LENGTH:
        raise ValueError(f"an address is at most {MAX_ADDRESS_LENGTH} characters long")
    reason = unsafe_text(address)
    if reason is not None:
        raise ValueError(f"an address {reason}")
    if any(ch.isspace() for ch in address):
        raise ValueError(f"{address!r} is not an address: it holds white space")
    local, _, domain = address.rpartition("@")
    if not (DOT_ATOM.fullmatch(local) or QUOTED_STRING.fullmatch(local)):
        # As every stored recipient is: anything else ("<ada", "a@b") matches no mail.
        raise ValueError(
            f"{address!r} is not an address: its local part is neither a dot-atom "
            "(ada.lovelace) nor a quoted string"
        )
    smtp_address(address)  # a full address whose local part can be sent
    domain_name(domain)
    return email_key(address)


def check_reason(reason: str) -> str:
    """A suppression reason: 1 to 500 characters of plain text; ValueError otherwise."""
    return plain_text(reason, "a reason", longest=MAX_REASON_LENGTH)


# The mail's scope (its recipient's domain) and mailbox (the suppression list's key).
_MAIL_SCOPE = "SELECT recipient_domain, recipient_key FROM outbox WHERE id = $1"

# Wakes idle dispatchers (delivered at commit): a change may free mail at once.
_NOTIFY = "SELECT pg_notify($1, '')"

# The traffic of scope {scope}: its mail in flight, as a claim counts it against a
# concurrency limit ('sending' under a lease still honoured: a dead dispatcher's rows do
# not count; outbox_in_flight_idx), and its pending mail that is due now
# (outbox_domain_claim_idx; for all mail, outbox_claim_idx).
_HONOURED = f"""o.lease_expires_at > now() AND EXISTS (
    SELECT 1 FROM dispatchers d
    WHERE d.name = o.lease_owner
      AND d.last_beat_at > now() - interval '{LIVE_SECONDS} seconds')"""
_TRAFFIC = f"""
CASE WHEN {{scope}} = '' THEN (SELECT count(*) FROM outbox o
                               WHERE o.status = 'sending' AND {_HONOURED})
     ELSE (SELECT count(*) FROM outbox o
           WHERE o.status = 'sending' AND o.recipient_domain = {{scope}} AND {_HONOURED})
END AS in_flight,
CASE WHEN {{scope}} = '' THEN (SELECT count(*) FROM outbox
                               WHERE status = 'pending' AND next_attempt_at <= now())
     ELSE (SELECT count(*) FROM outbox o
           WHERE o.status = 'pending' AND o.recipient_domain = {{scope}}
             AND o.next_attempt_at <= now())
END AS waiting
"""

# Every scope with a policy ($1 NULL), or the scopes named in $1, with the throttle as
# stored (policy.effective_rate makes its rate now of it) and the scope's traffic.
_POLICIES = f"""
SELECT p.domain, p.paused, p.concurrency, p.updated_at,
       p.throttle_rate, p.throttle_base, p.throttled_at, now() AS now,
       {_TRAFFIC.format(scope="p.domain")}
FROM outbox_policies p
WHERE $1::text[] IS NULL OR p.domain = ANY($1::text[])
ORDER BY p.domain
"""

# The traffic of a scope without a policy ($1).
_SCOPE_TRAFFIC = f"SELECT {_TRAFFIC.format(scope='$1::text')}"

# The rate windows of those scopes, each bucket refilled to now (at most its burst).
_RATE_WINDOWS = """
SELECT domain, per_seconds, max_count, burst,
       least(burst, tokens + greatest(0, extract(epoch FROM now() - refreshed_at)::float8)
                             * max_count::float8 / per_seconds) AS tokens_now
FROM outbox_rate_limits
WHERE $1::text[] IS NULL OR domain = ANY($1::text[])
ORDER BY domain, per_seconds
"""

# Lock a scope's row for a change that may delete it: the statements after this one see
# every change committed before the lock was granted (a concurrent `limit set`'s rates).
_LOCK_POLICY = "SELECT concurrency FROM outbox_policies WHERE domain = $1 FOR UPDATE"

# limit set: the scope's row, with the concurrency given ($2), else the one it had.
_UPSERT_LIMITS = """
INSERT INTO outbox_policies (domain, concurrency) VALUES ($1, $2)
ON CONFLICT (domain) DO UPDATE
SET concurrency = coalesce(excluded.concurrency, outbox_policies.concurrency),
    updated_at = now()
"""

# limit set --rate: the scope's windows become exactly $2 (per_seconds), $3 (count), $4
# (burst). A new window starts with a full bucket. A window that stays keeps what it has
# used (its bucket refilled to now under its old rate, at most the new burst): setting
# the same limit again must not hand out a fresh burst.
_REPLACE_RATES = """
WITH gone AS (
    DELETE FROM outbox_rate_limits WHERE domain = $1 AND per_seconds <> ALL($2::int[])
)
INSERT INTO outbox_rate_limits AS r (domain, per_seconds, max_count, burst, tokens,
                                     refreshed_at)
SELECT $1, n.per_seconds, n.max_count, n.burst, n.burst, now()
FROM unnest($2::int[], $3::int[], $4::float8[]) AS n(per_seconds, max_count, burst)
ON CONFLICT (domain, per_seconds) DO UPDATE
SET max_count = excluded.max_count,
    burst = excluded.burst,
    tokens = least(excluded.burst, r.burst,
                   r.tokens + greatest(0, extract(epoch FROM now() - r.refreshed_at)::float8)
                              * r.max_count::float8 / r.per_seconds),
    refreshed_at = now()
"""

_HAS_RATES = "SELECT EXISTS (SELECT 1 FROM outbox_rate_limits WHERE domain = $1)"

# limit rm: no rates and no concurrency left.
_CLEAR_LIMITS = """
WITH rates AS (DELETE FROM outbox_rate_limits WHERE domain = $1)
UPDATE outbox_policies SET concurrency = NULL, updated_at = now() WHERE domain = $1
"""

# A scope's row once nothing is left on it (run after _LOCK_POLICY or an upsert locked it).
_DROP_IF_EMPTY = """
DELETE FROM outbox_policies p
WHERE p.domain = $1 AND NOT p.paused AND p.concurrency IS NULL AND p.throttle_rate IS NULL
  AND NOT EXISTS (SELECT 1 FROM outbox_rate_limits r WHERE r.domain = p.domain)
"""

# pause: a row when the scope was not paused before (inserted or changed).
_PAUSE = """
INSERT INTO outbox_policies (domain, paused) VALUES ($1, true)
ON CONFLICT (domain) DO UPDATE SET paused = true, updated_at = now()
WHERE NOT outbox_policies.paused
RETURNING domain
"""

# resume: a row when the scope was paused.
_RESUME = """
UPDATE outbox_policies SET paused = false, updated_at = now()
WHERE domain = $1 AND paused
RETURNING domain
"""

_SUPPRESSION_COLUMNS = "address, address_key, source, reason, outbox_id, created_at"

# suppress: the entry, and whether this statement made it (an address already on the list
# keeps its entry: its source, reason and date).
_SUPPRESS = f"""
WITH added AS (
    INSERT INTO outbox_suppressions (address_key, address, source, reason)
    VALUES ($1, $2, 'operator', $3)
    ON CONFLICT (address_key) DO NOTHING
    RETURNING {_SUPPRESSION_COLUMNS}
)
SELECT {_SUPPRESSION_COLUMNS}, true AS created FROM added
UNION ALL
SELECT {_SUPPRESSION_COLUMNS}, false FROM outbox_suppressions
WHERE address_key = $1 AND NOT EXISTS (SELECT 1 FROM added)
"""

_UNSUPPRESS = "DELETE FROM outbox_suppressions WHERE address_key = $1 RETURNING address"

_SUPPRESSION = f"SELECT {_SUPPRESSION_COLUMNS} FROM outbox_suppressions WHERE address_key = $1"

_SUPPRESSIONS = f"""
SELECT {_SUPPRESSION_COLUMNS} FROM outbox_suppressions
ORDER BY created_at DESC, address_key
LIMIT $1
"""

_COUNT_SUPPRESSIONS = "SELECT count(*) FROM outbox_suppressions"


def _policies(
    records: Sequence[asyncpg.Record], windows: Sequence[asyncpg.Record]
) -> tuple[Policy, ...]:
    rates: dict[str, list[RateWindow]] = {}
    for w in windows:
        rates.setdefault(w["domain"], []).append(
            RateWindow(
                count=w["max_count"],
                per_seconds=w["per_seconds"],
                burst=w["burst"],
                tokens=w["tokens_now"],
            )
        )
    policies = []
    for r in records:
        throttle = None
        rate = effective_rate(r["throttle_rate"], r["throttled_at"], r["now"])
        if rate is not None:  # None once it has recovered
            throttle = Throttle(rate=rate, base=r["throttle_base"], since=r["throttled_at"])
        policies.append(
            Policy(
                domain=_domain(r["domain"]),
                rates=tuple(rates.get(r["domain"], ())),
                concurrency=r["concurrency"],
                paused=r["paused"],
                throttle=throttle,
                in_flight=int(r["in_flight"]),
                waiting=int(r["waiting"]),
                updated_at=r["updated_at"],
            )
        )
    return tuple(policies)


async def _read_policies(conn: Connection, scopes: Sequence[str] | None) -> tuple[Policy, ...]:
    records = await conn.fetch(_POLICIES, scopes)
    windows = await conn.fetch(_RATE_WINDOWS, scopes)
    return _policies(records, windows)


def _snapshot(conn: Connection) -> contextlib.AbstractAsyncContextManager[object]:
    """One read-only snapshot for several statements (the caller's, if it has one)."""
    if conn.is_in_transaction():
        return contextlib.nullcontext()
    return conn.transaction(isolation="repeatable_read", readonly=True)


async def list_policies(conn: Connection) -> tuple[Policy, ...]:
    """Every scope that has a policy (all mail first, then domains A to Z), in one
    snapshot: its rates with their buckets now, concurrency, pause, throttle, and its mail
    in flight and waiting."""
    async with _snapshot(conn):
        return await _read_policies(conn, None)


async def get_policy(conn: Connection, domain: str | None) -> Policy:
    """The policy of all mail (None) or of ``domain``: a scope without one has no limit
    and is not paused (its traffic is counted all the same). ValueError for a bad domain."""
    scope = _scope(domain)
    async with _snapshot(conn):
        found = await _read_policies(conn, [scope])
        if found:
            return found[0]
        traffic = await conn.fetchrow(_SCOPE_TRAFFIC, scope)
    assert traffic is not None
    return Policy(
        domain=_domain(scope), in_flight=int(traffic["in_flight"]), waiting=int(traffic["waiting"])
    )


async def set_limits(
    conn: Connection,
    domain: str | None,
    *,
    rates: Sequence[Rate] | None = None,
    concurrency: int | None = None,
) -> Policy:
    """Set the rates (replacing all of the scope's windows) and/or the concurrency limit
    of all mail (``domain`` None) or of ``domain``; what is not given is kept, and so are
    the pause and the throttle. ValueError for a bad domain, two rates with one window,
    or neither rates nor concurrency. Returns the scope's policy as it is now.
    """
    scope = _scope(domain)
    checked = check_rates(rates) if rates is not None else None
    if checked is not None and not checked:
        raise ValueError("give at least one rate")
    if concurrency is not None:
        check_concurrency(concurrency)
    if checked is None and concurrency is None:
        raise ValueError("give rates or a concurrency limit (or both)")
    async with conn.transaction():
        await conn.execute(_UPSERT_LIMITS, scope, concurrency)
        if checked is not None:
            await conn.execute(
                _REPLACE_RATES,
                scope,
                [r.per_seconds for r in checked],
                [r.count for r in checked],
                [r.burst for r in checked],
            )
        await conn.execute(_NOTIFY, NOTIFY_CHANNEL)  # a raised limit frees mail at once
    return await get_policy(conn, domain)


async def remove_limits(conn: Connection, domain: str | None) -> bool:
    """Remove the rates and the concurrency limit of all mail or of ``domain`` (a pause
    and the throttle stay); False when it had none. ValueError for a bad domain."""
    scope = _scope(domain)
    async with conn.transaction():
        row = await conn.fetchrow(_LOCK_POLICY, scope)
        if row is None:
            return False
        if row["concurrency"] is None and not await conn.fetchval(_HAS_RATES, scope):
            return False  # paused or throttled only: nothing to remove
        await conn.execute(_CLEAR_LIMITS, scope)
        await conn.execute(_DROP_IF_EMPTY, scope)
        await conn.execute(_NOTIFY, NOTIFY_CHANNEL)
    return True


async def pause(conn: Connection, domain: str | None) -> bool:
    """Hold all mail (``domain`` None) or the mail to ``domain``: no dispatcher claims it
    until :func:`resume`. False when it was paused already. ValueError for a bad domain."""
    scope = _scope(domain)
    async with conn.transaction():
        return await conn.fetchval(_PAUSE, scope) is not None


async def resume(conn: Connection, domain: str | None) -> bool:
    """Release what :func:`pause` held; idle dispatchers are woken. False when it was not
    paused. ValueError for a bad domain."""
    scope = _scope(domain)
    async with conn.transaction():
        await conn.execute(_LOCK_POLICY, scope)
        if await conn.fetchval(_RESUME, scope) is None:
            return False
        await conn.execute(_DROP_IF_EMPTY, scope)
        await conn.execute(_NOTIFY, NOTIFY_CHANNEL)
    return True


def _suppression(record: asyncpg.Record) -> Suppression:
    return Suppression(
        address=record["address"],
        address_key=record["address_key"],
        source=record["source"],
        reason=record["reason"],
        outbox_id=record["outbox_id"],
        created_at=record["created_at"],
    )


async def suppress(
    conn: Connection, address: str, reason: str | None = None
) -> tuple[Suppression, bool]:
    """Put ``address`` on the suppression list (source ``operator``): mail to it, whatever
    the spelling, ends ``suppressed`` instead of being sent. Returns the entry and whether
    it is new; an address already on the list keeps its entry. ValueError for an address
    that is not one sendable address, or a reason that is not plain text.
    """
    key = address_key(address)
    reason = check_reason(reason) if reason is not None else "suppressed by an operator"
    record = await conn.fetchrow(_SUPPRESS, key, address, reason)
    if record is None:
        # A concurrent statement added it after this one's snapshot was taken: the
        # statement again, with a fresh snapshot, sees that entry (or adds it anew).
        record = await conn.fetchrow(_SUPPRESS, key, address, reason)
        assert record is not None
    return _suppression(record), bool(record["created"])


async def unsuppress(conn: Connection, address: str) -> bool:
    """Take ``address`` (any spelling of it) off the suppression list; False when it was
    not on it. Mail already ``suppressed`` stays so (``retry`` sends it). ValueError for
    a bad address."""
    return await conn.fetchval(_UNSUPPRESS, address_key(address)) is not None


async def get_suppression(conn: Connection, address: str) -> Suppression | None:
    """The suppression list's entry for ``address`` (any spelling), or None."""
    return await suppression_by_key(conn, address_key(address))


async def suppression_by_key(conn: Connection, key: str) -> Suppression | None:
    """The suppression list's entry under ``key`` (:func:`address_key`), or None."""
    record = await conn.fetchrow(_SUPPRESSION, key)
    return _suppression(record) if record is not None else None


async def list_suppressions(conn: Connection, *, limit: int = 100) -> SuppressionPage:
    """The newest ``limit`` entries of the suppression list, and how many there are."""
    if not 1 <= limit <= 10_000:
        raise ValueError("limit must be between 1 and 10000")
    async with _snapshot(conn):
        records = await conn.fetch(_SUPPRESSIONS, limit)
        total = await conn.fetchval(_COUNT_SUPPRESSIONS)
    return SuppressionPage(items=tuple(_suppression(r) for r in records), total=int(total))


async def mail_policies(
    conn: Connection, outbox_id: int
) -> tuple[tuple[Policy, ...], Suppression | None] | None:
    """What the operators' controls hold for mail ``outbox_id``: the policies of all mail
    and of its domain (those that have one, in that order) and its recipient's entry on
    the suppression list; None if there is no such mail. Read in one snapshot (the
    caller's, if it has one)."""
    async with _snapshot(conn):
        mail = await conn.fetchrow(_MAIL_SCOPE, outbox_id)
        if mail is None:
            return None
        domain: str = mail["recipient_domain"]
        policies = {p.domain: p for p in await _read_policies(conn, [ALL_MAIL, domain])}
        entry = await conn.fetchrow(_SUPPRESSION, mail["recipient_key"])
    scopes = tuple(p for p in (policies.get(None), policies.get(domain)) if p is not None)
    return scopes, _suppression(entry) if entry is not None else None
