"""The one grammar for ages and points in time, shared by the CLI and the HTTP API.

An age is a whole number and a unit: ``45s``, ``90m``, ``12h``, ``30d``, ``2w``. A point
in time is ISO 8601 (``2026-11-24``, ``2026-11-24T10:00``, ``2026-11-24T10:00:00+01:00``,
``...Z``; no offset means UTC) or an age, meaning that long ago. Anything else is a
ValueError whose message shows what is expected.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_AGE = re.compile(r"\s*([0-9]+)\s*([smhdw])\s*")  # ASCII digits: "٣d" is no age
#: No age is longer than this (and timedelta cannot hold much more).
MAX_AGE = timedelta(days=100 * 365)

AGE_EXAMPLES = "30d, 12h, 90m or 45s"
TIME_EXAMPLES = "2026-11-24, 2026-11-24T10:00:00+01:00 or an age like 2h"


def parse_age(text: str) -> timedelta:
    """An age such as ``30d``, ``12h``, ``90m``, ``45s`` or ``2w``."""
    match = _AGE.fullmatch(text)
    if not match:
        raise ValueError(f"expected an age like {AGE_EXAMPLES}, got {_shown(text)}")
    # Twelve digits of seconds are past the limit already (and int() of thousands of
    # digits fails with a message about Python, not about ages).
    digits = match[1].lstrip("0") or "0"
    if len(digits) > 12 or int(digits) * _UNITS[match[2]] > MAX_AGE.total_seconds():
        raise ValueError(f"an age must be at most 100 years, got {_shown(text)}")
    return timedelta(seconds=int(digits) * _UNITS[match[2]])


def _shown(text: str) -> str:
    """``text`` quoted for an error message, cut short if long."""
    return repr(text) if len(text) <= 40 else repr(text[:40]) + "..."


def parse_time(text: str, *, now: datetime | None = None) -> datetime:
    """A point in time (timezone-aware): ISO 8601, or an age meaning that long before ``now``."""
    if _AGE.fullmatch(text):
        return (now or datetime.now(UTC)) - parse_age(text)
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"expected a time like {TIME_EXAMPLES}, got {_shown(text)}") from None
    value = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00+01:00 is before the year 1 in UTC
        raise ValueError(f"time out of range: {_shown(text)}") from None
