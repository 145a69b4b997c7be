"""Standard output whose reader may go away (``outbox list | head -1``), or whose encoding
cannot show every character.

A write to a closed pipe raises BrokenPipeError, an OSError like the ones a lost database
connection raises. :func:`guard` wraps stdout and stderr so that it becomes
:class:`OutputClosed` instead, which no database error handler mistakes for an outage;
``outbox`` then stops quietly with status 141, like other Unix tools cut off by a pipe.
It also has text that the streams' encoding cannot hold (a user's name on a terminal
that is not UTF-8) written as backslash escapes instead of failing the command.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import os
import sys
from typing import Any, TextIO, cast

#: 128 + SIGPIPE: what a shell reports for a command that a closed pipe stopped.
STATUS: int = 141


class OutputClosed(Exception):
    """The reader of stdout or stderr went away."""


class _Guarded:
    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            raise OutputClosed from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise OutputClosed from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def guard() -> None:
    """Make writes to a closed stdout or stderr raise :class:`OutputClosed`."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
        if stream is not None and not isinstance(stream, _Guarded):
            setattr(sys, name, cast(TextIO, _Guarded(stream)))


def is_utf8() -> bool:
    """Whether stdout writes UTF-8 (so any text goes out as it is)."""
    return codecs.lookup(getattr(sys.stdout, "encoding", None) or "ascii").name == "utf-8"


def closed() -> int:
    """Silence the closed streams for the rest of the process; return :data:`STATUS`."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        with contextlib.suppress(OSError):
            os.dup2(devnull, fd)
    os.close(devnull)
    return STATUS
