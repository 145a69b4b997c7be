"""Benchmark: ``POST /register`` of ``outbox api`` against a bare FastAPI + asyncpg baseline.

    ./run bench register [--duration 10] [--connections 64] [--rounds 3] [--loadgen auto]

Starts its own embedded PostgreSQL (durable default settings) in a temporary folder,
migrates one database per target, then serves

* ``api``: ``outbox api`` (one uvicorn worker), the product as shipped, and
* ``raw``: ``bench/raw_app.py`` (one uvicorn worker), the same two inserts in one
  transaction with none of the product's validation, rendering or logging,

and loads each with many concurrent keep-alive clients registering unique emails. The
targets alternate, round after round, so drift on a shared machine hits both alike; the
summary takes the median round of each. Load comes from ``wrk`` (with a Lua script for
unique emails) when installed, else from ``bench/loadgen.py`` in a separate process.
With ``--idempotency-keys`` (wrk only) every request carries a unique ``Idempotency-Key``:
the API's keyed path, one transaction that also stores the key and the answer.

Besides req/s and latency it reports CPU time per request of the server process and of
PostgreSQL, which is far less noisy than throughput and shows where the time goes.
Target: api throughput >= 0.9x raw and api p99 <= 1.2x raw.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402

from outbox.cli import migrate  # noqa: E402
from outbox.cli.embedded_pg import EmbeddedPostgres, free_port  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

WRK_SCRIPT = r"""
-- Unique emails per request: <prefix>-<thread>-<counter>@example.com. setup() runs in
-- wrk's main Lua state and sets the global `id` in each thread's own state.
-- With a second argument "keyed", each request also carries a unique Idempotency-Key.
local counter = 0
local threads = 0
local prefix = "u"
local keyed = false

function setup(thread)
    threads = threads + 1
    thread:set("id", threads)
end

function init(args)
    prefix = args[1] or "u"
    keyed = args[2] == "keyed"
end

function request()
    counter = counter + 1
    local body = string.format(
        '{"email": "%s-%d-%d@example.com", "name": "Bench User %d"}',
        prefix, id or 0, counter, counter)
    local headers = {["Content-Type"] = "application/json"}
    if keyed then
        headers["Idempotency-Key"] = string.format("%s-%d-%d", prefix, id or 0, counter)
    end
    return wrk.format("POST", "/register", headers, body)
