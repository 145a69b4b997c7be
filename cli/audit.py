"""``outbox status|list|show|explain|retry|cancel|prune``: audit and operate the outbox.

Thin command-line front end of :mod:`dispatcher.operations`. Results go to stdout (a
table, or JSON with ``--json``); progress of bulk operations and refusals go to stderr.
Exit codes: 0 done; 1 the database is unreachable, a mail does not exist, or some ids
were refused; 2 bad arguments or settings (a misconfigured database included: unknown
role or database, schema not at head).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

from outbox.api import idempotency as registration_keys
from outbox.cli import args as types
from outbox.cli import present
from outbox.dispatcher import operations as ops
from outbox.dispatcher.db import Connection
from outbox.dispatcher.settings import load_settings


def register(sub: Any) -> None:
    """Add the audit and operations commands to the parser."""
    p = sub.add_parser(
        "status", help="counts per status, oldest due mail, live dispatchers, recent failures"
    )
    p.add_argument("--exact", action="store_true", help="count sent mail exactly (slower)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser("list", help="list mail, newest first")
    p.add_argument("--status", choices=ops.STATUSES, help="only mail in this status")
    p.add_argument(
        "--recipient",
        metavar="ADDRESS",
        type=types.address_filter,
        help="only mail to this address (any case)",
    )
    p.add_argument(
        "--key", type=types.idempotency_key, help="only the mail enqueued with this idempotency key"
    )
    p.add_argument(
        "--since",
        type=types.timestamp,
        metavar="TIME",
        help="created at or after TIME (2026-11-24, 2026-11-24T10:00Z, or an age: 2h, 7d)",
    )
    p.add_argument(
        "--until", type=types.timestamp, metavar="TIME", help="created before TIME (as --since)"
    )
    p.add_argument(
        "--before",
        type=types.outbox_id,
        metavar="ID",
        help="only ids below ID: the next page, as printed after a full page",
    )
    p.add_argument(
        "--limit", type=types.page_size, default=50, help="rows to show, 1-10000 (default 50)"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=cmd_list)

    p = sub.add_parser("show", help="one mail: the row, every attempt, the rendered headers")
    p.add_argument("id", type=types.outbox_id, metavar="ID", help="the outbox id")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(handler=cmd_show)

    p = sub.add_parser(
        "explain",
        help="why a mail has not gone yet (or when and how it went), in plain words",
        description="Why a mail has not gone yet, in plain words: its state and next "
        "attempt, who holds its lease and whether that dispatcher is alive, the last reply, "
        "the attempts left, and whether the dispatchers are running and can reach the SMTP "
        "server; for mail that went, when and why. The attempt limits are "
        "DISPATCHER_MAX_ATTEMPTS and DISPATCHER_MAX_AGE as set here.",
    )
    p.add_argument("id", type=types.outbox_id, metavar="ID", help="the outbox id")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(handler=cmd_explain)

    p = sub.add_parser(
        "retry",
        help="send failed (or cancelled) mail again; --now sends deferred mail at once",
        description="Put failed mail (and cancelled mail named by id) back in the queue, "
        "due now. With --now, pending mail waiting for a later attempt is made due at once "
        "too. The attempts counter and history are kept.",
    )
    p.add_argument("ids", type=types.outbox_id, nargs="*", metavar="ID", help="outbox ids")
    p.add_argument("--all-failed", action="store_true", help="retry every failed mail")
    p.add_argument(
        "--now",
        action="store_true",
        help="also make pending mail that waits for a later attempt due at once",
    )
    p.add_argument(
        "--batch-size",
        type=types.positive_int,
        default=1000,
        help="rows per transaction with --all-failed (default 1000)",
    )
    p.set_defaults(handler=cmd_retry, parser=p)

    p = sub.add_parser("cancel", help="cancel pending or failed mail (never mail being sent)")
    p.add_argument("ids", type=types.outbox_id, nargs="+", metavar="ID", help="outbox ids")
    p.set_defaults(handler=cmd_cancel)

    p = sub.add_parser(
        "prune",
        help="delete old sent and cancelled mail with its attempts",
        description="Delete sent and cancelled mail (and failed mail with --include-failed) "
        "created and completed more than AGE ago, with its attempt history, in batches. "
        "Pending mail and mail being sent are never touched. Registration keys "
        "(POST /register's Idempotency-Key) go once past their 24 hours, whatever AGE.",
    )
    p.add_argument(
        "--older-than",
        type=types.duration,
        required=True,
        metavar="AGE",
        help="age such as 30d, 12h, 2w",
    )
    p.add_argument(
        "--batch-size",
        type=types.positive_int,
        default=1000,
        help="rows deleted per transaction (default 1000)",
    )
    p.add_argument("--include-failed", action="store_true", help="delete old failed mail as well")
    p.add_argument(
        "--keys-older-than",
        type=types.duration,
        metavar="AGE",
        help="also delete idempotency keys made more than AGE ago whose mail is gone "
        "(at least --older-than; without it keys are kept forever)",
    )
    p.add_argument("--dry-run", action="store_true", help="only count what would be deleted")
    p.set_defaults(handler=cmd_prune, parser=p)


# --- Plumbing -------------------------------------------------------------------------------


def _age(value: float) -> str:
    total = int(value)
    if total < 60:
        return f"{total}s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes}m {secs}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h"


class _Progress:
    """Running counts on stderr: rewritten in place on a terminal, else a line per second."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.last = 0.0
        self.pending: str | None = None

    def update(self, text: str) -> None:
        now = time.monotonic()
        if self.tty:
            self.stream.write(f"\r\x1b[K{text}")
            self.stream.flush()
        elif now - self.last >= 1.0:
            print(text, file=self.stream, flush=True)
            self.last = now
            self.pending = None
            return
        self.pending = text

    def done(self) -> None:
        if self.tty and self.pending is not None:
            self.stream.write("\n")
        elif self.pending is not None:
            print(self.pending, file=self.stream, flush=True)
        self.stream.flush()


