"""Sending policy, the pure part: rates as operators write them, and the arithmetic of a claim.

A rate ``40/s`` is at most 40 mails per second, fleet-wide. Each rate is a token bucket
(see ``outbox_rate_limits``): refilled at ``count / per_seconds`` mails per second and
holding at most ``burst`` tokens, by default one second's worth (at least one). So over
any stretch of ``t`` seconds a rate lets through at most ``rate * t + burst`` mails:
``50000/d`` is a steady 0.58 mails per second, never 50,000 at once.

Adaptive throttling: a 421, 450, 451 or 454 reply slows its scope down (the recipient's
domain for a reply to RCPT, all mail for one to MAIL or DATA, which the relay gives).
The scope's rate is halved, at most once a second, never below one mail a minute, then
rises linearly by the halved rate every :data:`RAMP_SECONDS` (additive increase: back
where it was after one ramp, and on, probing for what the server takes) until the next
signal halves it again; :data:`RECOVERY_SECONDS` without a signal end the throttle. The
database applies it (``dispatcher.limits``, ``dispatcher.queries``); the functions here
are the same arithmetic, for tests and for showing it to operators.
"""

from __future__ import annotations

import math
import re
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

__all__ = [
    "ALL_MAIL",
    "HALVING_INTERVAL",
    "MIN_THROTTLE_RATE",
    "OBSERVED_SECONDS",
    "RAMP_SECONDS",
    "RECOVERY_SECONDS",
    "RELAY_STAGES",
    "SLOW_DOWN_SHARE",
    "THROTTLE_CODES",
    "UNITS",
    "Allowance",
    "Rate",
    "ScopeState",
    "allowance",
    "bucket_capacity",
    "effective_rate",
    "halved",
    "limiting_rate",
    "observed_rate",
    "parse_rate",
    "scope_allowance",
    "throttle_scope",
    "throttle_start",
    "tokens_to_take",
]

#: The scope of a limit that applies to all mail (the SMTP relay as a whole).
ALL_MAIL = ""

#: Seconds per unit of a rate.
UNITS: dict[str, int] = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_RATE = re.compile(r"^\s*([0-9]{1,9})\s*/\s*([0-9]{0,6})\s*([smhd])\s*$")


@dataclass(frozen=True, slots=True)
class Rate:
    """``count`` mails per ``per_seconds`` seconds."""

    count: int
    per_seconds: int

    @property
    def per_second(self) -> float:
        """The steady rate in mails per second."""
        return self.count / self.per_seconds

    @property
    def burst(self) -> float:
        """Most mails that may go at once: one second's worth, at least one."""
        return max(1.0, self.per_second)

    def __str__(self) -> str:
        for unit, seconds in sorted(UNITS.items(), key=lambda item: -item[1]):
            if self.per_seconds % seconds == 0:
                multiple = self.per_seconds // seconds
                return f"{self.count}/{'' if multiple == 1 else multiple}{unit}"
        raise AssertionError("every per_seconds is a whole number of seconds")


def parse_rate(text: str) -> Rate:
    """``40/s``, ``1000/h``, ``50000/d``, ``10/5m``; ValueError saying what is wrong."""
    match = _RATE.match(text)
    if match is None:
        raise ValueError(
            f"{text!r} is not a rate like 40/s, 1000/h or 50000/d "
            "(a whole number, '/', then s, m, h or d)"
        )
    count, multiple, unit = int(match[1]), int(match[2] or 1), match[3]
    if count < 1 or multiple < 1:
        raise ValueError(f"{text!r}: a rate must allow at least 1 mail per at least 1 {unit}")
    per_seconds = multiple * UNITS[unit]
    if per_seconds > 366 * 86400:
        raise ValueError(f"{text!r}: the longest window is a year")
    return Rate(count, per_seconds)


# --- Adaptive throttling ---------------------------------------------------------------------

