"""``outbox limit|pause|resume|suppress|unsuppress|suppressions``: the sending policy.

Thin command-line front end of :mod:`dispatcher.policies`
(the same code as the admin endpoints). A scope is all mail (no ``--domain``) or one
recipient domain. Exit codes as the audit commands: 0 done (pausing what is paused and
resuming what is not included: the outcome is what was asked for); 1 the database is
unreachable, or there was nothing to remove (``limit rm`` of a scope without limits,
``unsuppress`` of an address not on the list); 2 bad arguments or settings.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from typing import Any

from outbox.cli import args as types
from outbox.cli import present
from outbox.dispatcher import policies
from outbox.dispatcher.db import Connection

_RATE_HELP = (
    "a rate such as 40/s, 1000/h, 50000/d or 10/5m (units s, m, h, d); repeat for more "
    "windows, one rate per window; replaces the scope's rates"
)
_DOMAIN_HELP = "a recipient domain (IDN or A-label, any case); without it: all mail"


def register(sub: Any) -> None:
    """Add the sending-policy commands to the parser."""
    limit = sub.add_parser(
        "limit",
        help="fleet-wide sending limits: rates and mail in flight, per domain or for all mail",
        description="Fleet-wide sending limits, shared by every dispatcher: rates (token "
        "buckets: a rate lets at most one second's worth go at once, at least one mail) "
        "and the most mails in flight at once, for all mail or one recipient domain.",
    )
    actions = limit.add_subparsers(dest="limit_command", required=True, metavar="ACTION")

    p = actions.add_parser(
        "set",
        help="set a scope's rates and/or concurrency",
        description="Set the rates (replacing the scope's windows) and/or the concurrency "
        "limit of all mail or of one domain; what is not given is kept.",
    )
    p.add_argument("--domain", type=types.domain, metavar="DOMAIN", help=_DOMAIN_HELP)
    p.add_argument("--rate", type=types.rate, action="append", metavar="RATE", help=_RATE_HELP)
    p.add_argument(
        "--concurrency",
        type=types.concurrency,
        metavar="N",
        help="at most N mails of the scope being sent at once, fleet-wide",
    )
    p.set_defaults(handler=cmd_limit_set, parser=p)

    p = actions.add_parser(
        "list",
        help="every scope: rates, concurrency, pause, throttle, mail in flight and waiting",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=cmd_limit_list)

    p = actions.add_parser(
        "rm",
        help="remove a scope's rates and concurrency (a pause stays)",
    )
    p.add_argument("--domain", type=types.domain, metavar="DOMAIN", help=_DOMAIN_HELP)
    p.set_defaults(handler=cmd_limit_rm)

    p = sub.add_parser(
        "pause",
        help="hold all mail, or the mail to one domain, for every dispatcher",
        description="Hold mail: no dispatcher claims it until `outbox resume`. Mail being "
        "sent right now finishes.",
    )
    p.add_argument("--domain", type=types.domain, metavar="DOMAIN", help=_DOMAIN_HELP)
    p.set_defaults(handler=cmd_pause)

    p = sub.add_parser("resume", help="release what `outbox pause` held")
    p.add_argument("--domain", type=types.domain, metavar="DOMAIN", help=_DOMAIN_HELP)
    p.set_defaults(handler=cmd_resume)

    p = sub.add_parser(
        "suppress",
        help="put an address on the suppression list: mail to it is not sent",
        description="Put an address on the suppression list: mail to it (any spelling of "
        "it) ends `suppressed` instead of being sent. An address already on the list keeps "
        "its entry.",
    )
    p.add_argument("address", type=types.address, metavar="ADDRESS", help="the address")
    p.add_argument(
        "--reason", type=types.reason, metavar="TEXT", help="why (plain text, shown by list)"
    )
    p.set_defaults(handler=cmd_suppress)

    p = sub.add_parser("unsuppress", help="take an address off the suppression list")
    p.add_argument("address", type=types.address, metavar="ADDRESS", help="the address")
    p.set_defaults(handler=cmd_unsuppress)

    p = sub.add_parser("suppressions", help="the suppression list, newest first")
    p.add_argument(
        "--limit", type=types.page_size, default=100, help="entries to show (default 100)"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=cmd_suppressions)


# --- Presenting -------------------------------------------------------------------------------


def policy_json(p: policies.Policy) -> dict[str, object]:
    """A scope's policy as JSON (the shape of the admin endpoints' ``Policy``)."""
    return {
        "domain": p.domain,
        "rates": [
            {
                "rate": str(w.rate),
                "count": w.count,
                "per_seconds": w.per_seconds,
                "burst": w.burst,
                "tokens": w.tokens,
            }
            for w in p.rates
        ],
        "concurrency": p.concurrency,
        "paused": p.paused,
        "throttle": None
        if p.throttle is None
        else {"rate": p.throttle.rate, "base": p.throttle.base, "since": p.throttle.since},
        "in_flight": p.in_flight,
        "waiting": p.waiting,
        "updated_at": p.updated_at,
    }


def _rates(p: policies.Policy) -> str:
    return " ".join(str(w.rate) for w in p.rates)


def _throttle(p: policies.Policy) -> str:
    if p.throttle is None:
        return "-"
    rate, base = policies.rate_words(p.throttle.rate), policies.rate_words(p.throttle.base)
    return f"{rate} (halved from {base} at {present.time_text(p.throttle.since)} UTC)"


def describe(p: policies.Policy) -> str:
    """A scope's policy on one short line: ``example.com: paused, 40/s 1000/h, ...``."""
    parts = []
    if p.paused:
        parts.append("paused")
    if p.rates:
        parts.append(_rates(p))
    if p.concurrency is not None:
        parts.append(f"concurrency {p.concurrency:,}")
    if p.throttle is not None:
        parts.append(f"throttled to {_throttle(p)}")
    if not parts:
        parts.append("no limit")
    return f"{p.name}: {', '.join(parts)}; {p.in_flight:,} in flight, {p.waiting:,} waiting"


