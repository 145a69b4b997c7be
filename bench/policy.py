"""Benchmark: the fleet-wide sending policy (limits, throttling, priorities).

    ./run bench policy [--only claim|global|domain|adaptive|priority] [--rows 1000000]
                       [--domains 10000] [--global-mails 3000] [--domain-mails 2000]
                       [--backlog 10000]

Starts its own embedded PostgreSQL and SMTP sinks (bench/sink.py, which logs every
accepted mail with its recipient domain and the most messages per domain it held at
once), and real ``outbox dispatcher`` processes. Five measurements:

1. claim: the cost of one claim of 32 (``dispatcher.limits.claim``, rolled back so that
   every sample sees the same table) with ``--rows`` due mails over ``--domains``
   recipient domains: without any policy, against limits configured (two windows on all
   mail, too wide to cut a claim of 32 short; 5/s with concurrency 2 on ``--limited``
   domains, 10 and 100 by default; 2 paused domains). Target: within 2x.
2. global: three dispatchers (concurrency 32 each) drain ``--global-mails`` due mails to a
   fast sink under ``outbox limit set --rate 40/s``: the largest excess of the mails the
   sink accepted by time t over 40 t (t from the first arrival; the bucket's burst is 40),
   and the average rate after the burst against 40/s (target at least 90 %).
3. domain: ``--domain-mails`` due mails, half of them (enqueued first) to slow.example
   (``--rate 5/s --concurrency 2``, the sink holds its replies 200 ms): how long the other
   half takes, against the same mails sent alone (target within 1.2x); slow.example's
   most mails in any one-second window (bound: rate + burst = 10) and most in flight at
   the sink (bound: 2).
4. adaptive: no limit configured, but the sink answers ``421`` to limited.example beyond 5
   mails a second (as a provider does): the rate delivered against those 5/s, 421 replies
   and attempts per delivered mail over 30 s, and the throttle as last set.
5. priority: one priority-0 mail enqueued while ``--backlog`` priority-5 mails drain:
   commit -> SMTP accepted, against the same on an idle dispatcher (target within 2x).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from dispatch import (  # noqa: E402
    Sink,
    fresh_database,
    log,
    start_dispatcher,
    stop,
    wait_listening,
)

from outbox.cli.embedded_pg import EmbeddedPostgres  # noqa: E402
from outbox.dispatcher import limits  # noqa: E402

SENDER = "Outbox <noreply@example.com>"

# Due mail for the claim measurement: ``$1`` rows over ``$2`` domains, in no domain order.
FILL = """
INSERT INTO outbox (message_id, sender, recipient, recipient_name, subject, body_text,
                    recipient_domain, recipient_key, next_attempt_at)
SELECT format('<fill-%s@example.com>', i), 'Outbox <noreply@example.com>',
       format('u%s@d%s.example', i, (i::bigint * 7919) % $2), format('User %s', i), 'Welcome',
       'Hello', format('d%s.example', (i::bigint * 7919) % $2),
       format('u%s@d%s.example', i, (i::bigint * 7919) % $2),
       now() - make_interval(secs => i / 1000.0)
FROM generate_series(1, $1) AS i
"""

# Mail to one domain per row of ``$1`` (recipient addresses), all due, at priority $2.
ENQUEUE_TO = """
INSERT INTO outbox (message_id, sender, recipient, recipient_name, subject, body_text,
                    recipient_domain, recipient_key, priority)
SELECT format('<%s-%s@example.com>', $3::text, n), 'Outbox <noreply@example.com>', r,
       'User', 'Welcome', 'Hello', split_part(r, '@', 2), r, $2
