"""Log formats and levels: JSON lines by default, readable console lines in `outbox dev`."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from hypothesis import given, seed
from hypothesis import strategies as st

from outbox.dispatcher import logs
from tests.hostile import SEED, hypothesis_settings


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """What the handler of the next :func:`_configure` writes (the root logger is restored)."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        yield io.StringIO()
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


def _configure(stream: io.StringIO, level: str, fmt: str = "json") -> None:
    logs.configure(level, fmt)
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)  # it writes to stderr, which pytest swaps at will


def _emit(level: int = logging.INFO) -> None:
    logging.getLogger("dispatcher").log(
        level,
        "mail.sent",
        extra={"outbox_id": 7, "recipient": "Ada <ada@example.com>", "reply": "250\r\nInjected"},
    )


def test_json_lines_by_default(captured: io.StringIO) -> None:
    _configure(captured, "INFO")
    _emit()
    entry = json.loads(captured.getvalue())
    assert entry["event"] == "mail.sent" and entry["level"] == "info"
    assert entry["outbox_id"] == 7 and entry["reply"] == "250\r\nInjected"


def test_console_lines_are_readable_and_stay_one_line(captured: io.StringIO) -> None:
    _configure(captured, "info", "console")
    _emit()
    line = captured.getvalue()
    assert line.count("\n") == 1  # the CR/LF in a value cannot forge a second line
    assert " INFO " in line and " dispatcher " in line and " mail.sent " in line
    assert "outbox_id=7" in line
    assert 'recipient="Ada <ada@example.com>"' in line
    assert 'reply="250\\r\\nInjected"' in line
    assert not line.startswith("{")


def test_the_level_is_a_threshold(captured: io.StringIO) -> None:
    _configure(captured, "WARNING", "console")
    _emit(logging.INFO)
    assert captured.getvalue() == ""
    _emit(logging.WARNING)
    assert " WARNING " in captured.getvalue()


class _Writes(io.StringIO):
    """A stream that remembers each write it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def _event(number: int) -> None:
    logging.getLogger("dispatcher").info("mail.sent", extra={"outbox_id": number})


def _ids(text: str) -> list[int]:
    return [json.loads(line)["outbox_id"] for line in text.splitlines()]


async def test_lines_of_one_loop_pass_go_out_in_one_write_in_order(
    captured: io.StringIO,
) -> None:
    stream = _Writes()
    _configure(stream, "INFO")
    for number in range(5):
        _event(number)
    assert stream.writes == []  # held until this pass of the loop ends
    await asyncio.sleep(0)
    assert len(stream.writes) == 1 and _ids(stream.getvalue()) == [0, 1, 2, 3, 4]
    _event(5)
    await asyncio.sleep(0)
    assert len(stream.writes) == 2 and _ids(stream.getvalue()) == [0, 1, 2, 3, 4, 5]


async def test_a_line_from_another_thread_goes_out_at_once_after_the_held_ones(
    captured: io.StringIO,
) -> None:
    stream = _Writes()
    _configure(stream, "INFO")
    _event(1)
    await asyncio.to_thread(_event, 2)  # no loop on that thread: written at once
    assert _ids(stream.getvalue()) == [1, 2]


def test_without_a_loop_each_line_is_written_at_once(captured: io.StringIO) -> None:
    stream = _Writes()
    _configure(stream, "INFO")
    _event(1)
    _event(2)
    assert _ids(stream.getvalue()) == [1, 2] and len(stream.writes) == 2


async def test_lines_held_when_the_process_ends_are_written_by_the_shutdown(
    captured: io.StringIO,
) -> None:
    stream = _Writes()
    _configure(stream, "INFO")
    _event(1)
    logging.getLogger().handlers[0].flush()  # what logging.shutdown() does at exit
    assert _ids(stream.getvalue()) == [1]


@seed(SEED)
@hypothesis_settings(2000)
@given(created=st.floats(min_value=0, max_value=2**33, allow_nan=False))
def test_the_timestamp_is_isoformat_to_the_millisecond(created: float) -> None:
    expected = datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")
    assert logs.timestamp(created) == expected


def test_lines_held_by_a_loop_that_closed_go_out_with_the_next_loops(
    captured: io.StringIO,
) -> None:
    stream = _Writes()
    _configure(stream, "INFO")
    first = asyncio.new_event_loop()
    first.call_soon(_event, 1)  # schedules its flush after the stop below
    first.call_soon(first.stop)
    first.run_forever()
    first.close()
    assert stream.writes == []  # the flush never ran

    async def log() -> None:
        _event(2)
        await asyncio.sleep(0)

    asyncio.run(log())
    assert _ids(stream.getvalue()) == [1, 2]
