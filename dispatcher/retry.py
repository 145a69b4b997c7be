"""The retry policy: what an attempt's result means for its mail. Pure, no I/O.

Sent is sent and a permanent refusal fails at once. Anything else is retried after a
capped exponential delay with full jitter, until the mail has had ``max_attempts``
attempts or is ``max_age`` seconds old; then it fails, saying why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from outbox.dispatcher.backoff import full_jitter
from outbox.dispatcher.smtp import SendResult, Verdict

__all__ = ["Decision", "Jitter", "RetrySettings", "decide", "failure_text"]

#: ``(attempt, base, cap) -> seconds``: the delay before retry number ``attempt``.
Jitter = Callable[[int, float, float], float]


class RetrySettings(Protocol):
    """The part of the dispatcher's configuration the policy reads."""

    @property
    def max_attempts(self) -> int: ...
    @property
    def max_age(self) -> float: ...
    @property
    def retry_base(self) -> float: ...
    @property
    def retry_cap(self) -> float: ...


@dataclass(frozen=True, slots=True)
class Decision:
    """What to record for an attempt."""

    outcome: str  # sent | failed | deferred | unknown
    #: Seconds until the next attempt (deferred and unknown only).
    retry_in: float = 0.0
    error: str | None = None


def decide(
    result: SendResult,
    attempt: int,
    age: float,
    config: RetrySettings,
    *,
    jitter: Jitter = full_jitter,
) -> Decision:
    """The decision for attempt number ``attempt`` of a mail ``age`` seconds old."""
    if result.verdict is Verdict.SENT:
        return Decision("sent")
    if result.verdict is Verdict.PERMANENT:
        return Decision("failed", error=result.error)
    if attempt >= config.max_attempts or age >= config.max_age:
        why = f"gave up after {attempt} attempts over {age:.0f}s"
        if result.verdict is Verdict.UNKNOWN:
            why += " (the last one may have been delivered)"
        return Decision("failed", error=f"{why}: {failure_text(result)}")
    delay = jitter(attempt, config.retry_base, config.retry_cap)
    outcome = "unknown" if result.verdict is Verdict.UNKNOWN else "deferred"
    return Decision(outcome, retry_in=delay, error=result.error)


def failure_text(result: SendResult) -> str:
    """What went wrong: the error, else the server's reply."""
    return result.error or f"{result.smtp_code} {result.smtp_reply}"
