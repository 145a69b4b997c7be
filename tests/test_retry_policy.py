"""The retry policy (dispatcher.retry) as a table: no database, no SMTP, no randomness."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from outbox.dispatcher.backoff import full_jitter
from outbox.dispatcher.daemon import DispatcherConfig
from outbox.dispatcher.retry import Decision, decide
from outbox.dispatcher.smtp import SendResult, Verdict

CONFIG = DispatcherConfig(
    name="policy", max_attempts=5, max_age=3600.0, retry_base=10.0, retry_cap=100.0
)

SENT = SendResult(Verdict.SENT, 250, "2.0.0 queued")
REFUSED = SendResult(Verdict.PERMANENT, 550, "5.1.1 no such user", stage="rcpt")
UNRENDERABLE = SendResult(Verdict.PERMANENT, error="cannot render the message: x", stage="render")
BUSY = SendResult(Verdict.TRANSIENT, 451, "4.3.0 try again later", stage="data")
DROPPED = SendResult(
    Verdict.TRANSIENT, error="SMTPServerDisconnected: lost", connection_problem=True, stage="mail"
)
LOST_REPLY = SendResult(
    Verdict.UNKNOWN, error="SMTPReadTimeoutError: timed out", connection_problem=True
)


def widest(attempt: int, base: float, cap: float) -> float:
    """The top of the full-jitter window: the delay a test can predict."""
    return min(cap, base * 2.0 ** (attempt - 1))


@pytest.mark.parametrize(
    ("result", "attempt", "age", "expected"),
    [
        # Sent and permanent are final whatever the attempt and age.
        (SENT, 1, 0.0, Decision("sent")),
        (SENT, 5, 7200.0, Decision("sent")),
        (REFUSED, 1, 0.0, Decision("failed")),  # the reply says why; no error of its own
        (REFUSED, 5, 7200.0, Decision("failed")),
        (UNRENDERABLE, 1, 0.0, Decision("failed", error="cannot render the message: x")),
        # Transient: retried after the jittered delay, keeping its own error.
        (BUSY, 1, 0.0, Decision("deferred", retry_in=10.0)),
        (BUSY, 3, 60.0, Decision("deferred", retry_in=40.0)),
        (BUSY, 4, 60.0, Decision("deferred", retry_in=80.0)),
        (DROPPED, 4, 60.0, Decision("deferred", 80.0, "SMTPServerDisconnected: lost")),
        # Unknown (the server may have the mail): retried too, and counted apart.
        (LOST_REPLY, 2, 60.0, Decision("unknown", 20.0, "SMTPReadTimeoutError: timed out")),
        # Max attempts: the last transient failure fails the mail, naming the reply ...
        (
            BUSY,
            5,
            100.0,
            Decision(
                "failed", error="gave up after 5 attempts over 100s: 451 4.3.0 try again later"
            ),
        ),
        (
            DROPPED,
            6,
            100.0,
            Decision(
                "failed", error="gave up after 6 attempts over 100s: SMTPServerDisconnected: lost"
            ),
        ),
        # ... or the error, and warns when the last one may have been delivered.
        (
            LOST_REPLY,
            5,
            100.0,
            Decision(
                "failed",
                error="gave up after 5 attempts over 100s (the last one may have been "
                "delivered): SMTPReadTimeoutError: timed out",
            ),
        ),
        # Max age: however few the attempts.
        (
            BUSY,
            1,
            3600.0,
            Decision(
                "failed", error="gave up after 1 attempts over 3600s: 451 4.3.0 try again later"
            ),
        ),
        (BUSY, 1, 3599.4, Decision("deferred", retry_in=10.0)),
    ],
)
def test_the_policy_table(result: SendResult, attempt: int, age: float, expected: Decision) -> None:
    assert decide(result, attempt, age, CONFIG, jitter=widest) == expected


def test_the_delay_is_full_jitter_within_the_capped_window() -> None:
    random.seed(7)
    for attempt, top in [(1, 10.0), (2, 20.0), (3, 40.0), (4, 80.0)]:
        delays = [decide(BUSY, attempt, 0.0, CONFIG).retry_in for _ in range(300)]
        assert all(0.0 <= d <= top for d in delays)
        # Spread over the whole window, not bunched at its top or bottom.
        assert min(delays) < top * 0.1 and max(delays) > top * 0.9
    patient = replace(CONFIG, max_attempts=100)
    capped = [decide(BUSY, 60, 0.0, patient).retry_in for _ in range(300)]
    assert all(0.0 <= d <= 100.0 for d in capped) and max(capped) > 90.0


def test_the_jitter_is_asked_for_the_attempt_and_the_configured_window() -> None:
    asked: list[tuple[int, float, float]] = []

    def jitter(attempt: int, base: float, cap: float) -> float:
        asked.append((attempt, base, cap))
        return 1.5

    assert decide(LOST_REPLY, 3, 0.0, CONFIG, jitter=jitter).retry_in == 1.5
    assert decide(SENT, 3, 0.0, CONFIG, jitter=jitter).retry_in == 0.0
    assert decide(BUSY, 5, 0.0, CONFIG, jitter=jitter).outcome == "failed"
    assert asked == [(3, 10.0, 100.0)]  # final decisions draw no delay


def test_full_jitter_never_overflows() -> None:
    assert 0.0 <= full_jitter(10_000, 5.0, 1800.0) <= 1800.0