def _scope_flag(domain: str | None) -> str:
    return f" --domain {domain}" if domain is not None else ""


# --- Commands -----------------------------------------------------------------------------------


def cmd_limit_set(ns: argparse.Namespace) -> int:
    """Set a scope's rates and/or concurrency."""
    parser: argparse.ArgumentParser = ns.parser
    if ns.rate is None and ns.concurrency is None:
        parser.error("give --rate or --concurrency (or both)")
    if ns.rate is not None:
        try:
            policies.check_rates(ns.rate)
        except ValueError as exc:
            parser.error(f"argument --rate: {exc}")

    async def work(conn: Connection) -> int:
        policy = await policies.set_limits(
            conn, ns.domain, rates=ns.rate, concurrency=ns.concurrency
        )
        print(f"limit set: {present.clean(describe(policy))}")
        return 0

    return present.run("limit set", work)


def cmd_limit_list(ns: argparse.Namespace) -> int:
    """Every scope with a policy."""

    async def work(conn: Connection) -> int:
        found = await policies.list_policies(conn)
        if ns.json:
            present.print_json({"items": [policy_json(p) for p in found]})
            return 0
        if not found:
            print(
                "no limits, pauses or throttles: mail goes as fast as dispatchers send it",
                file=sys.stderr,
            )
            return 0
        rows = [
            [
                present.clean(p.name, 60),
                _rates(p) or "-",
                f"{p.concurrency:,}" if p.concurrency is not None else "-",
                "paused" if p.paused else "-",
                _throttle(p),
                f"{p.in_flight:,}",
                f"{p.waiting:,}",
            ]
            for p in found
        ]
        present.table(
            ["SCOPE", "RATES", "CONCURRENCY", "PAUSED", "THROTTLE", "IN FLIGHT", "WAITING"],
            rows,
            sys.stdout,
        )
        return 0

    return present.run("limit list", work)


def cmd_limit_rm(ns: argparse.Namespace) -> int:
    """Remove a scope's rates and concurrency."""

    async def work(conn: Connection) -> int:
        if not await policies.remove_limits(conn, ns.domain):
            present.error("limit rm", f"{policies.scope_name(ns.domain)} has no limit to remove")
            return 1
        print(f"removed the limits of {policies.scope_name(ns.domain)}")
        return 0

    return present.run("limit rm", work)


def cmd_pause(ns: argparse.Namespace) -> int:
    """Hold a scope's mail."""

    async def work(conn: Connection) -> int:
        name = policies.scope_name(ns.domain)
        if await policies.pause(conn, ns.domain):
            print(
                f"paused {name}: no dispatcher claims it until "
                f"outbox resume{_scope_flag(ns.domain)}"
            )
        else:
            print(f"{name} was paused already")
        return 0

    return present.run("pause", work)


def cmd_resume(ns: argparse.Namespace) -> int:
    """Release a scope's mail."""

    async def work(conn: Connection) -> int:
        name = policies.scope_name(ns.domain)
        if await policies.resume(conn, ns.domain):
            print(f"resumed {name}")
        else:
            print(f"{name} was not paused")
        return 0

    return present.run("resume", work)


def cmd_suppress(ns: argparse.Namespace) -> int:
    """Put an address on the suppression list."""

    async def work(conn: Connection) -> int:
        entry, created = await policies.suppress(conn, ns.address, ns.reason)
        if created:
            print(f"suppressed {present.clean(entry.address)}: mail to it is not sent")
        else:
            print(
                f"{present.clean(entry.address)} is on the suppression list already, since "
                f"{present.time_text(entry.created_at)} UTC "
                f"({entry.source}: {present.clean(entry.reason, 200)})"
            )
        return 0

    return present.run("suppress", work)


def cmd_unsuppress(ns: argparse.Namespace) -> int:
    """Take an address off the suppression list."""

    async def work(conn: Connection) -> int:
        if not await policies.unsuppress(conn, ns.address):
            present.error(
                "unsuppress", f"{present.clean(ns.address)} is not on the suppression list"
            )
            return 1
        print(f"unsuppressed {present.clean(ns.address)}")
        return 0

    return present.run("unsuppress", work)


def cmd_suppressions(ns: argparse.Namespace) -> int:
    """The suppression list, newest first."""

    async def work(conn: Connection) -> int:
        page = await policies.list_suppressions(conn, limit=ns.limit)
        if ns.json:
            present.print_json({"items": [asdict(s) for s in page.items], "total": page.total})
            return 0
        if not page.items:
            print("the suppression list is empty", file=sys.stderr)
            return 0
        rows = [
            [
                present.clean(s.address, 60),
                s.source,
                present.time_text(s.created_at),
                present.clean(s.reason, 80),
            ]
            for s in page.items
        ]
        present.table(["ADDRESS", "SOURCE", "SINCE (UTC)", "REASON"], rows, sys.stdout)
        if page.total > len(page.items):
            print(f"{page.total - len(page.items):,} more not shown (--limit)", file=sys.stderr)
        return 0

    return present.run("suppressions", work)
