"""argparse value types that reject bad input with a message naming the problem."""

from __future__ import annotations

import argparse
import difflib
import re
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import NoReturn

from outbox.dispatcher import operations, policies, policy, times
from outbox.dispatcher.addresses import plain_text
from outbox.dispatcher.outbox import MAX_KEY_LENGTH
from outbox.dispatcher.settings import check_dispatcher_name


def _ascii(text: str) -> str:
    # int() and float() also read other scripts' digits ("٣" is 3): a flag takes ASCII.
    if not text.isascii():
        raise ValueError(text)
    return text


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(_ascii(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """A number of seconds > 0."""
    try:
        value = float(_ascii(text))
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
    try:
        return times.parse_age(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


#: The largest id a bigint column holds.
MAX_ID = 2**63 - 1


def outbox_id(text: str) -> int:
    """An outbox row id: a whole number from 1 to 2**63-1."""
    try:
        value = int(_ascii(text))
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


def _plain(text: str, what: str, *, longest: int, shortest: int = 1) -> str:
    try:
        return plain_text(text, what, longest=longest, shortest=shortest)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def idempotency_key(text: str) -> str:
    """An idempotency key as ``enqueue(..., key=...)`` takes it: 1-200 characters of plain
    text."""
    return _plain(text, "a key", longest=MAX_KEY_LENGTH)


def timestamp(text: str) -> datetime:
    """A point in time: ISO 8601 (``2026-11-24``, ``2026-11-24T10:00``, with or without an
    offset; no offset means UTC) or an age meaning "that long ago" (``2h``, ``30d``).
    The same grammar as the HTTP API's ``since`` and ``until``."""
    try:
        return times.parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def rate(text: str) -> policy.Rate:
    """A sending rate: ``40/s``, ``1000/h``, ``50000/d``, ``10/5m``."""
    try:
        return policy.parse_rate(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def domain(text: str) -> str:
    """A recipient domain, as its A-label in lower case (``bücher.de``: ``xn--bcher-kva.de``)."""
    try:
        return policies.domain_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def concurrency(text: str) -> int:
    """A limit on mail in flight at once: 1 to ``policies.MAX_CONCURRENCY``."""
    value = positive_int(text)
    try:
        return policies.check_concurrency(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def address(text: str) -> str:
    """One email address (``ada@example.com``), as the suppression list takes it."""
    try:
        policies.address_key(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def dispatcher_name(text: str) -> str:
    """A dispatcher's name: 1 to 100 characters of plain text (as ``DISPATCHER_NAME``)."""
    try:
        return check_dispatcher_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def address_filter(text: str) -> str:
    """An address to filter by: at most 320 characters of plain text (as the HTTP API's
    ``recipient``; not necessarily a valid address, it matches literally)."""
    return _plain(text, "an address", longest=operations.MAX_RECIPIENT_FILTER, shortest=0)


def reason(text: str) -> str:
    """A suppression reason: 1 to 500 characters of plain text."""
    try:
        return policies.check_reason(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class Parser(argparse.ArgumentParser):
    """argparse whose errors help: an unknown flag is reported with the usage of the
    (sub)command it was given to, and misspelt flags and commands get a suggestion."""

    def parse(self, argv: Sequence[str] | None = None) -> argparse.Namespace:
        """Like ``parse_args``, but unknown arguments are the chosen subcommand's error."""
        ns, extras = self.parse_known_args(argv)
        if extras:
            target = _chosen(self, ns)
            target.error(_unrecognized(target, extras))
        return ns

    def error(self, message: str) -> NoReturn:
        match = re.search(r"invalid choice: '?(.*?)'? \(choose from", message)
        if match:
            choices = [str(c) for a in self._actions if a.choices for c in a.choices]
            close = difflib.get_close_matches(match[1], choices, n=1)
            if close:
                message += f"; did you mean {close[0]!r}?"
        super().error(message)


def _chosen(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> argparse.ArgumentParser:
    """The innermost subcommand parser that ``ns`` went through."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            name = getattr(ns, action.dest, None)
            if name in action.choices:
                return _chosen(action.choices[name], ns)
    return parser


def _unrecognized(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    flags = [s for a in parser._actions for s in a.option_strings if s.startswith("--")]
    message = f"unrecognized arguments: {' '.join(extras)}"
    hints: list[tuple[str, str]] = []
    for extra in extras:
        given = extra.partition("=")[0]
        close = difflib.get_close_matches(given, flags, n=1) if given.startswith("-") else []
        if close:
            hints.append((close[0], given))
    if len(hints) == 1:
        message += f" (did you mean {hints[0][0]}?)"
    elif hints:
        message += f" (did you mean {', '.join(f'{c} for {g}' for c, g in hints)}?)"
    return message
