"""Structured logging: one JSON object per line, with the event's fields at top level.

Log with ``log.info("mail.sent", extra={"outbox_id": 1, "message_id": "<...>"})``; the
message is the event name and every ``extra`` key becomes a field. ``LOG_FORMAT=console``
(the default of ``outbox dev``) prints the same records as one readable line each
(``12:00:01.234 INFO  dispatcher  mail.sent outbox_id=1 ...``); ``LOG_LEVEL`` sets the
threshold everywhere.

Lines logged on an event loop's thread are written together once the loop's current
pass ends (a dispatcher logs a line per mail: one write for a batch of outcomes, not one
each); elsewhere each line is written at once. Logging's own shutdown, at exit, writes
out whatever is still held.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import sys
import time
from datetime import datetime
from typing import Any

# Attributes every LogRecord has; anything else on a record came from ``extra``.
# (uvicorn's color_message is the event again, with terminal colour codes.)
_STANDARD = set(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}


#: One encoder for every line: ``json.dumps`` with options builds a new one per call.
_ENCODE = json.JSONEncoder(default=str, ensure_ascii=False).encode


class JsonFormatter(logging.Formatter):
    """Format records as single-line JSON: ts, level, logger, event, then the extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        entry.update(_extras(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return _ENCODE(entry)


@functools.lru_cache(maxsize=4)
def _second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def timestamp(created: float) -> str:
    """``created`` (a Unix time) in UTC to the millisecond, exactly as
    ``datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")`` writes it,
    at a fraction of its cost (the date and time part is reused within a second)."""
    second = math.floor(created)
    micro = round((created - second) * 1e6)
    if micro >= 1_000_000:
        second, micro = second + 1, micro - 1_000_000
    return f"{_second(second)}.{micro // 1000:03d}+00:00"


class LineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes the lines one pass of an event loop logs together.

    Off an event loop's thread (or with none running) a line is written at once, after
    any still held, so lines keep their order.
    """

    def __init__(self, stream: Any = None) -> None:
        super().__init__(stream)
        self._held: list[str] = []
        #: The loop a flush is scheduled on.
        self._waiting: asyncio.AbstractEventLoop | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        self._held.append(line)  # under the handler's lock (Handler.handle takes it)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        if self._waiting is not loop:  # (a loop closed before its flush ran is replaced)
            self._waiting = loop
            loop.call_soon(self.flush)

    def flush(self) -> None:
        self.acquire()
        try:
            lines, self._held, self._waiting = self._held, [], None
            if lines:
                self.stream.write("".join(lines))
            super().flush()
        except Exception:
            self.handleError(logging.makeLogRecord({"msg": "log lines lost"}))
        finally:
            self.release()


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {
        key: value
        for key, value in vars(record).items()
        if key not in _STANDARD and not key.startswith("_")
    }


class ConsoleFormatter(logging.Formatter):
    """One readable line per record: time, level, logger, event, then ``key=value`` pairs."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created).strftime("%H:%M:%S.%f")[:-3]
        parts = [when, f"{record.levelname:<7}", f"{record.name:<16}", record.getMessage()]
        for key, value in _extras(record).items():
            text = str(value)
            if not text or any(ch.isspace() or ch in '"=\x7f' or ch < " " for ch in text):
                text = json.dumps(text, ensure_ascii=False)  # quoted, control chars escaped
            parts.append(f"{key}={text}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FORMATS = ("json", "console")


def configure(level: str = "INFO", fmt: str = "json") -> None:
    """Send all logging to stderr, as JSON lines or readable console lines (idempotent)."""
    # Records carry none of what no formatter here prints: no caller lookup (a frame walk
    # per record), no thread, process or task names. A dispatcher logs a line per mail.
    logging._srcfile = None  # documented in the logging HOWTO, "Optimization"
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = LineHandler(sys.stderr)
    handler.setFormatter(ConsoleFormatter() if fmt == "console" else JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn.access is left alone: `outbox api` turns the access log off (uvicorn then
    # detaches that logger), and re-attaching it here would log every request anyway.
    for name in ("uvicorn", "uvicorn.error", "aiosmtpd", "mail.log"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    # Alembic announces each of its plugins whenever migrations/ is loaded.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