# --- Commands -------------------------------------------------------------------------------


def cmd_status(ns: argparse.Namespace) -> int:
    """Counts per status, oldest due pending age, dispatchers, failures in the last hour."""

    async def work(conn: Connection) -> int:
        summary = await ops.status_summary(conn, exact=ns.exact)
        if ns.json:
            from outbox.cli.policy import policy_json  # here: cli.policy imports this module

            body = dataclasses.asdict(summary)
            body["policies"] = [policy_json(p) for p in summary.policies]
            present.print_json(body)
            return 0
        queue = summary.queue
        out = sys.stdout
        print(f"outbox at {present.time_text(summary.checked_at)} UTC", file=out)
        for status in ops.STATUSES:
            note = ""
            if status == "pending":
                note = f"  ({queue.due_pending:,} due"
                if queue.due_pending:
                    note += f", oldest due for {_age(queue.oldest_due_pending_seconds)}"
                note += ")"
            elif status == "sent" and queue.sent_estimated:
                note = "  (estimate; --exact to count)"
            print(f"  {status:<10} {queue.counts[status]:>12,}{note}", file=out)
        failures = summary.failures_last_hour
        print(
            "attempts in the last hour: "
            f"{failures['failed']:,} failed, {failures['deferred']:,} deferred, "
            f"{failures['unknown']:,} unknown, {failures['abandoned']:,} abandoned",
            file=out,
        )
        live = sum(d.live for d in summary.dispatchers)
        print(f"dispatchers: {live} live", file=out)
        if summary.dispatchers:
            rows = [
                [
                    present.clean(d.name, 40),
                    present.clean(d.hostname, 40),
                    str(d.pid),
                    present.time_text(d.started_at),
                    present.time_text(d.last_beat_at),
                    "live" if d.live else "gone",
                ]
                for d in summary.dispatchers
            ]
            present.table(
                ["  NAME", "HOST", "PID", "STARTED", "LAST BEAT", "STATE"], _indent(rows), out
            )
            for d in summary.dispatchers:
                if d.live and d.smtp_error is not None:
                    print(
                        f"  {present.clean(d.name, 40)}: sending paused since "
                        f"{present.time_text(d.smtp_unreachable_since)}, SMTP server "
                        f"unreachable: {present.clean(d.smtp_error, 200)}",
                        file=out,
                    )
        if summary.policies:
            from outbox.cli.policy import describe

            print("sending policy (outbox limit list):", file=out)
            for policy in summary.policies:
                print(f"  {present.clean(describe(policy))}", file=out)
        return 0

    return present.run("status", work)


def _indent(rows: list[list[str]]) -> list[list[str]]:
    return [["  " + row[0], *row[1:]] for row in rows]