#: SMTP replies that mean "slow down": service not available / mailbox busy / local error /
#: temporary failure (421, 450, 451, 454), as providers answer a sender that goes too fast.
THROTTLE_CODES = frozenset({421, 450, 451, 454})
#: Stages at which such a reply is about the relay as a whole, not the recipient's domain.
RELAY_STAGES = frozenset({"mail", "data", "end_of_data"})
#: A throttle ends this many seconds after its last signal.
RECOVERY_SECONDS = 60.0
#: A throttled rate grows by itself every this many seconds (linearly).
RAMP_SECONDS = 10.0
#: A throttle halves a scope's rate at most once per this many seconds, however many
#: replies arrive (the mail in flight when the first came all answer the same).
HALVING_INTERVAL = 1.0
#: The slowest a throttle makes a scope: one mail a minute.
MIN_THROTTLE_RATE = 1 / 60
#: The throttle of a scope without a configured rate starts from the rate it was seen to
#: send at: attempts finished in the last this many seconds.
OBSERVED_SECONDS = 2.0


def throttle_scope(
    outcome: str, smtp_code: int | None, stage: str | None, domain: str
) -> str | None:
    """The scope a reply asks to slow down, or None when it is no throttle signal.

    A deferred attempt that got 421/450/451/454: at RCPT it is about the recipient's
    ``domain``; at MAIL, DATA or the end of data about the relay as a whole
    (:data:`ALL_MAIL`). At connect the server refused us, not a rate: no signal.
    """
    if outcome != "deferred" or smtp_code not in THROTTLE_CODES:
        return None
    if stage == "rcpt":
        return domain
    if stage in RELAY_STAGES:
        return ALL_MAIL
    return None


#: The relay is slowed down when at least this share of all attempts in the last
#: :data:`SLOW_DOWN_SECONDS` asked for it: a relay over its limit refuses most mail,
#: while its odd transient 451 at DATA (one mail in ten, say) is a retry, not a reason
#: to halve everyone's rate. A domain's RCPT reply speaks for that domain alone and
#: slows it at once.
SLOW_DOWN_SHARE = 0.25
SLOW_DOWN_SECONDS = 2.0


class SlowDowns:
    """One dispatcher's recent attempts and slow-down replies, counted per scope.

    :meth:`add` takes a batch of attempts, each as its :func:`throttle_scope` (None: no
    signal) and its mail's recipient domain, and returns the scopes to slow down: every
    domain with a signal in this batch, and the relay (:data:`ALL_MAIL`) when it has one
    and its signals are at least :data:`SLOW_DOWN_SHARE` of all attempts in the window.
    """

    def __init__(self, seconds: float = SLOW_DOWN_SECONDS) -> None:
        self._seconds = seconds
        self._recent: deque[tuple[float, str | None, tuple[str, ...]]] = deque()
        self._tried: Counter[str] = Counter()
        self._signals: Counter[str] = Counter()

    def add(self, now: float, attempts: Iterable[tuple[str | None, str]]) -> set[str]:
        """Count a batch finished at ``now`` (seconds, any clock); the scopes it slows."""
        asked = set()
        for scope, domain in attempts:
            scopes: tuple[str, ...] = (ALL_MAIL,) if domain == ALL_MAIL else (ALL_MAIL, domain)
            self._recent.append((now, scope, scopes))
            self._tried.update(scopes)
            if scope is not None:
                self._signals[scope] += 1
                asked.add(scope)
        while self._recent and self._recent[0][0] <= now - self._seconds:
            _, old_scope, old_scopes = self._recent.popleft()
            self._tried.subtract(old_scopes)
            if old_scope is not None:
                self._signals[old_scope] -= 1
        self._tried += Counter()  # drop the scopes no attempt counts any more
        self._signals += Counter()
        return {
            scope
            for scope in asked
            if scope != ALL_MAIL or self._signals[scope] >= SLOW_DOWN_SHARE * self._tried[scope]
        }


def effective_rate(rate: float | None, since: datetime | None, now: datetime) -> float | None:
    """A throttle's rate at ``now``, in mails per second; None when there is none.

    ``rate`` and ``since`` are ``outbox_policies.throttle_rate`` and ``throttled_at``: the
    rate starts at ``rate`` and grows by ``rate`` every :data:`RAMP_SECONDS`; the throttle
    ends :data:`RECOVERY_SECONDS` after ``since``.
    """
    if rate is None or since is None:
        return None
    elapsed = (now - since).total_seconds()
    if elapsed >= RECOVERY_SECONDS:
        return None
    return rate * (1 + max(0.0, elapsed) / RAMP_SECONDS)


