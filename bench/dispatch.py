"""Benchmark: how fast the dispatcher drains the outbox, against a raw SMTP client.

    ./run bench dispatch [--mails 5000] [--concurrency 16] [--rounds 2]
                         [--latency-seconds 10] [--slow-mails 6000]

Starts its own embedded PostgreSQL (durable default settings) and SMTP sinks
(bench/sink.py, aiosmtpd in separate processes), then measures three things:

1. drain: N pre-filled rows sent by ``outbox dispatcher`` vs. a raw aiosmtplib client
   sending the same N messages (rendered beforehand, outside its timing) with the same
   concurrency to the same sink. Rounds alternate raw/dispatcher; medians are compared.
   Dispatcher time runs from its first SMTP transaction to its last recorded outcome.
2. latency: an idle dispatcher (default settings, woken by NOTIFY) while mail is enqueued
   at a steady 100/s; commit -> SMTP accepted (sink clock, same host), p50 and p99.
3. slow sink: the sink takes 200 ms per message and answers 451 to 10 %; one dispatcher
   process with high concurrency; mails per minute, lost and duplicated mail.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiosmtplib
import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cli import migrate  # noqa: E402
from cli.embedded_pg import EmbeddedPostgres, free_port  # noqa: E402
from dispatcher.message import build_message  # noqa: E402
from dispatcher.settings import parse_address  # noqa: E402

PREFILL = """
INSERT INTO outbox (message_id, sender, recipient, recipient_name, subject, body_text,
                    body_html)
SELECT format('<bench-%s-%s@example.com>', $2::text, i), 'Outbox <noreply@example.com>',
       format('user-%s@example.com', i), format('User %s', i),
       format('Welcome to Outbox, User %s!', i),
       format(E'Hello User %s,\\n\\nthank you for registering with Outbox.\\n', i),
       format('<!doctype html><p>Hello User %s,</p><p>thank you for registering.</p>', i)
