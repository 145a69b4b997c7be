"""Benchmark: the outbox stays flat under sustained traffic with scheduled pruning.

    ./run bench retention [--total 1000000] [--chunk 10000] [--keep 200000]
                          [--prune-every 50000] [--report-every 100000] [--workers 4]

Pushes ``--total`` mails through a real, migrated PostgreSQL (an embedded one in a
temporary folder, durable default settings, unless ``--database-url`` names an *empty*
scratch database):

* **enqueue**: ``--chunk`` mails at a time with COPY into exactly the columns the
  ENQUEUE statement of :mod:`dispatcher.queries` writes (a single-row INSERT per mail
  would measure the client, not the table);
* **send**: ``--workers`` concurrent "dispatchers" run the real CLAIM and RECORD statements
  of :mod:`dispatcher.queries` (FOR UPDATE SKIP LOCKED claims with leases, guarded
  outcome recording with attempt history). Only the SMTP conversation is skipped: the
  outcome is decided from the id, so the mix is realistic and repeatable: 1 % fail for
  good (550), 2 % are deferred once (451, retried at once) and then sent, the rest are
  sent at the first attempt;
* **prune**: every ``--prune-every`` mails, :func:`dispatcher.operations.prune` (the code
  of ``outbox prune``) deletes finished mail older than the newest ``--keep`` mails, failed
  mail included, in batches of 1,000. (Wall-clock ages cannot be waited for in a benchmark,
  so the cutoff is the time the oldest kept chunk was enqueued.)

Every ``--report-every`` mails it prints the table and index sizes (the claim index
separately), live and dead tuples, and the time of an empty claim, of a claim of a full
batch during the run, and of a ``/metrics`` scrape's queue queries; after the retention
window fills up they stay flat. At the end it prints EXPLAIN ANALYZE of the claim (it uses
``outbox_claim_idx``), of a prune batch and of the metrics queries.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402

from outbox.cli import migrate  # noqa: E402
from outbox.cli.embedded_pg import EmbeddedPostgres  # noqa: E402
from outbox.dispatcher import operations, queries  # noqa: E402
from outbox.dispatcher.db import asyncpg_dsn  # noqa: E402

SENDER = "Outbox <noreply@example.org>"
BODY_TEXT = (
    "Hello {name},\n\nthank you for registering with Outbox. Your account ({email}) is "
    "ready.\n\n-- The Outbox team\n"
)
BODY_HTML = (
    "<!doctype html>\n<html><body>\n<p>Hello {name},</p>\n<p>thank you for registering "
    "with Outbox. Your account (<b>{email}</b>) is ready.</p>\n<p>&mdash; The Outbox "
    "team</p>\n</body></html>\n"
)
# The columns ENQUEUE inserts (everything else takes its default, as with ENQUEUE).
COLUMNS = [
    "message_id",
    "sender",
    "recipient",
    "recipient_name",
    "subject",
    "body_text",
    "body_html",
    "next_attempt_at",
    "recipient_domain",
    "recipient_key",
]
LEASE_SECONDS = 60.0
HEARTBEAT_SECONDS = 10.0


def outcome_for(outbox_id: int, attempt: int) -> tuple[str, int, str]:
    """The simulated SMTP verdict: (outcome, reply code, reply text)."""
    if outbox_id % 100 == 0:
        return "failed", 550, "5.1.1 mailbox unavailable"
    if outbox_id % 50 == 1 and attempt == 1:
        return "deferred", 451, "4.7.1 greylisted, try again"
    return "sent", 250, "2.0.0 OK queued"


@dataclass
class Stats:
    claims: int = 0
    claim_seconds: float = 0.0
    claimed: int = 0
    sent: int = 0
    deferred: int = 0
    failed: int = 0
    pruned: int = 0
    pruned_attempts: int = 0
    prune_seconds: float = 0.0

    def take_claim_ms(self) -> float:
        mean = 1000 * self.claim_seconds / self.claims if self.claims else 0.0
        self.claims, self.claim_seconds = 0, 0.0
        return mean


class Progress:
    """A status line on stderr: rewritten in place on a terminal, else every 5 seconds."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last = 0.0
        self.text = ""

    def update(self, text: str) -> None:
        self.text = text
        if self.tty:
            print(f"\r\x1b[K{text}", end="", file=sys.stderr, flush=True)
        elif time.monotonic() - self.last >= 5:
            self.last = time.monotonic()
            print(text, file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.tty:
            print("\r\x1b[K", end="", file=sys.stderr, flush=True)


async def enqueue_chunk(conn: asyncpg.Connection, start: int, count: int) -> datetime:
    """COPY ``count`` due mails; return the transaction's timestamp (their created_at)."""
    now = datetime.now(UTC)
    records = []
    for n in range(start, start + count):
        email = f"user{n}@example.com"
        name = f"User {n}"
        records.append(
            (
                f"<bench.{n}.{uuid.uuid4().hex[:12]}@example.org>",
                SENDER,
                email,
                name,
                f"Welcome to Outbox, {name}!",
                BODY_TEXT.format(name=name, email=email),
                BODY_HTML.format(name=name, email=email),
                now,
                "example.com",
                email,
            )
        )
    async with conn.transaction():
        created_at: datetime = await conn.fetchval("SELECT now()")
        await conn.copy_records_to_table("outbox", records=records, columns=COLUMNS)
    return created_at


async def dispatcher_worker(pool: asyncpg.Pool, name: str, batch: int, stats: Stats) -> None:
    """Claim and record with the real statements until the queue is empty."""
    async with pool.acquire() as conn:
        while True:
            clock = time.perf_counter()
            rows = await conn.fetch(queries.CLAIM, batch, name, LEASE_SECONDS, HEARTBEAT_SECONDS, 5)
            stats.claim_seconds += time.perf_counter() - clock
            stats.claims += 1
            if not rows:
                return
            stats.claimed += len(rows)
            started = datetime.now(UTC)
            ids, tokens, attempts, outcomes, codes, replies = [], [], [], [], [], []
            for row in rows:
                outcome, code, reply = outcome_for(row["id"], row["attempts"])
                ids.append(row["id"])
                tokens.append(row["lease_token"])
                attempts.append(row["attempts"])
                outcomes.append(outcome)
                codes.append(code)
                replies.append(reply)
                setattr(stats, outcome, getattr(stats, outcome) + 1)
            finished = datetime.now(UTC)
            n = len(rows)
            await conn.fetch(
                queries.RECORD,
                ids,
                tokens,
                attempts,
                outcomes,
                codes,
                replies,
                [None] * n,
                [started] * n,
                [finished] * n,
                [0.0] * n,  # deferred mail is due again at once
                name,
                ["end_of_data"] * n,
            )


async def send_all(pool: asyncpg.Pool, workers: int, batch: int, stats: Stats) -> None:
    await asyncio.gather(
        *(dispatcher_worker(pool, f"bench-{i}", batch, stats) for i in range(workers))
    )


async def measure(conn: asyncpg.Connection) -> dict[str, float]:
    """Sizes, tuples, and the time of an empty claim and of the metrics queries."""
    await conn.execute("SELECT pg_stat_force_next_flush()")
    row = await conn.fetchrow(
        """
        SELECT pg_relation_size('outbox') AS table_bytes,
               pg_indexes_size('outbox') AS index_bytes,
               pg_relation_size('outbox_claim_idx') AS claim_bytes,
               pg_total_relation_size('outbox_attempts') AS attempts_bytes,
               (SELECT count(*) FROM outbox) AS rows,
               s.n_live_tup AS live, s.n_dead_tup AS dead, s.autovacuum_count AS vacuums
        FROM pg_stat_user_tables s WHERE s.relname = 'outbox'
        """
    )
    assert row is not None
    claim_times = []
    for _ in range(25):
        clock = time.perf_counter()
        await conn.fetch(queries.CLAIM, 100, "bench-probe", LEASE_SECONDS, HEARTBEAT_SECONDS, 5)
        claim_times.append(time.perf_counter() - clock)
    scrape_times = []
    for _ in range(10):
        clock = time.perf_counter()
        await operations.queue_counts(conn)
        scrape_times.append(time.perf_counter() - clock)
    return {
        **dict(row),
        "claim_ms": 1000 * statistics.median(claim_times),
        "scrape_ms": 1000 * statistics.median(scrape_times),
    }


def mib(value: float) -> str:
    return f"{value / 2**20:8.1f}"


HEADER = (
    f"{'mails':>9} {'rows':>8} {'table MiB':>9} {'idx MiB':>8} {'claim idx':>9} "
    f"{'attempts':>8} {'live tup':>9} {'dead tup':>9} {'vacuums':>7} "
    f"{'claim 0':>8} {'claim 100':>9} {'scrape':>7} {'pruned':>9}"
)


def report_line(done: int, m: dict[str, float], stats: Stats) -> str:
    return (
        f"{done:>9,} {int(m['rows']):>8,} {mib(m['table_bytes']):>9} {mib(m['index_bytes'])} "
        f"{mib(m['claim_bytes']):>9} {mib(m['attempts_bytes'])} {int(m['live']):>9,} "
        f"{int(m['dead']):>9,} {int(m['vacuums']):>7} {m['claim_ms']:>6.2f}ms "
        f"{m['batch_claim_ms']:>7.2f}ms {m['scrape_ms']:>5.2f}ms {stats.pruned:>9,}"
    )


async def explain(conn: asyncpg.Connection, title: str, sql: str, *args: object) -> None:
    """EXPLAIN ANALYZE inside a rolled-back transaction (no side effects)."""
    print(f"\n--- EXPLAIN ANALYZE: {title}")
    tx = conn.transaction()
    await tx.start()
    try:
        for row in await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {sql}", *args):
            print(f"    {row[0]}")
    finally:
        await tx.rollback()


async def run(ns: argparse.Namespace, url: str) -> int:
    pool = await asyncpg.create_pool(
        asyncpg_dsn(url), min_size=ns.workers + 1, max_size=ns.workers + 2
    )
    assert pool is not None
    async with pool.acquire() as conn:
        if await conn.fetchval("SELECT count(*) FROM outbox"):
            print(
                "retention: the database's outbox is not empty; use a scratch database",
                file=sys.stderr,
            )
            await pool.close()
            return 2
        await conn.execute(
            "INSERT INTO dispatchers (name, hostname, pid) "
            "SELECT 'bench-' || i, 'bench', i FROM generate_series(0, $1 - 1) i",
            ns.workers,
        )
    beating = asyncio.create_task(heartbeat(pool, ns.workers))
    try:
        return await push(ns, pool)
    finally:
        beating.cancel()
        await pool.close()


async def heartbeat(pool: asyncpg.Pool, workers: int) -> None:
    """Keep the simulated dispatchers live, as the daemon's heartbeat does.

    Without it, the claim would treat their 'sending' rows as orphaned after 10 seconds
    and take them over (the frozen-dispatcher case), which is not what this measures.
    """
    while True:
        await asyncio.sleep(2)
        for i in range(workers):
            await pool.execute(queries.HEARTBEAT, f"bench-{i}")


async def push(ns: argparse.Namespace, pool: asyncpg.Pool) -> int:
    stats = Stats()
    chunk_times: list[datetime] = []
    keep_chunks = max(1, ns.keep // ns.chunk)
    done = 0
    next_prune = ns.prune_every
    next_report = ns.report_every
    started = time.perf_counter()
    progress = Progress()
    samples: list[tuple[int, dict[str, float]]] = []
    print(
        f"retention: {ns.total:,} mails in chunks of {ns.chunk:,}, {ns.workers} dispatchers "
        f"claiming {ns.claim_batch}, keeping the newest {ns.keep:,} mails, pruning every "
        f"{ns.prune_every:,}",
        flush=True,
    )
    print("claim 0 = CLAIM on the empty queue (median of 25); claim 100 = mean CLAIM of a")
    print("batch during the last interval; scrape = the /metrics queue queries (median of 10)")
    print(HEADER, flush=True)
    async with pool.acquire() as conn:
        while done < ns.total:
            count = min(ns.chunk, ns.total - done)
            chunk_times.append(await enqueue_chunk(conn, done, count))
            await send_all(pool, ns.workers, ns.claim_batch, stats)
            done += count
            if done >= next_prune and len(chunk_times) > keep_chunks:
                cutoff = chunk_times[-keep_chunks]
                clock = time.perf_counter()
                result = await operations.prune(
                    conn, before=cutoff, include_failed=True, batch_size=1000
                )
                stats.prune_seconds += time.perf_counter() - clock
                stats.pruned += result.total
                stats.pruned_attempts += result.attempts_deleted
                next_prune += ns.prune_every
            progress.update(
                f"  {done:,}/{ns.total:,} mails, "
                f"{done / (time.perf_counter() - started):,.0f} mails/s, {stats.pruned:,} pruned"
            )
            if done >= next_report or done == ns.total:
                progress.done()
                sample = await measure(conn)
                sample["batch_claim_ms"] = stats.take_claim_ms()
                samples.append((done, sample))
                print(report_line(done, sample, stats), flush=True)
                next_report += ns.report_every

        elapsed = time.perf_counter() - started
        print(
            f"\n{done:,} mails in {elapsed:,.0f}s ({done / elapsed:,.0f}/s): "
            f"{stats.sent:,} sent, {stats.deferred:,} deferred, {stats.failed:,} failed; "
            f"{stats.pruned:,} mails and {stats.pruned_attempts:,} attempts pruned in "
            f"{stats.prune_seconds:,.1f}s ({stats.pruned / max(stats.prune_seconds, 1e-9):,.0f}"
            " mails/s)"
        )

        steady = [m for n, m in samples if n >= ns.keep + ns.prune_every]
        if len(steady) >= 2:
            print(
                f"\nsteady state ({len(steady)} reports once the {ns.keep:,}-mail window was full):"
            )
            for key, label, unit in [
                ("rows", "rows", 1),
                ("table_bytes", "table MiB", 2**20),
                ("index_bytes", "indexes MiB", 2**20),
                ("claim_bytes", "claim index MiB", 2**20),
                ("attempts_bytes", "attempts MiB", 2**20),
                ("dead", "dead tuples", 1),
                ("claim_ms", "empty claim ms", 1),
                ("batch_claim_ms", "claim of 100 ms", 1),
                ("scrape_ms", "metrics scrape ms", 1),
            ]:
                values = [m[key] / unit for m in steady]
                print(
                    f"  {label:<18} first {values[0]:>10,.2f}  last {values[-1]:>10,.2f}  "
                    f"min {min(values):>10,.2f}  max {max(values):>10,.2f}"
                )

        # A realistic queue for the plans: a few due mails over the whole history.
        await enqueue_chunk(conn, ns.total, 500)
        await conn.execute("ANALYZE outbox")
        await explain(
            conn, "claim (uses outbox_claim_idx)", queries.CLAIM, 32, "explain", 60.0, 10.0, 5
        )
        prune_select = (
            "SELECT id FROM outbox WHERE (created_at, id) > ($1, $2) AND created_at < $3 "
            "AND coalesce(sent_at, updated_at) < $3 AND status = ANY($4::text[]) "
            "ORDER BY created_at, id LIMIT 1000 FOR UPDATE SKIP LOCKED"
        )
        await explain(
            conn,
            "a prune batch's selection (uses outbox_created_at_id_idx)",
            prune_select,
            datetime.min.replace(tzinfo=UTC),
            0,
            datetime.now(UTC),
            ["sent", "cancelled", "failed"],
        )
        await explain(conn, "the /metrics queue queries", operations._QUEUE)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--total", type=int, default=1_000_000, help="mails to push through")
    parser.add_argument("--chunk", type=int, default=10_000, help="mails enqueued per COPY")
    parser.add_argument("--keep", type=int, default=200_000, help="newest mails kept by prune")
    parser.add_argument("--prune-every", type=int, default=50_000, help="mails between prunes")
    parser.add_argument("--report-every", type=int, default=100_000, help="mails per report line")
    parser.add_argument("--workers", type=int, default=4, help="concurrent claimers")
    parser.add_argument("--claim-batch", type=int, default=100, help="rows per claim")
    parser.add_argument(
        "--database-url", help="an empty scratch database (default: embedded PostgreSQL)"
    )
    ns = parser.parse_args()
    for name in ("total", "chunk", "keep", "prune_every", "report_every", "workers", "claim_batch"):
        if getattr(ns, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")

    if ns.database_url:
        migrate.upgrade(ns.database_url)
        return asyncio.run(run(ns, ns.database_url))
    root = Path(tempfile.mkdtemp(prefix="outbox-bench-retention-"))
    # Days of traffic are compressed into minutes here; with the default one-minute
    # autovacuum naptime, autovacuum would see a day's churn at once. One second keeps its
    # cadence relative to the traffic closer to production (the outbox table's own
    # autovacuum thresholds, from the migrations, are left as they are).
    pg = EmbeddedPostgres(root, settings={"autovacuum_naptime": "1s"})
    try:
        pg.start()
        url = pg.create_database("bench")
        migrate.upgrade(url)
        return asyncio.run(run(ns, url))
    finally:
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
