"""The one grammar for times and ages, shared by the CLI and the HTTP API."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta, timezone

import pytest

from outbox.cli import args
from outbox.dispatcher import times

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "age"),
    [
        ("45s", timedelta(seconds=45)),
        ("90m", timedelta(minutes=90)),
        ("2h", timedelta(hours=2)),
        (" 30d ", timedelta(days=30)),
        ("2w", timedelta(weeks=2)),
        ("0s", timedelta(0)),
        ("0000000000000000007d", timedelta(days=7)),
    ],
)
def test_ages(text: str, age: timedelta) -> None:
    assert times.parse_age(text) == age
    assert times.parse_time(text, now=NOW) == NOW - age


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-24", datetime(2026, 11, 24, tzinfo=UTC)),
        ("2026-11-24T10:00", datetime(2026, 11, 24, 10, tzinfo=UTC)),
        ("2026-11-24T10:00:00Z", datetime(2026, 11, 24, 10, tzinfo=UTC)),
        ("2026-11-24T10:00:00+01:00", datetime(2026, 11, 24, 9, tzinfo=UTC)),
    ],
)
def test_iso_8601_without_an_offset_is_utc(text: str, expected: datetime) -> None:
    value = times.parse_time(text)
    assert value == expected and value.tzinfo is not None
    assert value.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    "text",
    [
        *("", "2", "h", "2 hours", "1y", "-2h", "2.5h", "yesterday", "2026-13-01"),
        "99999999999d",
        "9" * 5000 + "d",  # int() of it fails with a message about Python's digit limit
        "\u0663d",  # ARABIC-INDIC DIGIT THREE: int() reads it as 3
    ],
)
def test_anything_else_is_refused_saying_what_is_expected(text: str) -> None:
    with pytest.raises(ValueError, match=r"expected a time like|at most 100 years") as refused:
        times.parse_time(text)
    assert len(str(refused.value)) < 200


def test_times_that_do_not_exist_in_utc_are_refused() -> None:
    with pytest.raises(ValueError, match="out of range"):
        times.parse_time("0001-01-01T00:00:00+01:00")
    far = datetime(9999, 12, 31, 23, tzinfo=timezone(timedelta(hours=-2)))
    with pytest.raises(ValueError, match="out of range"):
        times.parse_time(far.isoformat())


def test_the_cli_uses_the_same_grammar() -> None:
    assert args.duration("12h") == timedelta(hours=12)
    assert abs(args.timestamp("1h") - (datetime.now(UTC) - timedelta(hours=1))) < timedelta(
        seconds=5
    )
    for bad in ("12", "forever"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected an age like"):
            args.duration(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="expected a time like"):
        args.timestamp("tomorrow")


def test_cli_numbers_are_ascii_digits() -> None:
    # int() and float() read other scripts' digits too: `outbox show ٣` showed mail 3.
    for parse in (args.positive_int, args.positive_float, args.outbox_id):
        assert parse("3") == 3
        with pytest.raises(argparse.ArgumentTypeError, match="expected"):
            parse("\u0663")
