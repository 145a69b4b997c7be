"""Real SMTP servers for tests: aiosmtpd with handlers that delay, refuse or hang up.

Each server runs aiosmtpd in its own thread and event loop (as a separate SMTP server
would), so a slow reply there never blocks the code under test.
"""

from __future__ import annotations

import asyncio
import email
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from outbox.cli.embedded_pg import free_port
from outbox.cli.sink import Pipelining


@dataclass
class Received:
    """One message the server accepted, with its envelope."""

    recipient: str
    message_id: str
    data: bytes
    at: float
    #: The envelope as the server got it: MAIL FROM, every RCPT TO and the MAIL options.
    mail_from: str = ""
    rcpt_tos: tuple[str, ...] = ()
    mail_options: tuple[str, ...] = ()


def long_reply(code: int, length: int = 9000) -> str:
    """A one-line reply of ``length`` bytes: longer than aiosmtplib reads (8192 a line)."""
    head = f"{code} "
    return head + "x" * (length - len(head))


@dataclass(frozen=True)
class Reply:
    """What to do at DATA (or RCPT): wait ``delay`` seconds, then reply or hang up."""

    code: str = "250 OK"
    delay: float = 0.0
    hang_up: bool = False


#: Decides the reply for (recipient, how many times this recipient was seen before).
Plan = Callable[[str, int], Reply]


def always_ok(recipient: str, seen: int) -> Reply:
    return Reply()


@dataclass
class FaultyHandler(Pipelining):
    """aiosmtpd handler whose DATA and RCPT replies follow plans the test sets.

    It offers PIPELINING unless ``pipelining=False``.
    """

    data_plan: Plan = always_ok
    rcpt_plan: Plan | None = None
    received: list[Received] = field(default_factory=list)
    data_seen: Counter[str] = field(default_factory=Counter)
    rcpt_seen: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)
    pipelining: bool = True

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        with self.lock:
            seen = self.rcpt_seen[address]
            self.rcpt_seen[address] += 1
        if self.rcpt_plan is not None:
            reply = self.rcpt_plan(address, seen)
            if not reply.code.startswith("2"):
                return reply.code
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        recipient = envelope.rcpt_tos[0]
        with self.lock:
            seen = self.data_seen[recipient]
            self.data_seen[recipient] += 1
        reply = self.data_plan(recipient, seen)
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if reply.hang_up:
            assert server.transport is not None
            server.transport.abort()
            return "421 closing"  # never reaches the client: the connection is gone
        if reply.code.startswith("2"):
            content = envelope.original_content or b""
            parsed = email.message_from_bytes(content)
            with self.lock:
                self.received.append(
                    Received(
                        recipient,
                        str(parsed["Message-ID"]),
                        content,
                        time.monotonic(),
                        mail_from=envelope.mail_from or "",
                        rcpt_tos=tuple(envelope.rcpt_tos),
                        mail_options=tuple(envelope.mail_options),
                    )
                )
        return reply.code


class SmtpServer:
    """A running aiosmtpd server on 127.0.0.1 with a :class:`FaultyHandler`.

    Keyword arguments go to aiosmtpd's SMTP class. aiosmtpd's Controller offers SMTPUTF8
    unless given ``enable_SMTPUTF8=False`` (an ASCII-only server).
    """

    def __init__(self, handler: FaultyHandler | None = None, **controller: Any) -> None:
        self.handler = handler or FaultyHandler()
        self.port = free_port()
        self.controller = Controller(
            self.handler, hostname="127.0.0.1", port=self.port, **controller
        )

    def start(self) -> SmtpServer:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()

    @property
    def received(self) -> list[Received]:
        with self.handler.lock:
            return list(self.handler.received)

    def message_ids(self) -> Counter[str]:
        """How many times each Message-ID arrived."""
        return Counter(r.message_id for r in self.received)
