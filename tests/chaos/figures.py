"""The figures each scenario reports, printed as one short table per scenario at the end."""

from __future__ import annotations

from dataclasses import dataclass, field

from tests.chaos.rig import Ledger


@dataclass
class Table:
    title: str
    rows: list[tuple[str, str]] = field(default_factory=list)

    def add(self, label: str, value: object) -> None:
        self.rows.append((label, str(value)))


#: Tables recorded so far this session, in order (printed by conftest's terminal summary).
TABLES: list[Table] = []
#: The calm baseline's throughput (mails per second, "throughput") and its latency from
#: 201 to inbox ("latency p50", "latency p99", seconds), once measured.
CALM: dict[str, float] = {}


def seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} s"


def p50_max(values: list[float]) -> str:
    if not values:
        return "n/a"
    ordered = sorted(values)
    return f"{seconds(ordered[(len(ordered) - 1) // 2])} / {seconds(ordered[-1])}"


def record(
    title: str, ledger: Ledger, duplicates: str = "", extra: dict[str, object] | None = None
) -> Table:
    """Build and remember the table for one scenario: the common rows, then ``extra``."""
    table = Table(title)
    answers = ", ".join(
        f"{'no answer' if status is None else status}: {n}"
        for status, n in sorted(ledger.http_status.items(), key=lambda kv: str(kv[0]))
    )
    table.add("registrations sent", f"{ledger.requests} ({answers})")
    table.add("committed registrations (users)", ledger.committed)
    table.add("mails delivered", ledger.delivered)
    table.add("LOST", len(ledger.lost))
    table.add("stray mails", len(ledger.stray))
    table.add("duplicates", f"{ledger.duplicates}{'  ' + duplicates if duplicates else ''}")
    if ledger.in_doubt:
        table.add(
            "unanswered requests that committed", f"{ledger.in_doubt_committed}/{ledger.in_doubt}"
        )
    calm = CALM.get("throughput")
    relative = f" ({100 * ledger.throughput / calm:.0f} % of calm)" if calm else ""
    table.add("throughput", f"{ledger.throughput:.1f} mails/s{relative}")
    if ledger.worst_window is not None:
        worst = f" ({100 * ledger.worst_window / calm:.0f} % of calm)" if calm else ""
        table.add("slowest 5 s under load", f"{ledger.worst_window:.1f} mails/s{worst}")
    table.add(
        "latency 201 -> inbox p50/p99/max",
        " / ".join(seconds(ledger.latency(q)) for q in (50, 99))
        + f" / {seconds(max(ledger.latencies, default=None))}",
    )
    attempts = ", ".join(f"{k} {v}" for k, v in sorted(ledger.attempts.items()))
    table.add("attempts recorded", f"{attempts}; lease_lost {ledger.lease_lost}")
    for label, value in (extra or {}).items():
        table.add(label, value)
    TABLES.append(table)
    return table


def render(table: Table) -> list[str]:
    width = max(len(label) for label, _ in table.rows) if table.rows else 0
    lines = [table.title]
    lines += [f"  {label.ljust(width)}  {value}" for label, value in table.rows]
    return lines


def assert_no_loss(ledger: Ledger) -> None:
    """The hard properties every scenario must keep."""
    assert not ledger.lost, f"LOST {len(ledger.lost)} mails: {sorted(ledger.lost)[:10]}"
    assert not ledger.stray, f"{len(ledger.stray)} stray mails: {sorted(ledger.stray)[:10]}"
    assert ledger.orphan_users == 0, "users without their welcome mail in the outbox"
    assert ledger.orphan_mails == 0, "outbox rows without their user"
    assert ledger.missing_201 == 0, "201 answers without the rows they promised"
    assert set(ledger.status) <= {"sent"}, f"rows not sent: {ledger.status}"
    assert ledger.committed == ledger.outbox_rows == ledger.delivered
    assert ledger.created <= ledger.committed
    assert not ledger.nonidentical, "a duplicate differed from its first copy"
    assert not ledger.unexplained, f"duplicates without a trail: {ledger.unexplained}"
    assert not ledger.holder_violations, "\n".join(ledger.holder_violations[:5])
    assert ledger.lost_lease_sends == 0, "a send started after its lease had been taken over"
    assert ledger.http_status.get(500, 0) == 0, "the API answered 500"
