"""A benchmark SMTP sink in its own process: aiosmtpd that counts and timestamps mail.

    python bench/sink.py --port 2525 --log accepted.txt [--delay 0.2] [--fail-rate 0.1]

Each accepted message adds a line ``<unix time> <Message-ID>`` to the log, written when
the process gets SIGTERM (nothing is written during the run, so the sink stays cheap).
``--delay`` holds every DATA reply that long; ``--fail-rate`` answers 451 to that share
of messages (chosen at random).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import signal
import time
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session

_MESSAGE_ID = re.compile(rb"^Message-ID:\s*(\S+)", re.IGNORECASE | re.MULTILINE)


class Handler:
    def __init__(self, delay: float, fail_rate: float) -> None:
        self.delay = delay
        self.fail_rate = fail_rate
        self.accepted: list[tuple[float, bytes]] = []
        self.refused = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail_rate and random.random() < self.fail_rate:
            self.refused += 1
            return "451 4.3.0 please try again"
        content = envelope.original_content or b""
        match = _MESSAGE_ID.search(content, 0, 4096)
        self.accepted.append((time.time(), match.group(1) if match else b"-"))
        return "250 2.0.0 OK"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--fail-rate", type=float, default=0.0)
    ns = parser.parse_args()
    handler = Handler(ns.delay, ns.fail_rate)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="bench-sink"), "127.0.0.1", ns.port, backlog=1024
    )
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print("ready", flush=True)
    await stop.wait()
    server.close()
    with ns.log.open("wb") as out:
        for at, message_id in handler.accepted:
            out.write(f"{at:.6f} ".encode() + message_id + b"\n")
        out.write(f"# refused {handler.refused}\n".encode())


if __name__ == "__main__":
    asyncio.run(main())
