"""dispatcher.policy: the arithmetic of limits and of the adaptive throttle (pure, no I/O)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from outbox.dispatcher.policy import (
    ALL_MAIL,
    MIN_THROTTLE_RATE,
    RECOVERY_SECONDS,
    Allowance,
    Rate,
    ScopeState,
    SlowDowns,
    allowance,
    bucket_capacity,
    effective_rate,
    halved,
    limiting_rate,
    observed_rate,
    scope_allowance,
    throttle_scope,
    throttle_start,
    tokens_to_take,
)

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (ScopeState("d"), None),  # a row that limits nothing
        (ScopeState("d", paused=True, window_tokens=(50.0,)), 0),
        (ScopeState("d", window_tokens=(10.0,)), 10),
        (ScopeState("d", window_tokens=(10.0, 3.5)), 3),  # the emptiest window
        (ScopeState("d", window_tokens=(2.9999999999,)), 3),  # float dust
        (ScopeState("d", window_tokens=(0.99,)), 0),
        (ScopeState("d", window_tokens=(-1.5,)), 0),  # a debt is no allowance
        (ScopeState("d", throttle_tokens=1.7), 1),
        (ScopeState("d", window_tokens=(10.0,), throttle_tokens=4.2), 4),
        (ScopeState("d", concurrency=5, in_flight=3), 2),
        (ScopeState("d", concurrency=5, in_flight=7), 0),  # over after the limit was lowered
        (ScopeState("d", concurrency=5, in_flight=0, window_tokens=(8.0,)), 5),
        (ScopeState("d", concurrency=5, in_flight=4, window_tokens=(8.0,), throttle_tokens=3.0), 1),
    ],
)
def test_scope_allowance(state: ScopeState, expected: int | None) -> None:
    assert scope_allowance(state) == expected


def test_allowance_splits_all_mail_from_domains() -> None:
    assert allowance([]) == Allowance(None, {})
    states = [
        ScopeState(ALL_MAIL, window_tokens=(7.4,)),
        ScopeState("paused.example", paused=True),
        ScopeState("full.example", concurrency=2, in_flight=2),
        ScopeState("slow.example", window_tokens=(3.0,)),
        ScopeState("leftover.example"),  # nothing limits it: not policed at all
    ]
    assert allowance(states) == Allowance(
        7, {"paused.example": 0, "full.example": 0, "slow.example": 3}
    )
    assert allowance([ScopeState(ALL_MAIL, paused=True, window_tokens=(9.0,))]).total == 0
    assert allowance([ScopeState(ALL_MAIL)]).total is None


def test_tokens_are_taken_from_metered_scopes_only() -> None:
    states = [
        ScopeState(ALL_MAIL, window_tokens=(10.0,)),
        ScopeState("a.example", window_tokens=(5.0,)),
        ScopeState("b.example", concurrency=3),  # no bucket: nothing to take
        ScopeState("c.example", throttle_tokens=2.0),
    ]
    claimed = ["a.example", "a.example", "b.example", "c.example", "other.example"]
    assert tokens_to_take(claimed, states) == {ALL_MAIL: 5, "a.example": 2, "c.example": 1}
    assert tokens_to_take(claimed, states[1:]) == {"a.example": 2, "c.example": 1}
    assert tokens_to_take([], states) == {}


@pytest.mark.parametrize(
    ("outcome", "code", "stage", "scope"),
    [
        ("deferred", 421, "rcpt", "slow.example"),
        ("deferred", 450, "rcpt", "slow.example"),
        ("deferred", 451, "rcpt", "slow.example"),
        ("deferred", 454, "rcpt", "slow.example"),
        ("deferred", 421, "mail", ALL_MAIL),
        ("deferred", 451, "data", ALL_MAIL),
        ("deferred", 451, "end_of_data", ALL_MAIL),
        ("deferred", 421, "connect", None),  # the server refused us, not a rate
        ("deferred", 452, "rcpt", None),  # too many recipients: not a throttle
        ("deferred", 552, "rcpt", None),
        ("deferred", None, "rcpt", None),  # a timeout
        ("failed", 550, "rcpt", None),
        ("sent", 250, "end_of_data", None),
        ("unknown", 451, "end_of_data", None),
    ],
)
def test_throttle_signals(outcome: str, code: int | None, stage: str, scope: str | None) -> None:
    assert throttle_scope(outcome, code, stage, "slow.example") == scope


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (-1.0, 10.0),  # a clock a little behind: not rising yet
        (0.0, 10.0),
        (5.0, 15.0),  # + the halved rate every RAMP_SECONDS (10)
        (10.0, 20.0),
        (59.0, 69.0),
        (RECOVERY_SECONDS, None),  # a minute without a refusal: the throttle is over
        (3600.0, None),
    ],
)
def test_effective_rate_rises_linearly_until_the_throttle_ends(
    seconds: float, expected: float
) -> None:
    now = T0 + timedelta(seconds=seconds)
    assert effective_rate(10.0, T0, now) == pytest.approx(expected)


def test_no_throttle_has_no_effective_rate() -> None:
    assert effective_rate(None, None, T0) is None


def test_multiplicative_decrease() -> None:
    assert halved(100.0) == 50.0
    assert halved(0.02) == MIN_THROTTLE_RATE  # never below one mail a minute
    assert halved(MIN_THROTTLE_RATE) == MIN_THROTTLE_RATE
    # The rate halved: the throttled one, else the slowest configured, else the observed.
    assert throttle_start(12.0, [40.0, 0.5], 3.0) == 12.0
    assert throttle_start(None, [40.0, 0.5], 3.0) == 0.5
    assert throttle_start(None, [], 3.0) == 3.0
    assert observed_rate(0) == 1.0  # at least one a second
    assert observed_rate(55) == 27.5  # over the last 2 seconds


def test_bucket_and_limiting_rate() -> None:
    assert bucket_capacity(0.1) == 1.0
    assert bucket_capacity(40.0) == 40.0
    rates = [Rate(40, 1), Rate(1000, 3600)]
    assert limiting_rate(rates, None) == pytest.approx(1000 / 3600)
    assert limiting_rate(rates, 0.1) == 0.1
    assert limiting_rate([], 2.0) == 2.0
    assert limiting_rate([], None) is None


def test_the_relay_slows_down_only_when_enough_of_its_recent_attempts_ask() -> None:
    relay = throttle_scope("deferred", 451, "end_of_data", "a.example")
    busy = throttle_scope("deferred", 450, "rcpt", "busy.example")
    recent = SlowDowns(seconds=2.0)
    # A relay's odd 451 among many sent mails (one in ten) is a retry, not a slow-down,
    # however small the batch it comes in.
    assert recent.add(0.0, [(None, "a.example")] * 9) == set()
    assert recent.add(0.1, [(relay, "a.example")]) == set()
    # A provider over its limit refuses most of what is tried.
    assert recent.add(0.2, [(relay, "a.example")] * 3) == {ALL_MAIL}
    # Old attempts leave the window: the same batch alone now is a majority.
    assert recent.add(5.0, [(relay, "a.example"), (None, "a.example")]) == {ALL_MAIL}
    # A domain's RCPT reply speaks for that domain: it slows down at once, however much
    # other mail went through.
    mixed = [(busy, "busy.example")] + [(None, "busy.example"), (None, "b.example")] * 20
    assert recent.add(10.0, mixed) == {"busy.example"}
    # Without a signal in the batch nothing is slowed again.
    assert recent.add(10.5, [(None, "busy.example")]) == set()
    assert SlowDowns().add(0.0, []) == set()
