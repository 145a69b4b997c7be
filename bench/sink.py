"""A benchmark SMTP sink in its own process, that counts and timestamps mail.

    python bench/sink.py --port 2525 --log accepted.txt [--delay 0.2] [--fail-rate 0.1]
                         [--server lean|aiosmtpd] [--domain-delay D=SECONDS ...]
                         [--domain-rate D=PER_SECOND ...] [--no-pipelining]

Each accepted message adds a line ``<unix time> <Message-ID> <recipient domain>`` to the
log, written when the process gets SIGTERM (nothing is written during the run, so the
sink stays cheap), followed by ``# inflight D N`` (the most messages of domain D the sink
held at once, from RCPT to the reply to their data) and ``# throttled D N`` lines.
``--delay`` holds every DATA reply that long; ``--fail-rate`` answers 451 to that share
of messages (chosen at random). Per domain (lean server only): ``--domain-delay`` holds
its DATA replies that long, and ``--domain-rate`` makes the sink behave like a provider
that limits a sender: a RCPT for D beyond that many in the last second gets
``421 4.7.0 too many messages, slow down``.

``--server lean`` (the default) speaks just enough SMTP for the benchmark's clients
(EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT; every envelope accepted) in one
``asyncio.Protocol``, at about a third of aiosmtpd's CPU per mail: the clients, not the
sink, should be what a benchmark measures. ``--server aiosmtpd`` runs aiosmtpd instead,
which parses and checks every command like a real server, and costs more CPU per mail
than the clients it serves (so it, not they, sets the pace).

Both offer PIPELINING (RFC 2920), as production servers do, unless ``--no-pipelining``;
like Postfix, the lean server writes the replies to commands that arrived together in
one go.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import signal
import sys
import time
from collections import Counter, deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from outbox.cli.sink import Pipelining

_MESSAGE_ID = re.compile(rb"^Message-ID:\s*(\S+)", re.IGNORECASE | re.MULTILINE)


class Handler(Pipelining):
    """Decides each message's reply and remembers what was accepted (and, as an aiosmtpd
    handler, whether EHLO offers PIPELINING)."""

    def __init__(
        self,
        delay: float,
        fail_rate: float,
        domain_delay: dict[str, float] | None = None,
        domain_rate: dict[str, float] | None = None,
    ) -> None:
        self.delay = delay
        self.fail_rate = fail_rate
        self.domain_delay = domain_delay or {}
        self.domain_rate = domain_rate or {}
        self.accepted: list[tuple[float, bytes, str]] = []
        self.refused = 0
        self.inflight: Counter[str] = Counter()
        self.inflight_max: Counter[str] = Counter()
        self.throttled: Counter[str] = Counter()
        self._recent: dict[str, deque[float]] = {}

    def rcpt(self, domain: str) -> bytes:
        """The reply to RCPT TO for a mailbox at ``domain``."""
        limit = self.domain_rate.get(domain)
        if limit is not None:
            now = time.monotonic()
            recent = self._recent.setdefault(domain, deque())
            while recent and recent[0] <= now - 1.0:
                recent.popleft()
            if len(recent) >= limit:
                self.throttled[domain] += 1
                return b"421 4.7.0 too many messages, slow down\r\n"
            recent.append(now)
        self.inflight[domain] += 1
        self.inflight_max[domain] = max(self.inflight_max[domain], self.inflight[domain])
        return b"250 2.1.5 OK\r\n"

    def done(self, domain: str) -> None:
        """The message for ``domain`` was answered or abandoned."""
        self.inflight[domain] -= 1

    def reply(self, content: bytes, domain: str = "-") -> str:
        """The reply to a complete message (called once any delay has passed)."""
        if self.fail_rate and random.random() < self.fail_rate:
            self.refused += 1
            return "451 4.3.0 please try again"
        match = _MESSAGE_ID.search(content, 0, 4096)
        self.accepted.append((time.time(), match.group(1) if match else b"-", domain))
        return "250 2.0.0 OK"

    # aiosmtpd's handler hook
    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        if self.delay:
            await asyncio.sleep(self.delay)
        return self.reply(getattr(envelope, "original_content", None) or b"")


_EHLO = b"250-bench-sink\r\n250-SIZE 33554432\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n"
_EHLO_PIPELINING = _EHLO.replace(b"250-SIZE", b"250-PIPELINING\r\n250-SIZE")
_REPLIES = {
    b"HELO": b"250 bench-sink\r\n",
    b"MAIL": b"250 2.1.0 OK\r\n",
    b"RCPT": b"250 2.1.5 OK\r\n",
    b"RSET": b"250 2.0.0 OK\r\n",
    b"NOOP": b"250 2.0.0 OK\r\n",
}


class LeanSmtp(asyncio.Protocol):
    """One client connection: commands line by line, then the data up to ``CRLF.CRLF``.

    The replies to what arrived in one read go out in one write, as Postfix does.
    """

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.in_data = False
        #: The recipient domain of the message in progress ("" before RCPT).
        self.domain = ""
        #: Replies held while a read is processed (None: write at once).
        self.out: list[bytes] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(b"220 bench-sink ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.out = []
        try:
            self._commands()
        finally:
            out, self.out = self.out, None
            if out and self.transport is not None:
                self.transport.write(b"".join(out))

    def _commands(self) -> None:
        while self.transport is not None:
            if self.in_data:
                # The data ends with a line holding a lone dot (it may be the first line).
                end = 0 if self.buffer.startswith(b".\r\n") else self.buffer.find(b"\r\n.\r\n")
                if end < 0:
                    return
                skip = 3 if end == 0 else end + 5
                content = bytes(self.buffer[: end + 2 if end else 0])
                del self.buffer[:skip]
                self.in_data = False
                domain, self.domain = self.domain, ""
                delay = self.handler.domain_delay.get(domain, self.handler.delay)
                if delay:
                    loop = asyncio.get_running_loop()
                    loop.call_later(delay, self._answer, content, domain)
                else:
                    self._answer(content, domain)
                continue
            end = self.buffer.find(b"\r\n")
            if end < 0:
                return
            verb = bytes(self.buffer[:4]).upper()
            line = bytes(self.buffer[:end])
            del self.buffer[: end + 2]
            if verb == b"RCPT":
                domain = line.rpartition(b"@")[2].split(b">")[0].decode(errors="replace").lower()
                reply = self.handler.rcpt(domain)
                if reply.startswith(b"250"):
                    self.domain = domain
                self._send(reply)
            elif verb == b"RSET" and self.domain:
                self.handler.done(self.domain)
                self.domain = ""
                self._send(_REPLIES[verb])
            elif verb == b"EHLO":
                self._send(_EHLO_PIPELINING if self.handler.pipelining else _EHLO)
            elif verb == b"DATA":
                self.in_data = True
                self._send(b"354 end data with <CR><LF>.<CR><LF>\r\n")
            elif verb == b"QUIT":
                self._send(b"221 bye\r\n")
                assert self.out is not None
                self.transport.write(b"".join(self.out))
                self.out.clear()
                self.transport.close()
                self.transport = None
            else:
                self._send(_REPLIES.get(verb, b"500 5.5.2 command not recognized\r\n"))

    def _send(self, reply: bytes) -> None:
        if self.out is not None:
            self.out.append(reply)
        elif self.transport is not None and not self.transport.is_closing():
            self.transport.write(reply)

    def _answer(self, content: bytes, domain: str) -> None:
        if domain:
            self.handler.done(domain)
        self._send(self.handler.reply(content, domain).encode() + b"\r\n")

    def connection_lost(self, exc: Exception | None) -> None:
        if self.domain:
            self.handler.done(self.domain)
            self.domain = ""
        self.transport = None


def _per_domain(values: list[str], flag: str) -> dict[str, float]:
    try:
        return {d.lower(): float(v) for d, _, v in (item.partition("=") for item in values)}
    except ValueError:
        raise SystemExit(f"{flag}: expected DOMAIN=NUMBER") from None


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--fail-rate", type=float, default=0.0)
    parser.add_argument("--server", choices=("lean", "aiosmtpd"), default="lean")
    parser.add_argument("--domain-delay", action="append", default=[], metavar="D=SECONDS")
    parser.add_argument("--domain-rate", action="append", default=[], metavar="D=PER_SECOND")
    parser.add_argument(
        "--no-pipelining", dest="pipelining", action="store_false", help="do not offer it"
    )
    ns = parser.parse_args()
    handler = Handler(
        ns.delay,
        ns.fail_rate,
        _per_domain(ns.domain_delay, "--domain-delay"),
        _per_domain(ns.domain_rate, "--domain-rate"),
    )
    handler.pipelining = ns.pipelining
    loop = asyncio.get_running_loop()
    if ns.server == "aiosmtpd":
        from aiosmtpd.smtp import SMTP

        server = await loop.create_server(
            lambda: SMTP(handler, hostname="bench-sink"), "127.0.0.1", ns.port, backlog=1024
        )
    else:
        server = await loop.create_server(
            lambda: LeanSmtp(handler), "127.0.0.1", ns.port, backlog=1024
        )
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print("ready", flush=True)
    await stop.wait()
    server.close()
    with ns.log.open("wb") as out:
        for at, message_id, domain in handler.accepted:
            out.write(f"{at:.6f} ".encode() + message_id + f" {domain}\n".encode())
        for domain, most in sorted(handler.inflight_max.items()):
            out.write(f"# inflight {domain} {most}\n".encode())
        for domain, count in sorted(handler.throttled.items()):
            out.write(f"# throttled {domain} {count}\n".encode())
        out.write(f"# refused {handler.refused}\n".encode())


if __name__ == "__main__":
    asyncio.run(main())