FROM generate_series(1, $1) AS i
"""


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Sink:
    """bench/sink.py in its own process."""

    def __init__(self, workdir: Path, delay: float = 0.0, fail_rate: float = 0.0) -> None:
        self.port = free_port()
        self.log = Path(tempfile.mktemp(dir=workdir, suffix=".sink"))  # noqa: S306
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "bench" / "sink.py"),
                "--port",
                str(self.port),
                "--log",
                str(self.log),
                "--delay",
                str(delay),
                "--fail-rate",
                str(fail_rate),
            ],
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == b"ready"

    def stop(self) -> tuple[list[tuple[float, str]], int]:
        """Stop the sink; return (accept time, Message-ID) per mail and the 451 count."""
        self.proc.terminate()
        self.proc.wait(30)
        accepted, refused = [], 0
        for line in self.log.read_text().splitlines():
            if line.startswith("# refused"):
                refused = int(line.split()[-1])
            else:
                at, message_id = line.split(" ", 1)
                accepted.append((float(at), message_id))
        return accepted, refused


def dispatcher_env(url: str, sink: Sink, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISPATCHER_", "SMTP_"))}
    env.update(DATABASE_URL=url, SMTP_HOST="127.0.0.1", SMTP_PORT=str(sink.port), **extra)
    return env


def start_dispatcher(url: str, sink: Sink, *args: str, **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "cli.main", "dispatcher", *args],
        cwd=ROOT,
        env=dispatcher_env(url, sink, **env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


async def fresh_database(pg: EmbeddedPostgres, name: str) -> str:
    url = await asyncio.to_thread(pg.create_database, name)
    await asyncio.to_thread(migrate.upgrade, url)
    return url


async def wait_sent(conn: asyncpg.Connection, total: int, label: str, timeout: float = 600) -> None:
    """Poll until every row is sent, printing progress."""
    started = time.monotonic()
    last_print = 0.0
    while True:
        sent = await conn.fetchval("SELECT count(*) FROM outbox WHERE status = 'sent'")
        now = time.monotonic()
        if now - last_print > 2 or sent == total:
            log(f"    {label}: {sent}/{total} sent")
            last_print = now
        if sent == total:
            return
        if now - started > timeout:
            raise SystemExit(f"{label}: only {sent}/{total} sent after {timeout}s")
        await asyncio.sleep(0.05)


# --- 1. drain -------------------------------------------------------------------------------


async def raw_client(url: str, port: int, concurrency: int, render: bool) -> float:
    """Send every outbox row with plain aiosmtplib; return mails per second.

    With ``render`` the client builds each message (as the dispatcher must) inside its
    timing; without it, every message is rendered beforehand: the floor of SMTP cost.
    """
    conn = await asyncpg.connect(url)
    rows = await conn.fetch("SELECT * FROM outbox ORDER BY id")
    await conn.close()
    prepared = {} if render else {r["id"]: build_message(r).as_bytes() for r in rows}
    queue = iter(rows)

    async def worker() -> None:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
        await smtp.connect()
        for row in queue:
            data = prepared.get(row["id"]) or build_message(row).as_bytes()
            await smtp.sendmail(parse_address(row["sender"]).addr_spec, [row["recipient"]], data)
        await smtp.quit()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(rows) / (time.perf_counter() - started)


def run_raw_client(url: str, port: int, concurrency: int, render: bool) -> float:
    result = subprocess.run(
        [
            sys.executable,
            __file__,
            "--raw-client",
            url,
            str(port),
            str(concurrency),
            "render" if render else "prebuilt",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(result.stdout.strip())


async def drain_round(
    pg: EmbeddedPostgres, workdir: Path, ns: argparse.Namespace, round_no: int
) -> tuple[float, float, float]:
    sink = Sink(workdir)
    try:
        url = await fresh_database(pg, f"drain_raw_{round_no}")
        conn = await asyncpg.connect(url)
        await conn.execute(PREFILL, ns.mails, "raw")
        await conn.close()
        log(f"  round {round_no}: raw aiosmtplib client, {ns.mails} mails, pre-rendered ...")
        raw_rate = await asyncio.to_thread(run_raw_client, url, sink.port, ns.concurrency, False)
        log(f"  round {round_no}: raw aiosmtplib client, rendering as it sends ...")
        rendering_rate = await asyncio.to_thread(
            run_raw_client, url, sink.port, ns.concurrency, True
        )

        url = await fresh_database(pg, f"drain_dispatcher_{round_no}")
        conn = await asyncpg.connect(url)
        await conn.execute(PREFILL, ns.mails, "dispatcher")
        log(f"  round {round_no}: outbox dispatcher, {ns.mails} mails ...")
        proc = start_dispatcher(
            url,
            sink,
            "--concurrency",
            str(ns.concurrency),
            "--batch-size",
            str(ns.batch_size),
            "--name",
            "bench",
        )
        try:
            await wait_sent(conn, ns.mails, "dispatcher")
        finally:
            stop(proc)
        span = await conn.fetchval(
            "SELECT extract(epoch FROM max(finished_at) - min(started_at)) FROM outbox_attempts"
        )
        await conn.close()
        ours = ns.mails / float(span)
        log(
            f"    raw {raw_rate:,.0f} / raw rendering {rendering_rate:,.0f} / "
            f"dispatcher {ours:,.0f} mails/s"
        )
        return raw_rate, rendering_rate, ours
    finally:
        sink.stop()


# --- 2. latency -----------------------------------------------------------------------------


async def latency(pg: EmbeddedPostgres, workdir: Path, seconds: float) -> list[float]:
    from email.headerregistry import Address

    from dispatcher.outbox import Mail, enqueue

    sink = Sink(workdir)
    url = await fresh_database(pg, "latency")
    proc = start_dispatcher(url, sink, "--name", "idle")  # default settings
    committed: dict[str, float] = {}
    try:
        conn = await asyncpg.connect(url)
        listening = (
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'outbox-listener:idle'"
        )
        for _ in range(600):
            if await conn.fetchval(listening):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # the dispatcher is now idle, waiting for NOTIFY
        sender = Address("Outbox", "noreply", "example.com")
        total = int(seconds * 100)
        log(f"  enqueueing {total} mails at 100/s ...")
        start = time.perf_counter()
        for i in range(total):
            await asyncio.sleep(max(0.0, start + i / 100 - time.perf_counter()))
            mail = Mail(
                Address(f"User {i}", f"lat-{i}", "example.com"),
                f"Hello {i}",
                f"Hello {i}\n",
                f"<p>Hello {i}</p>",
            )
            async with conn.transaction():
                queued = await enqueue(conn, mail, sender=sender)
            committed[queued.message_id] = time.time()
        await wait_sent(conn, total, "idle dispatcher")
        await conn.close()
    finally:
        stop(proc)
        accepted, _ = sink.stop()
    return sorted((at - committed[mid]) * 1000 for at, mid in accepted if mid in committed)


# --- 3. slow, flaky sink ---------------------------------------------------------------------


async def slow_sink(
    pg: EmbeddedPostgres, workdir: Path, ns: argparse.Namespace
) -> dict[str, float]:
    sink = Sink(workdir, delay=0.2, fail_rate=0.1)
    url = await fresh_database(pg, "slow")
    conn = await asyncpg.connect(url)
    await conn.execute(PREFILL, ns.slow_mails, "slow")
    ids = {r["message_id"] for r in await conn.fetch("SELECT message_id FROM outbox")}
    log(
        f"  {ns.slow_mails} mails, sink 200 ms/message, 451 to 10 %, "
        f"concurrency {ns.slow_concurrency} ..."
    )
    proc = start_dispatcher(
        url,
        sink,
        "--concurrency",
        str(ns.slow_concurrency),
        "--batch-size",
        "256",
        "--name",
        "slow",
        DISPATCHER_RETRY_BASE="0.5",
        DISPATCHER_RETRY_CAP="2",
        DISPATCHER_MAX_ATTEMPTS="50",
    )
    try:
        await wait_sent(conn, ns.slow_mails, "slow sink")
    finally:
        stop(proc)
    span = float(
        await conn.fetchval(
            "SELECT extract(epoch FROM max(finished_at) - min(started_at)) FROM outbox_attempts"
        )
    )
    await conn.close()
    accepted, refused = sink.stop()
    counts = Counter(mid for _, mid in accepted)
    return {
        "per_minute": ns.slow_mails / span * 60,
        "lost": len(ids - set(counts)),
        "duplicates": sum(n - 1 for n in counts.values()),
        "refused_451": refused,
    }


def pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


async def run(ns: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="outbox-bench-"))
    pg = EmbeddedPostgres(workdir / "pg")
    log(f"starting PostgreSQL in {workdir} ...")
    await asyncio.to_thread(pg.start)
    try:
        print(
            f"1. drain {ns.mails} mails, concurrency {ns.concurrency} (rounds alternate; medians)",
            flush=True,
        )
        rounds = [await drain_round(pg, workdir, ns, i) for i in range(ns.rounds)]
        raw = statistics.median(r for r, _, _ in rounds)
        rendering = statistics.median(r for _, r, _ in rounds)
        ours = statistics.median(o for _, _, o in rounds)
        print(f"   raw aiosmtplib, pre-rendered bytes  {raw:8,.0f} mails/s")
        print(f"   raw aiosmtplib, rendering each mail {rendering:8,.0f} mails/s")
        print(
            f"   outbox dispatcher                   {ours:8,.0f} mails/s   "
            f"ratio {ours / raw:.2f}x pre-rendered, {ours / rendering:.2f}x rendering "
            f"(target >= 0.85x)",
            flush=True,
        )

        print(
            f"2. latency at 100 mails/s for {ns.latency_seconds:.0f} s, idle dispatcher", flush=True
        )
        lat = await latency(pg, workdir, ns.latency_seconds)
        print(
            f"   commit -> SMTP accepted: p50 {pct(lat, 0.5):.1f} ms, p99 {pct(lat, 0.99):.1f} "
            f"ms, max {lat[-1]:.1f} ms (targets p50 <= 10, p99 <= 50)",
            flush=True,
        )

        print("3. slow sink (200 ms per message, 451 to 10 %)", flush=True)
        slow = await slow_sink(pg, workdir, ns)
        print(
            f"   {slow['per_minute']:,.0f} mails/min per dispatcher process "
            f"(target >= 30,000); lost {slow['lost']}, duplicates {slow['duplicates']}, "
            f"451 answers {slow['refused_451']:.0f}",
            flush=True,
        )
    finally:
        await asyncio.to_thread(pg.stop)


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "--raw-client":
        rate = asyncio.run(
            raw_client(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "render")
        )
        print(json.dumps(rate))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mails", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    parser.add_argument("--slow-mails", type=int, default=6000)
    parser.add_argument("--slow-concurrency", type=int, default=200)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
