"""A small HTTP/1.1 load generator, the fallback when ``wrk`` is not installed.

Runs in its own process (``python bench/loadgen.py URL ...``) with keep-alive connections
on raw asyncio streams (uvloop when available), so the client costs far less CPU per
request than the server under test. Every request registers a unique email. Prints one
JSON object: requests, errors, seconds, and every latency in microseconds (sorted).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from urllib.parse import urlsplit


async def _connection(
    host: str,
    port: int,
    path: str,
    prefix: str,
    worker: int,
    stop_at: float,
    latencies: list[int],
    statuses: dict[int, int],
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    head = f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
    n = 0
    try:
        while time.monotonic() < stop_at:
            n += 1
            body = (
                f'{{"email": "{prefix}-{worker}-{n}@example.com", "name": "Bench User {n}"}}'
            ).encode()
            request = f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body
            started = time.perf_counter_ns()
            writer.write(request)
            status_line = await reader.readline()
            if not status_line:
                raise ConnectionError("server closed the connection")
            status = int(status_line.split()[1])
            length = 0
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            latencies.append((time.perf_counter_ns() - started) // 1000)
            statuses[status] = statuses.get(status, 0) + 1
    finally:
        writer.close()


async def _main(ns: argparse.Namespace) -> dict[str, object]:
    url = urlsplit(ns.url)
    assert url.hostname is not None
    latencies: list[int] = []
    statuses: dict[int, int] = {}
    started = time.monotonic()
    stop_at = started + ns.duration
    await asyncio.gather(
        *(
            _connection(
                url.hostname,
                url.port or 80,
                url.path or "/",
                ns.prefix,
                worker,
                stop_at,
                latencies,
                statuses,
            )
            for worker in range(ns.connections)
        )
    )
    elapsed = time.monotonic() - started
    latencies.sort()
    return {
        "requests": len(latencies),
        "statuses": {str(k): v for k, v in statuses.items()},
        "seconds": elapsed,
        "latencies_us": latencies,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--prefix", default="u")
    ns = parser.parse_args()
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        runner = asyncio.run
    result = runner(_main(ns))
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
