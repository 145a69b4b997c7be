"""How every database-backed ``outbox`` command runs and prints its results.

:func:`run` checks the database (:mod:`dispatcher.startup`), runs the command's work and
closes the connection; database trouble becomes one line on stderr (:func:`error`) and
exit code 2 when misconfigured, 1 when unreachable. What is printed goes through
:func:`clean` (control characters of stored text become spaces, so nothing can drive the
terminal), times through :func:`time_text` (UTC, to the second), rows through
:func:`table` (aligned columns), and ``--json`` output through :func:`print_json`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import TextIO

import asyncpg

from outbox.cli import output
from outbox.cli.output import OutputClosed
from outbox.dispatcher import startup
from outbox.dispatcher.db import CONNECTION_ERRORS, Connection
from outbox.dispatcher.settings import load_settings, require_database_url

#: Errors of the database itself, as opposed to bugs (see :func:`startup.classify`).
_DATABASE_ERRORS: tuple[type[Exception], ...] = (*CONNECTION_ERRORS, asyncpg.PostgresError)


def _database_url() -> str:
    settings = load_settings()
    if settings.database_url is None:
        # No DATABASE_URL: an `outbox dev` running here is the obvious database to audit.
        from outbox.cli.dev import running_dev_database

        url = running_dev_database()
        if url is not None:
            print(f"(DATABASE_URL not set: using the outbox dev database, {url})", file=sys.stderr)
            return url
    return require_database_url(settings)


def run(command: str, work: Callable[[Connection], Awaitable[int]]) -> int:
    """Check the database (:mod:`dispatcher.startup`), run ``work``, close; database
    trouble is one line on stderr: exit 2 when misconfigured, 1 when unreachable."""
    url = _database_url()

    async def main() -> int:
        conn = await startup.connect(url, application_name=f"outbox {command}")
        try:
            await startup.check_schema(conn)
            return await work(conn)
        finally:
            with contextlib.suppress(*CONNECTION_ERRORS):
                await conn.close(timeout=2)

    try:
        return asyncio.run(main())
    except OutputClosed:
        raise  # the reader of our output went away: not a database problem
    except startup.StartupError as problem:
        error(command, str(problem))
        return problem.exit_code
    except _DATABASE_ERRORS as exc:
        trouble = startup.classify(exc, url)
        assert trouble is not None
        error(command, str(trouble))
        return trouble.exit_code


def error(command: str, message: str) -> None:
    print(f"outbox {command}: {message}", file=sys.stderr)


def clean(value: object, width: int | None = None) -> str:
    """Text safe for a terminal: control characters (escape sequences, CR/LF) become spaces."""
    text = "" if value is None else str(value)
    text = "".join(" " if ord(ch) < 32 or 127 <= ord(ch) < 160 else ch for ch in text)
    if width is not None and len(text) > width:
        text = text[: width - 1] + "…"
    return text


def time_text(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], out: TextIO) -> None:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    for row in (headers, *rows):
        print(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip(), file=out
        )


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot serialise {type(value).__name__}")


def print_json(value: object) -> None:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    # Escaped (\uXXXX) unless stdout takes UTF-8: JSON that stays JSON on any terminal.
    text = json.dumps(value, default=_json_default, ensure_ascii=not output.is_utf8(), indent=2)
    print(text)