def cmd_list(ns: argparse.Namespace) -> int:
    """List mail, newest first, with filters and keyset pagination."""

    async def work(conn: Connection) -> int:
        page = await ops.list_mail(
            conn,
            status=ns.status,
            recipient=ns.recipient,
            since=ns.since,
            until=ns.until,
            before=ns.before,
            limit=ns.limit,
            key=ns.key,
        )
        if ns.json:
            present.print_json(
                {"items": [dataclasses.asdict(r) for r in page.items], "next": page.next_cursor}
            )
            return 0
        rows = [
            [
                str(r.id),
                r.status,
                str(r.attempts),
                present.time_text(r.created_at),
                present.clean(r.recipient, 40),
                present.clean(r.subject, 40),
                present.clean(_last_error(r) or "", 50),
            ]
            for r in page.items
        ]
        if rows:
            present.table(
                ["ID", "STATUS", "ATT", "CREATED (UTC)", "RECIPIENT", "SUBJECT", "LAST ERROR"],
                rows,
                sys.stdout,
            )
        else:
            print("no mail matches", file=sys.stderr)
        if page.next_cursor is not None:
            print(f"more: add --before {page.next_cursor} for the next page", file=sys.stderr)
        return 0

    return present.run("list", work)


def cmd_show(ns: argparse.Namespace) -> int:
    """One mail in full."""

    async def work(conn: Connection) -> int:
        detail = await ops.show(conn, ns.id)
        if detail is None:
            present.error("show", f"no mail with id {ns.id}")
            return 1
        if ns.json:
            present.print_json(detail)
            return 0
        _print_detail(detail, sys.stdout)
        return 0

    return present.run("show", work)


def cmd_explain(ns: argparse.Namespace) -> int:
    """Why one mail has not gone yet, in plain words."""
    settings = load_settings()

    async def work(conn: Connection) -> int:
        why = await ops.explain(
            conn,
            ns.id,
            max_attempts=settings.dispatcher_max_attempts,
            max_age=settings.dispatcher_max_age,
        )
        if why is None:
            present.error("explain", f"no mail with id {ns.id}")
            return 1
        if ns.json:
            present.print_json(why)
            return 0
        print(present.clean(why.summary))
        for reason in why.reasons:
            print(f"  {present.clean(reason)}")
        return 0

    return present.run("explain", work)


def _last_error(row: ops.MailRow) -> str | None:
    """The last failure: its SMTP code and error; None when there was none (a 2xx code
    is the reply that accepted the mail, not an error)."""
    code = row.last_smtp_code if row.last_smtp_code and row.last_smtp_code >= 300 else None
    text = " ".join(str(part) for part in (code, row.last_error) if part is not None)
    return text or None


def _print_detail(detail: ops.MailDetail, out: TextIO) -> None:
    r = detail.row
    fields: list[tuple[str, object]] = [
        ("status", r.status),
        ("attempts", r.attempts),
        ("message-id", r.message_id),
        ("from", r.sender),
        ("to", f"{r.recipient_name} <{r.recipient}>" if r.recipient_name else r.recipient),
        ("subject", r.subject),
        ("key", r.idempotency_key or "-"),
        ("created", f"{present.time_text(r.created_at)} UTC"),
        ("updated", f"{present.time_text(r.updated_at)} UTC"),
        ("sent", f"{present.time_text(r.sent_at)} UTC" if r.sent_at else "-"),
        (
            "next attempt",
            f"{present.time_text(r.next_attempt_at)} UTC" if r.status == "pending" else "-",
        ),
        (
            "lease",
            f"{r.lease_owner} until {present.time_text(r.lease_expires_at)} UTC"
            if r.lease_owner
            else "-",
        ),
        ("last error", _last_error(r) or "-"),
    ]
    print(f"mail {r.id}", file=out)
    for name, value in fields:
        print(f"  {name:<13} {present.clean(value)}", file=out)
    print("headers (as sent):", file=out)
    if detail.render_error:
        print(f"  cannot render: {present.clean(detail.render_error)}", file=out)
    for name, value in detail.headers:
        print(f"  {name}: {present.clean(value)}", file=out)
    print(f"attempts ({len(detail.history)}):", file=out)
    if detail.history:
        rows = [
            [
                f"  {a.attempt}",
                a.outcome + (" (lease lost)" if a.lease_lost else ""),
                present.clean(a.dispatcher, 30),
                present.time_text(a.started_at),
                f"{(a.finished_at - a.started_at).total_seconds():.3f}s",
                a.smtp_stage or "-",
                str(a.smtp_code or "-"),
                present.clean(a.error or a.smtp_reply, 60),
            ]
            for a in detail.history
        ]
        present.table(
            [
                "  #",
                "OUTCOME",
                "DISPATCHER",
                "STARTED (UTC)",
                "TOOK",
                "REACHED",
                "CODE",
                "REPLY / ERROR",
            ],
            rows,
            out,
        )
    print("body (text):", file=out)
    for line in detail.body_text.splitlines():
        print(f"  | {present.clean(line)}", file=out)
    if detail.body_html is not None:
        print(f"body (html): {len(detail.body_html):,} characters (--json shows it)", file=out)


