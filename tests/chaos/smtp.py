"""SMTP servers whose behaviour a scenario switches at runtime, sharing one mailbox.

Each :class:`ChaosSmtp` is a real aiosmtpd server in its own thread. ``down()`` stops
it (open connections are dropped, new ones refused) and ``up()`` starts a new server on
the same port. At the end of DATA a message takes ``delay`` seconds to process (one
second in ``slow`` mode; in ``flaky`` mode every third message gets 451 instead), is
then queued, and the 250 follows ``reply_delay`` seconds later: a client that dies during
the processing has sent nothing, one that dies after the queueing has had its mail
accepted, as with a real MTA.
Every accepted message is recorded in the shared :class:`Mailbox` with a digest of its
bytes, so duplicates can be told apart from different messages with one Message-ID, and
with its raw bytes and envelope, so that a scenario can parse what really arrived. A
server offers SMTPUTF8 (RFC 6531) only when asked to (``smtputf8=True``).
"""

from __future__ import annotations

import asyncio
import email
import hashlib
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from outbox.cli.embedded_pg import free_port
from outbox.cli.sink import Pipelining

Mode = Literal["healthy", "slow", "flaky"]


@dataclass(frozen=True)
class Delivery:
    """One message an SMTP server accepted (queued at the end of DATA)."""

    message_id: str
    recipient: str
    digest: str
    at: float  # time.monotonic() in this process
    server: str
    #: The envelope and the message as they arrived (the content after DATA, unstuffed).
    mail_from: str = ""
    recipients: tuple[str, ...] = ()
    smtputf8: bool = False  # MAIL FROM carried SMTPUTF8
    content: bytes = field(default=b"", repr=False)


@dataclass
class Mailbox:
    """Every delivery to every server of a scenario, thread-safe."""

    deliveries: list[Delivery] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, delivery: Delivery) -> None:
        with self.lock:
            self.deliveries.append(delivery)

    def snapshot(self) -> list[Delivery]:
        with self.lock:
            return list(self.deliveries)

    def __len__(self) -> int:
        with self.lock:
            return len(self.deliveries)

    def counts(self) -> Counter[str]:
        return Counter(d.message_id for d in self.snapshot())


@dataclass
class ChaosHandler(Pipelining):
    """aiosmtpd handler: replies at DATA according to the current mode (offers PIPELINING,
    as production servers do)."""

    mailbox: Mailbox
    label: str
    mode: Mode = "healthy"
    delay: float = 0.0
    reply_delay: float = 0.0
    slow_delay: float = 1.0
    data_seen: int = 0
    refused: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        with self.lock:
            self.data_seen += 1
            mode, seen = self.mode, self.data_seen
        if mode == "flaky" and seen % 3 == 0:
            with self.lock:
                self.refused += 1
            return "451 4.3.0 chaos: try again later"
        delay = self.slow_delay if mode == "slow" else self.delay
        if delay:  # processing: a client that disconnects meanwhile has sent nothing
            await asyncio.sleep(delay)
        content = envelope.original_content or b""
        parsed = email.message_from_bytes(content)
        self.mailbox.add(
            Delivery(
                message_id=str(parsed["Message-ID"]),
                recipient=envelope.rcpt_tos[0] if envelope.rcpt_tos else "",
                digest=hashlib.sha256(content).hexdigest(),
                at=time.monotonic(),
                server=self.label,
                mail_from=envelope.mail_from or "",
                recipients=tuple(envelope.rcpt_tos),
                smtputf8=envelope.smtp_utf8,
                content=content,
            )
        )
        if self.reply_delay:  # queued: a client that dies now has had its mail accepted
            await asyncio.sleep(self.reply_delay)
        return "250 OK"


class ChaosSmtp:
    """A real SMTP server on 127.0.0.1 that can go down and come back on the same port."""

    def __init__(
        self,
        mailbox: Mailbox,
        label: str = "smtp",
        delay: float = 0.0,
        reply_delay: float = 0.0,
        smtputf8: bool = False,
    ) -> None:
        self.handler = ChaosHandler(mailbox, label, delay=delay, reply_delay=reply_delay)
        self.port = free_port()
        self.smtputf8 = smtputf8  # offer SMTPUTF8 in the EHLO reply
        self._controller: Controller | None = None

    @property
    def running(self) -> bool:
        return self._controller is not None

    def set_mode(self, mode: Mode) -> None:
        with self.handler.lock:
            self.handler.mode = mode

    def up(self) -> None:
        """Start serving (again) on this server's port."""
        assert self._controller is None, "already up"
        deadline = time.monotonic() + 10
        while True:
            controller = Controller(
                self.handler,
                hostname="127.0.0.1",
                port=self.port,
                enable_SMTPUTF8=self.smtputf8,
            )
            try:
                controller.start()
            except OSError:  # the port is still being released: try again shortly
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
                continue
            self._controller = controller
            return

    def down(self) -> None:
        """Stop: open connections are dropped and new ones refused."""
        if self._controller is not None:
            self._controller.stop()
            self._controller = None
