"""Log formats and levels: JSON lines by default, readable console lines in `outbox dev`."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from outbox.dispatcher import logs


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