FROM unnest($1::text[]) WITH ORDINALITY AS t(r, n)
"""


def outbox_command(url: str, *args: str) -> None:
    """Run ``outbox ARGS`` against ``url`` (the operators' command, as they would)."""
    subprocess.run(
        [sys.executable, "-m", "outbox.cli.main", *args],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": url},
        check=True,
        stdout=subprocess.DEVNULL,
    )


def parse_sink(lines: list[str]) -> tuple[list[tuple[float, str]], dict[str, int], int]:
    """(arrival time, domain) per mail in time order, most in flight per domain, 421s."""
    arrivals: list[tuple[float, str]] = []
    inflight: dict[str, int] = {}
    throttled = 0
    for line in lines:
        parts = line.split()
        if line.startswith("# inflight"):
            inflight[parts[2]] = int(parts[3])
        elif line.startswith("# throttled"):
            throttled += int(parts[3])
        elif not line.startswith("#"):
            arrivals.append((float(parts[0]), parts[2] if len(parts) > 2 else "-"))
    arrivals.sort()
    return arrivals, inflight, throttled


def most_in_window(times: list[float], window: float = 1.0) -> int:
    """The most arrivals in any ``window`` seconds."""
    return max((bisect.bisect_left(times, t + window) - i for i, t in enumerate(times)), default=0)


async def wait_count(conn: asyncpg.Connection, query: str, target: int, label: str) -> None:
    started = last = time.monotonic()
    while (count := await conn.fetchval(query)) < target:
        if time.monotonic() - last >= 2:
            log(f"    {label}: {count:,}/{target:,} ({time.monotonic() - started:.0f} s)")
            last = time.monotonic()
        if time.monotonic() - started > 900:
            raise SystemExit(f"{label}: only {count}/{target} after 900 s")
        await asyncio.sleep(0.05)


# --- 1. claim cost --------------------------------------------------------------------------


async def claim_cost(pg: EmbeddedPostgres, ns: argparse.Namespace) -> None:
    url = await fresh_database(pg, "claim")
    conn = await asyncpg.connect(url)
    try:
        log(f"  filling {ns.rows:,} due mails over {ns.domains:,} domains ...")
        started = time.monotonic()
        await conn.execute(FILL, ns.rows, ns.domains)
        await conn.execute("VACUUM ANALYZE outbox")
        log(f"  filled in {time.monotonic() - started:.0f} s")

        async def sample(policed: bool) -> tuple[float, int]:
            transaction = conn.transaction()
            await transaction.start()
            clock = time.perf_counter()
            claimed = await limits.claim(
                conn,
                limit=32,
                name="bench",
                lease=60.0,
                stale_after=6.0,
                max_abandons=5,
                policed=policed,  # as a dispatcher's next claim after one that was
            )
            elapsed = time.perf_counter() - clock
            await transaction.rollback()
            return elapsed, len(claimed.rows)

        async def configure(limited_domains: int) -> None:
            await conn.execute("DELETE FROM outbox_policies")
            if not limited_domains:
                return
            limited = [f"d{i}.example" for i in range(limited_domains)]
            paused = [f"d{i}.example" for i in range(limited_domains, limited_domains + 2)]
            await conn.execute(
                "INSERT INTO outbox_policies (domain, concurrency, paused) "
                "SELECT d, c, p FROM unnest($1::text[], $2::int[], $3::bool[]) AS t(d, c, p)",
                ["", *limited, *paused],
                [None] + [2] * len(limited) + [None] * len(paused),
                [False] * (1 + len(limited)) + [True] * len(paused),
            )
            # All mail: two windows (per second and per day) too wide to cut a claim short,
            # so that every configuration claims full batches of 32.
            await conn.execute(
                "INSERT INTO outbox_rate_limits (domain, per_seconds, max_count, burst, tokens) "
                "SELECT d, s, n, b, b "
                "FROM unnest($1::text[], $2::int[], $3::int[], $4::float8[]) AS t(d, s, n, b)",
                ["", "", *limited],
                [1, 86400] + [1] * len(limited),
                [100_000, 1_000_000_000] + [5] * len(limited),
                [100_000.0, 11_575.0] + [5.0] * len(limited),
            )

        configurations = [0, *ns.limited]
        figures: dict[int, list[float]] = {n: [] for n in configurations}
        sizes: dict[int, Counter[int]] = {n: Counter() for n in configurations}
        for round_ in range(ns.claim_rounds):
            order = configurations if round_ % 2 == 0 else configurations[::-1]
            for limited_domains in order:
                await configure(limited_domains)
                for _ in range(ns.claim_samples):
                    elapsed, size = await sample(policed=limited_domains > 0)
                    figures[limited_domains].append(elapsed * 1000)
                    sizes[limited_domains][size] += 1
        plain = statistics.median(figures[0])
        print(
            f"   no policy: {plain:.2f} ms per claim of 32 (median of {len(figures[0])}; "
            f"rows per claim {dict(sizes[0])})",
            flush=True,
        )
        for limited_domains in ns.limited:
            policed = statistics.median(figures[limited_domains])
            print(
                f"   limits on all mail (a window per second and per day) and on "
                f"{limited_domains} domains (5/s, concurrency 2), 2 domains paused: "
                f"{policed:.2f} ms per claim (rows per claim "
                f"{dict(sizes[limited_domains])}), {policed / plain:.2f}x (target <= 2x)",
                flush=True,
            )
    finally:
        await conn.close()


# --- 2. a global rate shared by three dispatchers ----------------------------------------------


async def global_rate(pg: EmbeddedPostgres, workdir: Path, ns: argparse.Namespace) -> None:
    rate, burst = 40, 40
    url = await fresh_database(pg, "global")
    sink = Sink(workdir)
    conn = await asyncpg.connect(url)
    procs = []
    try:
        outbox_command(url, "limit", "set", "--rate", f"{rate}/s")
        recipients = [f"user{i}@d{i % 50}.example" for i in range(ns.global_mails)]
        await conn.execute(ENQUEUE_TO, recipients, 5, "global")
        procs = [
            start_dispatcher(url, sink, "--name", f"g{i}", "--concurrency", "32") for i in range(3)
        ]
        await wait_count(
            conn,
            "SELECT count(*) FROM outbox WHERE status = 'sent'",
            ns.global_mails,
            "sent under 40/s",
        )
    finally:
        for proc in procs:
            stop(proc)
        await conn.close()
        arrivals, _, _ = parse_sink(sink.stop_lines())
    times = [at for at, _ in arrivals]
    first = times[0]
    excess = max(n + 1 - rate * (t - first) for n, t in enumerate(times))
    achieved = (len(times) - burst) / (times[-1] - first)
    print(
        f"   {len(times):,} mails; most above 40 t at any t: {excess:.1f} (burst {burst}); "
        f"rate after the burst {achieved:.1f}/s = {achieved / rate:.0%} of 40/s "
        "(target >= 90 %)",
        flush=True,
    )


# --- 3. one throttled domain among others ------------------------------------------------------


async def one_domain(pg: EmbeddedPostgres, workdir: Path, ns: argparse.Namespace) -> None:
    half = ns.domain_mails // 2

    async def run(label: str, slow: int) -> tuple[float, list[tuple[float, str]], dict[str, int]]:
        url = await fresh_database(pg, f"domain_{label}")
        sink = Sink(workdir, 0.0, 0.0, "--domain-delay", "slow.example=0.2")
        conn = await asyncpg.connect(url)
        proc = None
        try:
            outbox_command(
                url, "limit", "set", "--domain", "slow.example", "--rate", "5/s",
                "--concurrency", "2",
            )  # fmt: skip
            slow_to = [f"user{i}@slow.example" for i in range(slow)]
            fast_to = [f"user{i}@fast{i % 20}.example" for i in range(half)]
            await conn.execute(ENQUEUE_TO, slow_to, 5, "slow")  # first: ahead in order
            await conn.execute(ENQUEUE_TO, fast_to, 5, "fast")
            proc = start_dispatcher(url, sink, "--name", label, "--concurrency", "16")
            await wait_count(
                conn,
                "SELECT count(*) FROM outbox WHERE status = 'sent' "
                "AND recipient_domain <> 'slow.example'",
                half,
                f"{label}: other domains sent",
            )
            if slow:
                await asyncio.sleep(10)  # slow.example's pace over a while longer
        finally:
            if proc is not None:
                stop(proc)
            await conn.close()
            arrivals, inflight, _ = parse_sink(sink.stop_lines())
        fast_times = [at for at, domain in arrivals if domain != "slow.example"]
        return fast_times[-1] - fast_times[0], arrivals, inflight

    alone, _, _ = await run("alone", 0)
    mixed, arrivals, inflight = await run("mixed", half)
    slow_times = [at for at, domain in arrivals if domain == "slow.example"]
    print(
        f"   other domains' {half:,} mails: {alone:.2f} s alone, {mixed:.2f} s beside "
        f"{half:,} queued for slow.example: {mixed / alone:.2f}x (target <= 1.2x)",
        flush=True,
    )
    span = slow_times[-1] - slow_times[0] if len(slow_times) > 1 else 0.0
    print(
        f"   slow.example: {len(slow_times)} sent in {span:.1f} s, most in any 1 s "
        f"{most_in_window(slow_times)} (bound 5 + burst 5), most in flight at the sink "
        f"{inflight.get('slow.example', 0)} (limit 2)",
        flush=True,
    )


# --- 4. adaptive throttling ----------------------------------------------------------------------


async def adaptive(pg: EmbeddedPostgres, workdir: Path, ns: argparse.Namespace) -> None:
    url = await fresh_database(pg, "adaptive")
    sink = Sink(workdir, 0.0, 0.0, "--domain-rate", "limited.example=5")
    conn = await asyncpg.connect(url)
    proc = None
    seconds = 30.0
    try:
        limited_to = [f"user{i}@limited.example" for i in range(400)]
        other_to = [f"user{i}@other{i % 10}.example" for i in range(400)]
        await conn.execute(ENQUEUE_TO, limited_to, 5, "limited")
        await conn.execute(ENQUEUE_TO, other_to, 5, "other")
        proc = start_dispatcher(
            url,
            sink,
            "--name",
            "adaptive",
            "--concurrency",
            "16",
            DISPATCHER_RETRY_BASE="0.5",
            DISPATCHER_RETRY_CAP="5",
        )
        await asyncio.sleep(seconds)
        effective = await conn.fetchrow(
            "SELECT throttle_rate, throttle_base, throttled_at FROM outbox_policies "
            "WHERE domain = 'limited.example'"
        )
        stats = await conn.fetchrow(
            "SELECT count(*) FILTER (WHERE status = 'sent') AS sent, "
            "sum(attempts) AS attempts FROM outbox WHERE recipient_domain = 'limited.example'"
        )
        others = await conn.fetchval(
            "SELECT count(*) FROM outbox WHERE status = 'sent' "
            "AND recipient_domain <> 'limited.example'"
        )
    finally:
        if proc is not None:
            stop(proc)
        await conn.close()
        _, _, throttled = parse_sink(sink.stop_lines())
    sent = stats["sent"] or 0
    print(
        f"   limited.example over {seconds:.0f} s: {sent} delivered "
        f"({sent / seconds:.1f}/s; its server takes 5/s), {throttled} answers 421, "
        f"{(stats['attempts'] or 0) / max(1, sent):.2f} attempts per delivered mail; other "
        f"domains: {others}/400 delivered",
        flush=True,
    )
    if effective is not None and effective["throttle_rate"] is not None:
        print(
            f"   throttle as last set: {effective['throttle_base']:.2f}/s halved to "
            f"{effective['throttle_rate']:.2f}/s (then rising by that every 10 s)",
            flush=True,
        )


# --- 5. priority --------------------------------------------------------------------------------


async def priority(pg: EmbeddedPostgres, workdir: Path, ns: argparse.Namespace) -> None:
    from outbox.dispatcher.outbox import Mail, enqueue

    async def probes(label: str, backlog: int) -> list[float]:
        url = await fresh_database(pg, f"priority_{label}")
        sink = Sink(workdir, 0.002)
        conn = await asyncpg.connect(url)
        proc = start_dispatcher(url, sink, "--name", label)
        committed: dict[str, float] = {}
        try:
            await wait_listening(conn, label, proc)
            if backlog:
                recipients = [f"bulk{i}@bulk.example" for i in range(backlog)]
                await conn.execute(ENQUEUE_TO, recipients, 5, "bulk")
                await asyncio.sleep(0.5)  # the drain is under way
            for i in range(5):
                mail = Mail(f"urgent{i}@urgent.example", "Your code", "123456\n")
                async with conn.transaction():
                    queued = await enqueue(conn, mail, sender=SENDER, priority=0)
                committed[queued.message_id] = time.time()
                await asyncio.sleep(0.3)
            pending = await conn.fetchval("SELECT count(*) FROM outbox WHERE status <> 'sent'")
            await wait_count(
                conn,
                "SELECT count(*) FROM outbox WHERE status = 'sent' "
                "AND recipient_domain = 'urgent.example'",
                5,
                f"{label}: urgent mail sent",
            )
        finally:
            stop(proc)
            await conn.close()
            lines = sink.stop_lines()
        if backlog:
            log(f"    {pending:,} bulk mails still queued after the last urgent one")
        accepted = {line.split()[1]: float(line.split()[0]) for line in lines if line[0] != "#"}
        return [(accepted[mid] - at) * 1000 for mid, at in committed.items() if mid in accepted]

    idle = await probes("idle", 0)
    busy = await probes("busy", ns.backlog)
    ratio = statistics.median(busy) / statistics.median(idle)
    print(
        f"   priority-0 mail, commit -> SMTP: idle median {statistics.median(idle):.1f} ms, "
        f"behind {ns.backlog:,} priority-5 mails median {statistics.median(busy):.1f} ms "
        f"(max {max(busy):.1f}): {ratio:.2f}x (target <= 2x)",
        flush=True,
    )


async def run(ns: argparse.Namespace) -> None:
    parts = ns.only or ["claim", "global", "domain", "adaptive", "priority"]
    workdir = Path(tempfile.mkdtemp(prefix="outbox-bench-policy-"))
    pg = EmbeddedPostgres(workdir / "pg")
    log(f"starting PostgreSQL in {workdir} ...")
    await asyncio.to_thread(pg.start)
    finished = False
    try:
        if "claim" in parts:
            print(f"1. claim cost, {ns.rows:,} due mails over {ns.domains:,} domains", flush=True)
            await claim_cost(pg, ns)
        if "global" in parts:
            print(f"2. global 40/s, three dispatchers, {ns.global_mails:,} mails", flush=True)
            await global_rate(pg, workdir, ns)
        if "domain" in parts:
            print(f"3. slow.example at 5/s, concurrency 2, among {ns.domain_mails:,}", flush=True)
            await one_domain(pg, workdir, ns)
        if "adaptive" in parts:
            print("4. adaptive throttling against a server that takes 5/s", flush=True)
            await adaptive(pg, workdir, ns)
        if "priority" in parts:
            print(f"5. priority 0 behind {ns.backlog:,} due mails", flush=True)
            await priority(pg, workdir, ns)
        finished = True
    finally:
        await asyncio.to_thread(pg.stop)
        if finished:
            await asyncio.to_thread(shutil.rmtree, workdir, True)
        else:
            log(f"kept {workdir}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=("claim", "global", "domain", "adaptive", "priority"),
        help="run only this measurement (repeatable; default: all)",
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--domains", type=int, default=10_000)
    parser.add_argument(
        "--limited",
        type=int,
        action="append",
        help="claim cost with this many limited domains (repeatable; default 10 and 100)",
    )
    parser.add_argument("--claim-rounds", type=int, default=4)
    parser.add_argument("--claim-samples", type=int, default=50)
    parser.add_argument("--global-mails", type=int, default=3000)
    parser.add_argument("--domain-mails", type=int, default=2000)
    parser.add_argument("--backlog", type=int, default=10_000)
    ns = parser.parse_args()
    ns.limited = ns.limited or [10, 100]
    asyncio.run(run(ns))


if __name__ == "__main__":
    main()