def _report(command: str, verb: str, result: ops.ChangeResult, hint: str = "") -> int:
    if result.changed:
        print(f"{verb}: {' '.join(str(i) for i in result.changed)}")
    for refused in result.refused:
        extra = hint if refused.status == "pending" else ""
        present.error(command, f"{refused.id}: {refused.reason}{extra}")
    return 1 if result.refused else 0


def cmd_retry(ns: argparse.Namespace) -> int:
    """Retry the named mails, or every failed one."""
    parser: argparse.ArgumentParser = ns.parser
    if ns.all_failed and ns.ids:
        parser.error("give IDs or --all-failed, not both")
    if not ns.all_failed and not ns.ids:
        parser.error("give the IDs to retry, or --all-failed")

    async def work(conn: Connection) -> int:
        if not ns.all_failed:
            result = await ops.retry(conn, ns.ids, now=ns.now)
            return _report("retry", "retried", result, " (--now makes it due at once)")
        progress = _Progress()
        total = await ops.retry_all_failed(
            conn,
            batch_size=ns.batch_size,
            progress=lambda n: progress.update(f"retry: {n:,} failed mails queued again"),
        )
        progress.done()
        print(f"retried {total:,} failed mails")
        return 0

    return present.run("retry", work)


def cmd_cancel(ns: argparse.Namespace) -> int:
    """Cancel the named mails."""

    async def work(conn: Connection) -> int:
        return _report("cancel", "cancelled", await ops.cancel(conn, ns.ids))

    return present.run("cancel", work)


def _counts(deleted: Mapping[str, int]) -> str:
    return ", ".join(f"{status} {n:,}" for status, n in deleted.items())


def cmd_prune(ns: argparse.Namespace) -> int:
    """Delete old finished mail in batches, with progress on stderr."""
    if ns.keys_older_than is not None and ns.keys_older_than < ns.older_than:
        parser: argparse.ArgumentParser = ns.parser
        parser.error("--keys-older-than must not be shorter than --older-than")

    async def work(conn: Connection) -> int:
        progress = _Progress()

        def step(p: ops.PruneResult) -> None:
            keys = f"{p.keys_deleted:,} keys, " if p.keys_cutoff is not None else ""
            progress.update(
                f"prune: {p.total:,} mails deleted ({_counts(p.deleted)}), "
                f"{p.attempts_deleted:,} attempts, {keys}{p.batches:,} batches"
            )

        result = await ops.prune(
            conn,
            older_than=ns.older_than,
            include_failed=ns.include_failed,
            batch_size=ns.batch_size,
            dry_run=ns.dry_run,
            progress=step,
            keys_older_than=ns.keys_older_than,
        )
        progress.done()
        verb = "would delete" if result.dry_run else "deleted"
        print(
            f"{verb} {result.total:,} mails ({_counts(result.deleted)}) and "
            f"{result.attempts_deleted:,} attempts created and completed before "
            f"{present.time_text(result.cutoff)} UTC"
        )
        if result.keys_cutoff is not None:
            print(
                f"{verb} {result.keys_deleted:,} idempotency keys made before "
                f"{present.time_text(result.keys_cutoff)} UTC whose mail is gone"
            )
        # POST /register's Idempotency-Key rows live 24 h, whatever the age given (a
        # database migrated --without-registration has no such table).
        if await conn.fetchval("SELECT to_regclass('registration_keys') IS NOT NULL"):
            expired = await registration_keys.prune_expired(
                conn, batch_size=ns.batch_size, dry_run=ns.dry_run
            )
            print(f"{verb} {expired:,} expired registration keys (Idempotency-Key, kept 24 h)")
        return 0

    return present.run("prune", work)
