"""Benchmark: how fast the dispatcher drains the outbox, against a raw SMTP client.

    ./run bench dispatch [--mails 5000] [--concurrency 16] [--batch-size 64] [--rounds 2]
                         [--latency-seconds 10] [--slow-mails 6000] [--slow-concurrency 200]
                         [--only drain|latency|slow] [--sink lean|aiosmtpd] [--no-pipelining]
                         [--profile FILE]

Starts its own embedded PostgreSQL (durable default settings) and SMTP sinks
(bench/sink.py in separate processes: by default a minimal asyncio SMTP server, so that
the clients and not the sink set the pace; ``--sink aiosmtpd`` uses aiosmtpd, whose CPU
per mail exceeds the raw client's), then measures three things:

1. drain: N pre-filled rows sent by ``outbox dispatcher`` vs. a raw aiosmtplib client
   sending the same N messages with the same concurrency to the same sink, in two forms:

   * pre-built: every message is rendered by ``build_message`` (the exact bytes the
     dispatcher sends) and its envelope resolved before the timing starts; the client only
     runs ``SMTP.sendmail``. The floor of SMTP cost, and the target's baseline.
   * EmailMessage app: what a typical application does, building each message as it
     sends it with ``email.message.EmailMessage`` and ``headerregistry.Address``
     (``set_content``, ``add_alternative``) and ``SMTP.send_message``.

   Rounds alternate the order of the three runs; per-round ratios are reported and their
   medians compared. Throughput: the raw client's time from its first connection to its
   last reply; the dispatcher's from its first attempt's start to its last attempt's end
   (``outbox_attempts``). CPU per mail: process CPU time (``time.process_time``) of the
   raw client while it sends, and of the dispatcher process from just before the rows are
   committed (it is idle then, woken by NOTIFY) until every row is recorded as sent; it
   logs (one JSON line per mail, as in production) to a file in the work directory.
   Beside them, from /proc: the sink's CPU per mail, and for the dispatcher that of the
   PostgreSQL backends serving it (the machine's cores are shared by all of them).
   ``--profile FILE`` adds one dispatcher drain under cProfile, saves the stats to FILE
   and prints where the dispatcher's time goes.
2. latency: an idle dispatcher (default settings, woken by NOTIFY) while mail is enqueued
   at a steady 100/s; commit -> SMTP accepted (sink clock, same host), p50 and p99.
3. slow sink: the sink takes 200 ms per message and answers 451 to 10 %; one dispatcher
   process with high concurrency; mails per minute, lost and duplicated mail.

The work directory (PostgreSQL's data, the dispatchers' logs) is removed after a run
that finishes, and kept, with its path printed, after one that does not.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path
from types import FrameType
from typing import Any, BinaryIO

import aiosmtplib
import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from outbox.cli import migrate  # noqa: E402
from outbox.cli.embedded_pg import EmbeddedPostgres, free_port  # noqa: E402
from outbox.dispatcher.message import build_message  # noqa: E402
from outbox.dispatcher.settings import parse_address  # noqa: E402

PREFILL = """
INSERT INTO outbox (message_id, sender, recipient, recipient_domain, recipient_key,
                    recipient_name, subject, body_text, body_html)
SELECT format('<bench-%s-%s@example.com>', $2::text, i), 'Outbox <noreply@example.com>',
       format('user-%s@example.com', i), 'example.com', format('user-%s@example.com', i),
       format('User %s', i),
       format('Welcome to Outbox, User %s!', i),
       format(E'Hello User %s,\\n\\nthank you for registering with Outbox.\\n', i),
       format('<!doctype html><p>Hello User %s,</p><p>thank you for registering.</p>', i)
