"""A local SMTP sink (aiosmtpd) that stores every received mail as an .eml file.

It offers PIPELINING (RFC 2920), as production servers do: aiosmtpd reads commands one
line at a time, so commands sent together are simply answered in order.
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

log = logging.getLogger("sink")


class Pipelining:
    """aiosmtpd handler part that adds PIPELINING to the EHLO reply (``pipelining=False``
    on the instance leaves it out, for a server without the extension)."""

    pipelining: bool = True

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname  # what aiosmtpd does itself when there is no hook
        if self.pipelining:
            responses.insert(1, "250-PIPELINING")
        return responses


class MaildirHandler(Pipelining):
    """aiosmtpd handler writing each message to ``folder/<time>-<id>.eml``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        name = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}.eml"
        tmp = self.folder / f".{name}.tmp"
        tmp.write_bytes(content)
        tmp.rename(self.folder / name)  # readers never see a half-written file
        log.info("sink.received", extra={"file": name, "rcpt": envelope.rcpt_tos})
        return "250 OK stored"


def start_sink(folder: Path, port: int, host: str = "127.0.0.1") -> Controller:
    """Start the sink in a background thread and return its controller (``.stop()`` it)."""
    controller = Controller(MaildirHandler(folder), hostname=host, port=port)
    controller.start()
    return controller
