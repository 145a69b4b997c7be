"""Retry delays: capped exponential backoff with full jitter."""

from __future__ import annotations

import random


def full_jitter(attempt: int, base: float, cap: float) -> float:
    """A random delay in [0, min(cap, base * 2**(attempt-1))] seconds.

    Full jitter spreads retries of many mails (or many dispatchers) that failed together
    over the whole window instead of letting them return in lockstep.
    """
    exponent = min(max(attempt - 1, 0), 62)
    return random.uniform(0.0, min(cap, base * 2.0**exponent))