FROM generate_series(1, $1) AS i
"""
#: The drain target: dispatcher throughput over the raw client's with pre-built bytes.
TARGET = 0.6
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Sink:
    """bench/sink.py in its own process."""

    #: Which server bench/sink.py runs (--sink), and whether it offers PIPELINING.
    server = "lean"
    pipelining = True

    def __init__(
        self, workdir: Path, delay: float = 0.0, fail_rate: float = 0.0, *extra: str
    ) -> None:
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
                "--server",
                self.server,
                *(() if self.pipelining else ("--no-pipelining",)),
                *extra,
            ],
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == b"ready"

    def stop(self) -> tuple[list[tuple[float, str]], int]:
        """Stop the sink; return (accept time, Message-ID) per mail and the 451 count."""
        accepted, refused = [], 0
        for line in self.stop_lines():
            if line.startswith("# refused"):
                refused = int(line.split()[-1])
            elif not line.startswith("#"):
                at, message_id = line.split(" ", 2)[:2]
                accepted.append((float(at), message_id))
        return accepted, refused

    def stop_lines(self) -> list[str]:
        """Stop the sink; the lines of its log (see bench/sink.py)."""
        self.proc.terminate()
        self.proc.wait(30)
        return self.log.read_text().splitlines()


def dispatcher_env(url: str, sink: Sink, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISPATCHER_", "SMTP_"))}
    env.update(DATABASE_URL=url, SMTP_HOST="127.0.0.1", SMTP_PORT=str(sink.port), **extra)
    return env


def start_dispatcher(url: str, sink: Sink, *args: str, **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "outbox.cli.main", "dispatcher", *args],
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


async def drop_database(pg: EmbeddedPostgres, name: str) -> None:
    """Drop a finished round's database, so that no autovacuum of its rows runs during the
    next measurement."""
    conn = await asyncpg.connect(pg.url())
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def wait_sent(conn: asyncpg.Connection, total: int, label: str, timeout: float = 600) -> None:
    """Poll until every row is sent, printing progress every 2 seconds."""
    started = time.monotonic()
    last_print = started
    while True:
        sent = await conn.fetchval("SELECT count(*) FROM outbox WHERE status = 'sent'")
        now = time.monotonic()
        if now - last_print >= 2 or sent == total:
            log(f"    {label}: {sent:,}/{total:,} sent ({now - started:.1f} s)")
            last_print = now
        if sent == total:
            return
        if now - started > timeout:
            raise SystemExit(f"{label}: only {sent}/{total} sent after {timeout}s")
        await asyncio.sleep(0.05)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, from /proc (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


async def backends_cpu(conn: asyncpg.Connection, name: str) -> dict[int, float]:
    """CPU time so far of each PostgreSQL backend serving the dispatcher ``name``."""
    pids = await conn.fetch(
        "SELECT pid FROM pg_stat_activity WHERE application_name = ANY($1::text[])",
        [f"outbox-dispatcher:{name}", f"outbox-listener:{name}"],
    )
    return {row["pid"]: cpu_seconds(row["pid"]) for row in pids}


def open_log(path: Path) -> BinaryIO:
    return path.open("wb")


async def wait_listening(
    conn: asyncpg.Connection,
    name: str,
    proc: subprocess.Popen[bytes],
    log_path: Path | None = None,
) -> None:
    """Wait until the dispatcher ``name`` LISTENs, then a little more: it is idle then."""
    listening = "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
    where = f" (its log: {log_path})" if log_path else ""
    deadline = time.monotonic() + 120
    while not await conn.fetchval(listening, f"outbox-listener:{name}"):
        if proc.poll() is not None:
            raise SystemExit(f"dispatcher {name} exited with status {proc.returncode}{where}")
        if time.monotonic() > deadline:
            raise SystemExit(f"dispatcher {name} did not start listening within 120 s{where}")
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)


# --- 1. drain -------------------------------------------------------------------------------


def typical_message(row: Any, senders: dict[str, Address]) -> EmailMessage:
    """The message as a typical application builds it: EmailMessage and Address."""
    sender = senders.get(row["sender"])
    if sender is None:
        sender = senders[row["sender"]] = parse_address(row["sender"])
    local, _, domain = row["recipient"].rpartition("@")
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = Address(row["recipient_name"] or "", local, domain)
    msg["Subject"] = row["subject"]
    msg["Date"] = format_datetime(row["created_at"])
    msg["Message-ID"] = row["message_id"]
    msg.set_content(row["body_text"])
    if row["body_html"] is not None:
        msg.add_alternative(row["body_html"], subtype="html")
    return msg


async def raw_client(url: str, port: int, concurrency: int, mode: str) -> dict[str, float]:
    """Send every outbox row with plain aiosmtplib; return mails/s and CPU ms per mail.

    ``prebuilt``: each message is rendered by ``build_message`` and its envelope resolved
    before the timing starts. ``app``: each is built with EmailMessage as it is sent.
    """
    conn = await asyncpg.connect(url)
    rows = await conn.fetch("SELECT * FROM outbox ORDER BY id")
    await conn.close()
    prebuilt: list[tuple[str, str, bytes]] = []
    if mode == "prebuilt":
        for row in rows:
            rendered = build_message(row)
            prebuilt.append((str(rendered.sender), str(rendered.recipient), rendered.as_bytes()))
    senders: dict[str, Address] = {}
    jobs = iter(range(len(rows)))
    sent = 0

    async def worker() -> None:
        nonlocal sent
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
        await smtp.connect()
        for i in jobs:
            if prebuilt:
                sender, recipient, data = prebuilt[i]
                await smtp.sendmail(sender, [recipient], data)
            else:
                await smtp.send_message(typical_message(rows[i], senders))
            sent += 1
        await smtp.quit()

    async def progress() -> None:
        while True:
            await asyncio.sleep(2)
            log(f"    raw client ({mode}): {sent:,}/{len(rows):,} sent")

    reporter = asyncio.create_task(progress())
    cpu, started = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    reporter.cancel()
    log(f"    raw client ({mode}): {sent:,}/{len(rows):,} sent ({wall:.1f} s)")
    return {"rate": len(rows) / wall, "cpu_ms": 1000 * cpu / len(rows), "mails": len(rows)}


def run_raw_client(sink: Sink, url: str, concurrency: int, mode: str) -> dict[str, float]:
    sink_cpu = cpu_seconds(sink.proc.pid)
    result = subprocess.run(
        [sys.executable, __file__, "--raw-client", url, str(sink.port), str(concurrency), mode],
        stdout=subprocess.PIPE,  # stderr (progress) goes to ours
        text=True,
        check=True,
    )
    figures: dict[str, float] = json.loads(result.stdout)
    mails = figures.pop("mails")
    figures["sink_ms"] = 1000 * (cpu_seconds(sink.proc.pid) - sink_cpu) / mails
    return figures


def dispatcher_process(marks: str, profile: str, argv: list[str]) -> int:
    """Run ``outbox dispatcher ARGV`` in this process, marking its CPU time on signals.

    SIGUSR1 appends ``time.process_time()`` to ``marks`` (and starts the profiler if
    ``profile`` is not "-"); SIGUSR2 stops the profiler, saves it to ``profile``, then
    appends the CPU time again.
    """
    profiler = cProfile.Profile() if profile != "-" else None

    def mark(signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGUSR2 and profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile)
        with open(marks, "a") as out:
            out.write(f"{time.process_time()!r}\n")
        if signum == signal.SIGUSR1 and profiler is not None:
            profiler.enable()

    signal.signal(signal.SIGUSR1, mark)
    signal.signal(signal.SIGUSR2, mark)
    from outbox.cli.main import main

    return main(["dispatcher", *argv])


def read_marks(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def wait_mark(path: Path, count: int) -> float:
    for _ in range(600):
        lines = read_marks(path)
        if len(lines) >= count:
            return float(lines[count - 1])
        await asyncio.sleep(0.01)
    raise SystemExit("the dispatcher did not answer the CPU-time signal")


def start_marked_dispatcher(
    url: str,
    sink: Sink,
    ns: argparse.Namespace,
    name: str,
    marks: Path,
    profile: str,
    log_file: BinaryIO,
) -> subprocess.Popen[bytes]:
    """``outbox dispatcher`` run through :func:`dispatcher_process`, logging to a file."""
    return subprocess.Popen(
        [
            *(sys.executable, __file__, "--dispatcher-process", str(marks), profile),
            *("--concurrency", str(ns.concurrency), "--batch-size", str(ns.batch_size)),
            *("--name", name),
        ],
        cwd=ROOT,
        env=dispatcher_env(url, sink),
        stdout=subprocess.DEVNULL,
        stderr=log_file,
    )


async def dispatcher_drain(
    pg: EmbeddedPostgres,
    workdir: Path,
    sink: Sink,
    ns: argparse.Namespace,
    db_name: str,
    profile: str = "-",
) -> dict[str, float]:
    """Drain ``ns.mails`` rows with one dispatcher; return mails/s and its CPU ms per mail."""
    url = await fresh_database(pg, db_name)
    conn = await asyncpg.connect(url)
    marks = workdir / f"{db_name}.cpu"
    name = "bench"
    log_path = workdir / f"{db_name}.log"
    with open_log(log_path) as log_file:
        proc = start_marked_dispatcher(url, sink, ns, name, marks, profile, log_file)
    try:
        await wait_listening(conn, name, proc, log_path)
        proc.send_signal(signal.SIGUSR1)
        cpu_start = await wait_mark(marks, 1)
        sink_start = cpu_seconds(sink.proc.pid)
        async with conn.transaction():  # NOTIFY wakes the idle dispatcher at commit
            await conn.execute(PREFILL, ns.mails, db_name)
            await conn.execute("SELECT pg_notify('outbox_mail', '')")
        pg_start = await backends_cpu(conn, name)
        await wait_sent(conn, ns.mails, "dispatcher")
        proc.send_signal(signal.SIGUSR2)
        cpu_end = await wait_mark(marks, 2)
        pg_end = await backends_cpu(conn, name)
        sink_end = cpu_seconds(sink.proc.pid)
    finally:
        stop(proc)
    span = await conn.fetchval(
        "SELECT extract(epoch FROM max(finished_at) - min(started_at)) FROM outbox_attempts"
    )
    await conn.close()
    await drop_database(pg, db_name)
    pg_cpu = sum(end - pg_start.get(pid, 0.0) for pid, end in pg_end.items())
    return {
        "rate": ns.mails / float(span),
        "cpu_ms": 1000 * (cpu_end - cpu_start) / ns.mails,
        "sink_ms": 1000 * (sink_end - sink_start) / ns.mails,
        "pg_ms": 1000 * pg_cpu / ns.mails,
    }


@dataclass
class DrainRound:
    prebuilt: dict[str, float]
    app: dict[str, float]
    dispatcher: dict[str, float]


async def drain_round(
    pg: EmbeddedPostgres, workdir: Path, ns: argparse.Namespace, round_no: int
) -> DrainRound:
    sink = Sink(workdir)
    figures: dict[str, dict[str, float]] = {}
    try:
        url = await fresh_database(pg, f"drain_raw_{round_no}")
        conn = await asyncpg.connect(url)
        await conn.execute(PREFILL, ns.mails, "raw")
        await conn.close()
        order = ["prebuilt", "app", "dispatcher"]
        if round_no % 2:
            order.reverse()
        for step in order:
            if step == "dispatcher":
                log(f"  round {round_no + 1}: outbox dispatcher, {ns.mails:,} mails ...")
                figures[step] = await dispatcher_drain(
                    pg, workdir, sink, ns, f"drain_dispatcher_{round_no}"
                )
            else:
                what = "pre-built bytes" if step == "prebuilt" else "building EmailMessages"
                log(f"  round {round_no + 1}: raw aiosmtplib client, {what} ...")
                figures[step] = await asyncio.to_thread(
                    run_raw_client, sink, url, ns.concurrency, step
                )
    finally:
        sink.stop()
        await drop_database(pg, f"drain_raw_{round_no}")
    result = DrainRound(figures["prebuilt"], figures["app"], figures["dispatcher"])
    log(
        f"    round {round_no + 1}: mails/s (CPU ms/mail): "
        f"raw pre-built {result.prebuilt['rate']:,.0f} ({result.prebuilt['cpu_ms']:.3f}), "
        f"raw EmailMessage {result.app['rate']:,.0f} ({result.app['cpu_ms']:.3f}), "
        f"dispatcher {result.dispatcher['rate']:,.0f} ({result.dispatcher['cpu_ms']:.3f}); "
        f"dispatcher / pre-built {result.dispatcher['rate'] / result.prebuilt['rate']:.2f}x"
    )
    return result


def print_drain(ns: argparse.Namespace, rounds: list[DrainRound]) -> None:
    def med(pick: Any) -> float:
        return float(statistics.median(pick(r) for r in rounds))

    print(
        f"   {'':34} {'mails/s':>8} {'CPU ms/mail':>12} {'sink ms/mail':>13} "
        f"{'PostgreSQL ms/mail':>19}"
    )
    for label, key in (
        ("raw aiosmtplib, pre-built bytes", "prebuilt"),
        ("raw aiosmtplib, EmailMessage app", "app"),
        ("outbox dispatcher", "dispatcher"),
    ):
        rate = med(lambda r, k=key: getattr(r, k)["rate"])
        cpu = med(lambda r, k=key: getattr(r, k)["cpu_ms"])
        sink = med(lambda r, k=key: getattr(r, k)["sink_ms"])
        pg = f"{med(lambda r: r.dispatcher['pg_ms']):19.3f}" if key == "dispatcher" else ""
        print(f"   {label:34} {rate:8,.0f} {cpu:12.3f} {sink:13.3f} {pg}")
    for label, key in (("pre-built", "prebuilt"), ("EmailMessage app", "app")):
        speeds = [r.dispatcher["rate"] / getattr(r, key)["rate"] for r in rounds]
        cpus = [r.dispatcher["cpu_ms"] / getattr(r, key)["cpu_ms"] for r in rounds]
        speed = statistics.median(speeds)
        verdict = ""
        if key == "prebuilt":
            verdict = f" (target >= {TARGET}x: {'met' if speed >= TARGET else 'MISSED'})"
        print(
            f"   dispatcher / raw {label}: throughput {speed:.2f}x{verdict}, "
            f"CPU per mail {statistics.median(cpus):.2f}x  "
            f"[per round: {' '.join(f'{s:.2f}' for s in speeds)}]",
            flush=True,
        )


# --- where the dispatcher's time goes (--profile) -------------------------------------------

#: Parts of the dispatcher, by the file a function is defined in (first match wins).
_PARTS: list[tuple[str, tuple[str, ...]]] = [
    (
        "rendering (message.py, addresses.py, email, re, base64, qp)",
        ("dispatcher/message.py", "dispatcher/addresses.py", "/email/", "/idna/", "/base64.py"),
    ),
    ("SMTP transaction (dispatcher/smtp.py)", ("dispatcher/smtp.py",)),
    ("aiosmtplib", ("/aiosmtplib/",)),
    (
        "the daemon's actors (claimer, sender, recorder, store, limits, ...)",
        (
            "dispatcher/daemon.py",
            "dispatcher/claimer.py",
            "dispatcher/sender.py",
            "dispatcher/recorder.py",
            "dispatcher/store.py",
            "dispatcher/limits.py",
            "dispatcher/policy.py",
            "dispatcher/retry.py",
            "dispatcher/shared.py",
            "dispatcher/liveness.py",
            "dispatcher/backoff",
        ),
    ),
    ("logging (logging, dispatcher/logs.py, json)", ("/logging/", "dispatcher/logs.py", "/json/")),
    ("asyncpg", ("/asyncpg/", "asyncpg.")),
    ("prometheus_client", ("/prometheus_client/",)),
    ("asyncio event loop, sockets", ("/asyncio/", "/selectors.py", "/socket.py")),
]
#: Waiting for the next event (the process is idle): not counted as work.
_IDLE = ("<method 'poll' of 'select.epoll' objects>", "<method 'select' of 'select.epoll'")


def _part_of(func: tuple[str, int, str]) -> str | None:
    filename, _, name = func
    text = name if filename == "~" else filename
    for part, markers in _PARTS:
        if any(marker in text for marker in markers):
            return part
    return None


def print_profile(path: str, mails: int) -> None:
    """Where the profiled drain spent its time: self time by part, then hot functions."""
    stats: dict[Any, Any] = pstats.Stats(path).stats  # type: ignore[attr-defined]
    parts: Counter[str] = Counter()
    idle = 0.0
    for func, (_, _, self_time, _, callers) in stats.items():
        if func[0] == "~" and any(marker in func[2] for marker in _IDLE):
            idle += self_time
            continue
        part = _part_of(func)
        if part is None and func[0] == "~" and callers:
            # A C function (str methods, regex, encoders...): charge it to its callers.
            for caller, (_, _, caller_self, _) in callers.items():
                parts[_part_of(caller) or "other (stdlib, dataclasses, datetime, ...)"] += (
                    caller_self
                )
            continue
        parts[part or "other (stdlib, dataclasses, datetime, ...)"] += self_time
    busy = sum(parts.values())
    print(
        f"   profile of one more drain ({mails:,} mails; stats in {path}): "
        f"{1000 * busy / mails:.3f} ms/mail busy under cProfile, "
        f"{idle:.1f} s waiting for events"
    )
    print(
        "   self time by part (wall clock: a socket send also counts the time the process "
        "waits while the peer it woke runs):"
    )
    for part, seconds in parts.most_common():
        print(f"     {100 * seconds / busy:5.1f}%  {1000 * seconds / mails:6.3f} ms/mail  {part}")
    print("   the dispatcher's steps, including what they call (ms per mail):")
    steps = {
        ("dispatcher/message.py", "build_message"): "build_message",
        ("dispatcher/smtp.py", "send"): "SmtpConnection.send",
        ("dispatcher/sender.py", "_deliver"): "sender: _deliver (render + send + decide)",
        ("dispatcher/recorder.py", "_write"): "recorder: _write (record + logs)",
        ("dispatcher/recorder.py", "_log_outcome"): "recorder: _log_outcome",
        ("dispatcher/claimer.py", "run"): "claimer: run",
    }
    for (suffix, func_name), label in steps.items():
        for (filename, lineno, name), (_, _, _, cumulative, _) in stats.items():
            if filename.endswith(suffix) and name == func_name:
                print(f"     {1000 * cumulative / mails:6.3f}  {label}  (line {lineno})")
    print("   busiest functions (self time, ms per mail):")
    ranked = sorted(
        ((v[2], k) for k, v in stats.items() if not any(m in k[2] for m in _IDLE)), reverse=True
    )
    for self_time, (filename, lineno, name) in ranked[:15]:
        where = name if filename == "~" else f"{name} ({Path(filename).name}:{lineno})"
        print(f"     {1000 * self_time / mails:6.3f}  {where}")


# --- 2. latency -----------------------------------------------------------------------------


async def latency(pg: EmbeddedPostgres, workdir: Path, seconds: float) -> list[float]:
    from outbox.dispatcher.outbox import Mail, enqueue

    sink = Sink(workdir)
    url = await fresh_database(pg, "latency")
    proc = start_dispatcher(url, sink, "--name", "idle")  # default settings
    committed: dict[str, float] = {}
    try:
        conn = await asyncpg.connect(url)
        await wait_listening(conn, "idle", proc)  # now idle, waiting for NOTIFY
        sender = Address("Outbox", "noreply", "example.com")
        total = int(seconds * 100)
        log(f"  enqueueing {total:,} mails at 100/s ...")
        start = time.perf_counter()
        last_print = start
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
            if time.perf_counter() - last_print >= 2:
                log(f"    enqueued {i + 1:,}/{total:,}")
                last_print = time.perf_counter()
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
        f"  {ns.slow_mails:,} mails, sink 200 ms/message, 451 to 10 %, "
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
    parts = set(ns.only or ("drain", "latency", "slow"))
    workdir = Path(tempfile.mkdtemp(prefix="outbox-bench-"))
    pg = EmbeddedPostgres(workdir / "pg")
    log(f"starting PostgreSQL in {workdir} ...")
    await asyncio.to_thread(pg.start)
    finished = False
    try:
        if "drain" in parts:
            print(
                f"1. drain {ns.mails:,} mails, concurrency {ns.concurrency}, "
                f"{ns.rounds} rounds (medians; the order alternates)",
                flush=True,
            )
            rounds = [await drain_round(pg, workdir, ns, i) for i in range(ns.rounds)]
            print_drain(ns, rounds)
            if ns.profile:
                log(f"  one more dispatcher drain under cProfile ({ns.mails:,} mails) ...")
                sink = Sink(workdir)
                try:
                    await dispatcher_drain(pg, workdir, sink, ns, "drain_profile", ns.profile)
                finally:
                    sink.stop()
                print_profile(ns.profile, ns.mails)

        if "latency" in parts:
            print(
                f"2. latency at 100 mails/s for {ns.latency_seconds:.0f} s, idle dispatcher",
                flush=True,
            )
            lat = await latency(pg, workdir, ns.latency_seconds)
            print(
                f"   commit -> SMTP accepted: p50 {pct(lat, 0.5):.1f} ms, p99 "
                f"{pct(lat, 0.99):.1f} ms, max {lat[-1]:.1f} ms (targets p50 <= 10, p99 <= 50)",
                flush=True,
            )

        if "slow" in parts:
            print("3. slow sink (200 ms per message, 451 to 10 %)", flush=True)
            slow = await slow_sink(pg, workdir, ns)
            print(
                f"   {slow['per_minute']:,.0f} mails/min per dispatcher process "
                f"(target >= 30,000); lost {slow['lost']}, duplicates {slow['duplicates']}, "
                f"451 answers {slow['refused_451']:.0f}",
                flush=True,
            )
        finished = True
    finally:
        await asyncio.to_thread(pg.stop)
        if finished:  # else keep PostgreSQL's data and the dispatchers' logs to look at
            await asyncio.to_thread(shutil.rmtree, workdir, True)
        else:
            log(f"kept {workdir} (PostgreSQL's data, the dispatchers' logs)")


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "--raw-client":
        figures = asyncio.run(
            raw_client(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
        )
        print(json.dumps(figures))
        return
    if len(sys.argv) >= 4 and sys.argv[1] == "--dispatcher-process":
        sys.exit(dispatcher_process(sys.argv[2], sys.argv[3], sys.argv[4:]))
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
    parser.add_argument(
        "--only",
        action="append",
        choices=("drain", "latency", "slow"),
        help="run only this measurement (repeatable; default: all three)",
    )
    parser.add_argument(
        "--sink",
        choices=("lean", "aiosmtpd"),
        default="lean",
        help="the SMTP server of bench/sink.py: a minimal one (default) or aiosmtpd, "
        "which costs more CPU per mail than the raw client and so caps its throughput",
    )
    parser.add_argument(
        "--no-pipelining",
        dest="pipelining",
        action="store_false",
        help="the sink does not offer PIPELINING (RFC 2920), which production servers "
        "offer: the dispatcher then sends MAIL, RCPT and DATA one at a time, as the raw "
        "client always does",
    )
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="after the drain rounds, profile one more dispatcher drain with cProfile, "
        "save the stats to FILE and print where the time goes",
    )
    ns = parser.parse_args()
    Sink.server = ns.sink
    Sink.pipelining = ns.pipelining
    if ns.profile:
        ns.profile = os.path.abspath(ns.profile)
    asyncio.run(run(ns))


if __name__ == "__main__":
    main()