def observed_rate(finished: int) -> float:
    """The rate a scope was seen to send at: ``finished`` attempts in the last
    :data:`OBSERVED_SECONDS`, at least one mail a second."""
    return max(1.0, finished / OBSERVED_SECONDS)


def throttle_start(effective: float | None, configured: Iterable[float], observed: float) -> float:
    """The rate a throttle signal halves: the ``effective`` throttled rate if the scope is
    throttled already, else its slowest ``configured`` rate, else its ``observed`` one."""
    if effective is not None:
        return effective
    return min(configured, default=observed)


def halved(rate: float) -> float:
    """Multiplicative decrease: half of ``rate``, never below :data:`MIN_THROTTLE_RATE`."""
    return max(MIN_THROTTLE_RATE, rate / 2)


def bucket_capacity(rate: float) -> float:
    """Tokens a throttled scope's bucket holds at most: one second's worth, at least one."""
    return max(1.0, rate)


def limiting_rate(configured: Iterable[Rate], throttle: float | None) -> float | None:
    """The steady rate a scope may send at, mails per second: the slowest of its
    ``configured`` rates and its ``throttle`` (see :func:`effective_rate`); None if none."""
    rates = [rate.per_second for rate in configured]
    if throttle is not None:
        rates.append(throttle)
    return min(rates, default=None)


# --- What one claim may take -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScopeState:
    """One scope's policy as a claim reads it, its buckets refilled to the database clock."""

    domain: str
    paused: bool = False
    #: Most mails of the scope in flight at once (None: no limit), and how many are.
    concurrency: int | None = None
    in_flight: int = 0
    #: The tokens in each rate window of the scope.
    window_tokens: tuple[float, ...] = ()
    #: The tokens in the throttle's bucket; None when the scope is not throttled.
    throttle_tokens: float | None = None

    @property
    def metered(self) -> bool:
        """True when mail of the scope takes tokens (it has a rate window or a throttle)."""
        return bool(self.window_tokens) or self.throttle_tokens is not None


@dataclass(frozen=True, slots=True)
class Allowance:
    """How much one claim may take."""

    #: Mails in all (the ``''`` scope's limits); None when nothing limits all mail.
    total: int | None = None
    #: Per domain with a limit: how many of its mails (possibly 0). Domains not named
    #: here are not limited, and their mail is claimed as usual.
    domains: Mapping[str, int] = field(default_factory=dict)


def _whole(tokens: float) -> int:
    # A bucket that holds 2.9999999999 after float arithmetic holds 3 tokens.
    return max(0, math.floor(tokens + 1e-9))


def scope_allowance(state: ScopeState) -> int | None:
    """How many mails of the scope may be claimed now; None when nothing limits it.

    The least of: each rate window's tokens, the throttle's tokens, the room under its
    concurrency limit; 0 when it is paused.
    """
    if state.paused:
        return 0
    limits = [_whole(tokens) for tokens in state.window_tokens]
    if state.throttle_tokens is not None:
        limits.append(_whole(state.throttle_tokens))
    if state.concurrency is not None:
        limits.append(max(0, state.concurrency - state.in_flight))
    return min(limits, default=None)


def allowance(states: Iterable[ScopeState]) -> Allowance:
    """What a claim may take, given every scope's state (:class:`ScopeState`).

    ``total`` comes from the ``''`` scope (all mail); each other scope that limits
    anything gets its own entry in ``domains``.
    """
    total: int | None = None
    domains: dict[str, int] = {}
    for state in states:
        allowed = scope_allowance(state)
        if state.domain == ALL_MAIL:
            total = allowed
        elif allowed is not None:
            domains[state.domain] = allowed
    return Allowance(total, domains)


def tokens_to_take(claimed: Iterable[str], states: Iterable[ScopeState]) -> dict[str, int]:
    """Tokens to take per scope for the mail just claimed (``claimed``: their recipient
    domains, one per mail that will be sent): one per mail from its domain and from
    ``''``, for the scopes that have a rate window or a throttle."""
    metered = {state.domain for state in states if state.metered}
    taken: dict[str, int] = {}
    for domain in claimed:
        for scope in (ALL_MAIL, domain) if domain != ALL_MAIL else (ALL_MAIL,):
            if scope in metered:
                taken[scope] = taken.get(scope, 0) + 1
    return taken
