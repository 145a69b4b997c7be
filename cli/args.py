"""argparse value types that reject bad input with a message naming the problem."""

from __future__ import annotations

import argparse
import re
from datetime import UTC, datetime, timedelta

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """A number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def port(text: str) -> int:
    """A TCP port, 1-65535."""
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a port between 1 and 65535, got {value}")
    return value


def duration(text: str) -> timedelta:
    """An age such as ``30d``, ``12h``, ``90m``, ``45s`` or ``2w``."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhdw])\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected an age like 30d, 12h, 90m or 45s, got {text!r}")
    return timedelta(seconds=int(match[1]) * _UNITS[match[2]])


#: The largest id a bigint column holds.
MAX_ID = 2**63 - 1


def outbox_id(text: str) -> int:
    """An outbox row id: a whole number from 1 to 2**63-1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a mail id (a whole number), got {text!r}"
        ) from None
    if not 1 <= value <= MAX_ID:
        raise argparse.ArgumentTypeError(f"a mail id is a number from 1 to {MAX_ID}, got {value}")
    return value


def page_size(text: str) -> int:
    """A number of rows per page, 1-10000."""
    value = positive_int(text)
    if value > 10_000:
        raise argparse.ArgumentTypeError(f"must be at most 10000, got {value}")
    return value


def timestamp(text: str) -> datetime:
    """A point in time: ISO 8601 (``2026-11-24``, ``2026-11-24T10:00``, with or without an
    offset; no offset means UTC) or an age meaning "that long ago" (``2h``, ``30d``)."""
    if re.fullmatch(r"\s*\d+\s*[smhdw]\s*", text):
        return datetime.now(UTC) - duration(text)
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a time like 2026-11-24, 2026-11-24T10:00:00+01:00 or an age like 2h, "
            f"got {text!r}"
        ) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
