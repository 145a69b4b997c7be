"""Sending policy, the pure part: rates as operators write them.

A rate ``40/s`` is at most 40 mails per second, fleet-wide. Each rate is a token bucket
(see ``outbox_rate_limits``): refilled at ``count / per_seconds`` mails per second and
holding at most ``burst`` tokens, by default one second's worth (at least one). So over
any stretch of ``t`` seconds a rate lets through at most ``rate * t + burst`` mails:
``50000/d`` is a steady 0.58 mails per second, never 50,000 at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["ALL_MAIL", "UNITS", "Rate", "parse_rate"]

#: The scope of a limit that applies to all mail (the SMTP relay as a whole).
ALL_MAIL = ""

#: Seconds per unit of a rate.
UNITS: dict[str, int] = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_RATE = re.compile(r"^\s*(\d{1,9})\s*/\s*(\d{0,6})\s*([smhd])\s*$")


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