end
"""


@dataclass
class Result:
    target: str
    round: int
    requests: int
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    server_cpu_us: float  # server process CPU per request
    pg_cpu_us: float  # PostgreSQL CPU per request (all its processes)


@dataclass
class Target:
    name: str
    port: int
    command: list[str]
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    results: list[Result] = field(default_factory=list)


def _cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return int(fields[11]) + int(fields[12])  # utime + stime


def _postgres_pids(pg: EmbeddedPostgres) -> list[int]:
    lines = (pg.pgdata / "postmaster.pid").read_text().splitlines()
    postmaster = int(lines[0])
    pids = [postmaster]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == postmaster:
                pids.append(int(entry.name))
    return pids


def _pg_ticks(pg: EmbeddedPostgres) -> int:
    return sum(_cpu_ticks(pid) for pid in _postgres_pids(pg))


def _wait_healthy(target: Target, deadline: float) -> None:
    url = f"http://127.0.0.1:{target.port}/healthz"
    while True:
        assert target.process is not None
        if target.process.poll() is not None:
            log = target.log.read_text()[-3000:] if target.log else ""
            raise SystemExit(f"bench: {target.name} exited during start-up:\n{log}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: {target.name} did not become healthy")
        time.sleep(0.1)


def _progress(label: str, duration: float, done: threading.Event) -> None:
    """A ticking "label: 3/10 s" on a terminal; elsewhere one line per 5 s."""
    started = time.monotonic()
    tty = sys.stdout.isatty()
    if not tty:
        print(f"  {label}: running {duration:g} s ...", flush=True)
    while not done.wait(1.0):
        elapsed = time.monotonic() - started
        if tty:
            print(
                f"\r  {label}: {min(elapsed, duration):4.0f}/{duration:.0f} s", end="", flush=True
            )
        elif round(elapsed) % 5 == 0:
            print(f"  {label}: {min(elapsed, duration):4.0f}/{duration:.0f} s", flush=True)
    if tty:
        print(f"\r{' ' * 60}\r", end="", flush=True)


def _parse_wrk_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        raise ValueError(f"unexpected wrk latency {text!r}")
    value, unit = float(match[1]), match[2]
    return value * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def _run_wrk(url: str, ns: argparse.Namespace, prefix: str, script: Path) -> dict[str, float]:
    command = [
        "wrk",
        f"-t{ns.threads}",
        f"-c{ns.connections}",
        f"-d{max(1, round(ns.duration))}s",  # wrk takes whole seconds
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(script),
        url + "/register",
        "--",
        prefix,
        *(["keyed"] if ns.idempotency_keys else []),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"bench: wrk failed: {done.stderr.strip() or done.stdout.strip()}")
    out = done.stdout
    requests = int(re.search(r"(\d+) requests in", out)[1])  # type: ignore[index]
    seconds_text = re.search(r"requests in ([\d.]+\w+),", out)[1]  # type: ignore[index]
    seconds = _parse_wrk_ms(seconds_text) / 1000
    errors = 0
    if match := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(match[1])
    if match := re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    ):
        errors += sum(int(g) for g in match.groups())
    # The "Latency Distribution" table: lines like "     50%   12.34ms".
    p50 = _parse_wrk_ms(re.search(r"^\s+50%\s+(\S+)$", out, re.M)[1])  # type: ignore[index]
    p99 = _parse_wrk_ms(re.search(r"^\s+99%\s+(\S+)$", out, re.M)[1])  # type: ignore[index]
    return {"requests": requests, "errors": errors, "seconds": seconds, "p50": p50, "p99": p99}


def _run_python(url: str, ns: argparse.Namespace, prefix: str) -> dict[str, float]:
    command = [
        sys.executable,
        str(ROOT / "bench" / "loadgen.py"),
        url + "/register",
        "--connections",
        str(ns.connections),
        "--duration",
        str(ns.duration),
        "--prefix",
        prefix,
    ]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    data = json.loads(out)
    latencies: list[int] = data["latencies_us"]
    ok = sum(v for k, v in data["statuses"].items() if k == "201")

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] / 1000

    return {
        "requests": data["requests"],
        "errors": data["requests"] - ok,
        "seconds": data["seconds"],
        "p50": pct(0.50),
        "p99": pct(0.99),
    }


def _measure(
    target: Target,
    round_no: int,
    ns: argparse.Namespace,
    pg: EmbeddedPostgres,
    script: Path | None,
    duration: float,
    record: bool,
) -> Result:
    assert target.process is not None
    url = f"http://127.0.0.1:{target.port}"
    prefix = f"{target.name}{round_no}{'' if record else 'w'}-{time.time_ns()}"
    run_ns = argparse.Namespace(**{**vars(ns), "duration": duration})
    label = f"round {round_no}/{ns.rounds} {target.name}" if record else f"warm-up {target.name}"
    done = threading.Event()
    ticker = threading.Thread(target=_progress, args=(label, duration, done), daemon=True)
    server_before = _cpu_ticks(target.process.pid)
    pg_before = _pg_ticks(pg)
    ticker.start()
    try:
        if script is not None:
            raw = _run_wrk(url, run_ns, prefix, script)
        else:
            raw = _run_python(url, run_ns, prefix)
    finally:
        done.set()
        ticker.join()
    server_cpu = (_cpu_ticks(target.process.pid) - server_before) / CLOCK_TICKS
    pg_cpu = (_pg_ticks(pg) - pg_before) / CLOCK_TICKS
    requests = int(raw["requests"]) or 1
    result = Result(
        target=target.name,
        round=round_no,
        requests=int(raw["requests"]),
        errors=int(raw["errors"]),
        seconds=raw["seconds"],
        rps=raw["requests"] / raw["seconds"],
        p50_ms=raw["p50"],
        p99_ms=raw["p99"],
        server_cpu_us=server_cpu / requests * 1e6,
        pg_cpu_us=pg_cpu / requests * 1e6,
    )
    print(
        f"  {label}: {result.rps:8.0f} req/s  p50 {result.p50_ms:6.1f} ms  "
        f"p99 {result.p99_ms:6.1f} ms  server {result.server_cpu_us:5.0f} us/req  "
        f"postgres {result.pg_cpu_us:5.0f} us/req"
        + (f"  ERRORS {result.errors}" if result.errors else ""),
        flush=True,
    )
    return result


# Where a sampled frame's code lives -> the part of the stack it is charged to. py-spy names
# frames "function (path:line)" with paths relative to sys.path, e.g. "(asyncpg/pool.py:1)".
# Time in C extensions is charged to the Python frame that called them: uvloop's event
# loop (socket I/O, callbacks) shows up as asyncio's Runner.run, asyncpg's protocol
# (Cython) as asyncpg's Connection._do_execute / execute.
_PARTS = [
    ("this project (api/, dispatcher/, bench/)", ("api/", "dispatcher/", "bench/", "raw_app")),
    ("asyncpg (incl. its Cython protocol)", ("asyncpg/",)),
    ("pydantic + email_validator", ("pydantic", "email_validator/")),
    ("fastapi + starlette", ("fastapi/", "starlette/")),
    ("uvicorn + httptools (incl. socket writes)", ("uvicorn/", "httptools/")),
    ("asyncio + uvloop event loop (incl. socket reads)", ("asyncio/", "uvloop/")),
    ("logging", ("logging/",)),
    ("email (stdlib)", ("email/",)),
    ("prometheus_client", ("prometheus_client/",)),
]


def _part(frame: str) -> str | None:
    path = frame.rpartition(" (")[2]
    for name, prefixes in _PARTS:
        if path.startswith(prefixes):
            return name
    return None


def _profile(
    target: Target, ns: argparse.Namespace, pg: EmbeddedPostgres, script: Path | None
) -> None:
    """One more round with py-spy sampling the server; print where its CPU time goes."""
    assert target.process is not None
    venv_bin = str(Path(sys.executable).parent)
    py_spy = shutil.which("py-spy", path=f"{venv_bin}:{os.environ.get('PATH', '')}")
    if py_spy is None:
        print("bench: --profile needs py-spy (pip install py-spy)", file=sys.stderr)
        return
    out = Path(tempfile.mkdtemp(prefix="outbox-bench-profile-")) / f"{target.name}.txt"
    seconds = max(1, round(ns.duration))
    sampler = subprocess.Popen(
        [
            *(py_spy, "record", "--pid", str(target.process.pid), "--duration", str(seconds)),
            *("--rate", "500", "--nonblocking", "--format", "raw", "-o", str(out)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _measure(target, 0, ns, pg, script, ns.duration, record=False)
    _, err = sampler.communicate(timeout=seconds + 60)
    if sampler.returncode != 0 or not out.exists():
        print(f"bench: py-spy failed: {err.decode(errors='replace').strip()}", file=sys.stderr)
        return
    total = 0
    parts: dict[str, int] = {}
    leaves: dict[str, int] = {}
    project: dict[str, int] = {}
    for line in out.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        leaf = frames[-1]
        part = _part(leaf) or "other"
        parts[part] = parts.get(part, 0) + count
        leaves[leaf] = leaves.get(leaf, 0) + count
        # Per function (a frame without its line number), counted once per sample.
        for function in {frame.rpartition(":")[0] + ")" for frame in frames}:
            if _part(function) == _PARTS[0][0]:
                project[function] = project.get(function, 0) + count
    print(f"\nprofile of {target.name} ({total} samples; raw stacks in {out})")
    print("  CPU by the code running (self time):")
    for name, count in sorted(parts.items(), key=lambda item: -item[1]):
        print(f"    {100 * count / total:5.1f}%  {name}")
    print("  busiest functions (self time):")
    for leaf, count in sorted(leaves.items(), key=lambda item: -item[1])[:12]:
        print(f"    {100 * count / total:5.1f}%  {leaf}")
    if project:
        print("  this project's functions, including what they call:")
        for frame, count in sorted(project.items(), key=lambda item: -item[1])[:10]:
            print(f"    {100 * count / total:5.1f}%  {frame}")


async def _create_databases(admin_url: str, names: list[str]) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        for name in names:
            await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()


async def _count_users(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        count: int = await conn.fetchval("SELECT count(*) FROM users")
        return count
    finally:
        await conn.close()


def _median_result(results: list[Result]) -> Result:
    ordered = sorted(results, key=lambda r: r.rps)
    return ordered[len(ordered) // 2]


def _summary(targets: dict[str, Target]) -> int:
    api, raw = targets["api"].results, targets["raw"].results
    print("\nsummary (median over rounds)")
    print(
        f"  {'':5} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'server us/req':>14} {'pg us/req':>10}"
    )
    for name, results in (("api", api), ("raw", raw)):
        print(
            f"  {name:5} {statistics.median(r.rps for r in results):9.0f} "
            f"{statistics.median(r.p50_ms for r in results):8.1f} "
            f"{statistics.median(r.p99_ms for r in results):8.1f} "
            f"{statistics.median(r.server_cpu_us for r in results):14.0f} "
            f"{statistics.median(r.pg_cpu_us for r in results):10.0f}"
        )
    # Rounds run back to back in pairs (api, raw, raw, api, ...), so the ratio within a pair
    # sees the same machine load; the verdict uses the median of the pairs' ratios.
    pairs = list(zip(api, raw, strict=True))

    def ratio(metric: str) -> tuple[float, str]:
        values = [getattr(a, metric) / getattr(r, metric) for a, r in pairs]
        return statistics.median(values), " ".join(f"{v:.2f}" for v in values)

    verdict = {True: "met", False: "MISSED"}
    throughput, each = ratio("rps")
    print(
        f"  throughput api/raw {throughput:5.2f}x  (target >= 0.90x: {verdict[throughput >= 0.9]})"
        f"   rounds: {each}"
    )
    p99, each = ratio("p99_ms")
    print(
        f"  p99        api/raw {p99:5.2f}x  (target <= 1.20x: {verdict[p99 <= 1.2]})"
        f"   rounds: {each}"
    )
    p50, each = ratio("p50_ms")
    print(f"  p50        api/raw {p50:5.2f}x                             rounds: {each}")
    cpu, each = ratio("server_cpu_us")
    print(f"  server CPU api/raw {cpu:5.2f}x  (per request)               rounds: {each}")
    pg, each = ratio("pg_cpu_us")
    print(f"  pg CPU     api/raw {pg:5.2f}x  (per request)               rounds: {each}")
    errors = sum(r.errors for r in api + raw)
    if errors:
        print(f"  {errors} requests did not get 201: the figures are not valid")
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="./run bench register",
        description="Throughput and latency of POST /register: outbox api vs a raw baseline.",
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per round (10)")
    parser.add_argument("--warmup", type=float, default=3.0, help="warm-up seconds per target (3)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per target (3)")
    parser.add_argument("--connections", type=int, default=64, help="concurrent clients (64)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (1)")
    parser.add_argument("--pool-size", type=int, default=20, help="raw app's pool size (20)")
    parser.add_argument(
        "--loadgen",
        choices=["auto", "wrk", "python"],
        default="auto",
        help="load generator: wrk if installed (auto), or the bundled asyncio client",
    )
    parser.add_argument("--only", choices=["api", "raw"], help="measure one target only")
    parser.add_argument(
        "--idempotency-keys",
        action="store_true",
        help="send a unique Idempotency-Key with every request (the API's keyed path; "
        "the baseline ignores it); needs wrk",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="then sample each server with py-spy for one more round and show where time goes",
    )
    parser.add_argument(
        "--pg-setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra PostgreSQL setting (default: durable defaults)",
    )
    ns = parser.parse_args()
    if ns.connections < 1 or ns.rounds < 1 or ns.duration <= 0 or ns.threads < 1:
        parser.error("--connections, --rounds, --threads and --duration must be positive")
    use_wrk = ns.loadgen == "wrk" or (ns.loadgen == "auto" and shutil.which("wrk"))
    if ns.loadgen == "wrk" and not shutil.which("wrk"):
        parser.error("--loadgen wrk: wrk is not installed (apt-get install wrk)")
    if ns.idempotency_keys and not use_wrk:
        parser.error("--idempotency-keys needs wrk (apt-get install wrk)")
    settings = dict(item.split("=", 1) for item in ns.pg_setting)

    tmp = Path(tempfile.mkdtemp(prefix="outbox-bench-"))
    pg = EmbeddedPostgres(tmp / "pg", settings=settings)
    targets: dict[str, Target] = {}
    try:
        print(f"bench: starting PostgreSQL in {tmp} ...", flush=True)
        admin = pg.start()
        asyncio.run(_create_databases(admin, ["bench_api", "bench_raw"]))
        for name in ("bench_api", "bench_raw"):
            migrate.upgrade(pg.url(name))
        script = None
        if use_wrk:
            script = tmp / "register.lua"
            script.write_text(WRK_SCRIPT)
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("SMTP_")}
        base_env["PYTHONPATH"] = str(ROOT)
        outbox = shutil.which("outbox", path=str(Path(sys.executable).parent)) or "outbox"
        api_port, raw_port = free_port(), free_port()
        all_targets = [
            Target(
                "api",
                api_port,
                [outbox, "api", "--port", str(api_port)],
                {**base_env, "DATABASE_URL": pg.url("bench_api")},
            ),
            Target(
                "raw",
                raw_port,
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "--factory",
                    "bench.raw_app:create_app",
                    "--port",
                    str(raw_port),
                    "--no-access-log",
                    "--log-level",
                    "warning",
                ],
                {
                    **base_env,
                    "DATABASE_URL": pg.url("bench_raw"),
                    "BENCH_POOL_SIZE": str(ns.pool_size),
                },
            ),
        ]
        targets = {t.name: t for t in all_targets if ns.only in (None, t.name)}
        for target in targets.values():
            target.log = tmp / f"{target.name}.log"
            with target.log.open("wb") as log:
                target.process = subprocess.Popen(
                    target.command, env=target.env, cwd=ROOT, stdout=log, stderr=log
                )
        for target in targets.values():
            _wait_healthy(target, time.monotonic() + 30)
        print(
            f"bench: load from {'wrk' if use_wrk else 'bench/loadgen.py'}, "
            f"{ns.connections} connections, {ns.rounds} x {ns.duration:g} s per target, "
            f"PostgreSQL settings {settings or 'default (durable)'}",
            flush=True,
        )
        for target in targets.values():
            _measure(target, 0, ns, pg, script, ns.warmup, record=False)
        order = list(targets.values())
        for round_no in range(1, ns.rounds + 1):
            for target in order:
                target.results.append(_measure(target, round_no, ns, pg, script, ns.duration, True))
            order.reverse()  # api, raw, raw, api, ...: neither always goes first
        for target in targets.values():
            stored = asyncio.run(_count_users(target.env["DATABASE_URL"]))
            answered = sum(r.requests - r.errors for r in target.results)
            print(f"  {target.name}: {stored} users stored ({answered} measured 201s + warm-up)")
        status = _summary(targets) if len(targets) == 2 else 0
        if ns.profile:
            for target in targets.values():
                _profile(target, ns, pg, script)
        return status
    except KeyboardInterrupt:
        print("\nbench: interrupted", file=sys.stderr)
        return 130
    finally:
        for target in targets.values():
            if target.process is not None and target.process.poll() is None:
                target.process.send_signal(signal.SIGTERM)
                try:
                    target.process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    target.process.kill()
                    target.process.wait()
        pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
