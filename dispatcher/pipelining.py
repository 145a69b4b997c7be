"""Replies to SMTP commands sent in one go (RFC 2920, PIPELINING).

A server that offers PIPELINING takes MAIL, RCPT and DATA in one write and answers them
in order, which saves two of the four round trips of a transaction. aiosmtplib reads one
reply per command it sent and drops whatever arrives before it asks for the next, so
while pipelined replies are read, :class:`PipelinedReplies` stands in for its protocol
on the connection's transport (``set_protocol``, part of asyncio's transport API) and
hands the transport back once every reply is in. Connection loss, end of file and flow
control are passed on to aiosmtplib's protocol, so the client always knows the state of
its connection.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

import aiosmtplib

__all__ = ["PipelinedReplies", "command_line"]

#: Longest reply line (as aiosmtplib), and most bytes the reader holds of unread replies
#: or of one reply.
MAX_LINE = 8192
MAX_BUFFER = 4 * MAX_LINE
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")


def command_line(*parts: bytes) -> bytes:
    """One command line, refusing control characters in it (as aiosmtplib's own check)."""
    line = b" ".join(parts)
    if _CONTROL.search(line):
        raise ValueError("Command arg contains a prohibited control character")
    return line + b"\r\n"


class PipelinedReplies(asyncio.Protocol):
    """Collect the replies to ``expected`` commands written together, then step aside.

    Use it as ``await PipelinedReplies(transport, 3, on_reply).read(commands)``: it takes
    the transport over, writes ``commands``, and returns the replies in order once all
    are in, the transport back with its previous protocol. ``on_reply(n)`` is called as
    the n-th reply arrives (how far the transaction got, should the wait be cut short).

    ``then(replies)``, if given, is called once the replies are in: the bytes it returns
    are written at once and their one reply is read too (a message's data after the
    ``354`` to DATA: the transaction needs no trip through the caller in between); None
    ends the read there.
    """

    def __init__(
        self,
        transport: asyncio.Transport,
        expected: int,
        on_reply: Callable[[int], None] = lambda count: None,
        then: Callable[[list[aiosmtplib.SMTPResponse]], bytes | None] | None = None,
    ) -> None:
        self._transport = transport
        self._owner = transport.get_protocol()
        self._expected = expected
        self._on_reply = on_reply
        self._then = then
        self._buffer = bytearray()
        #: The lines of a reply that goes on (and their bytes), until its last line.
        self._lines: list[bytes] = []
        self._held = 0
        self.replies: list[aiosmtplib.SMTPResponse] = []
        self._done: asyncio.Future[list[aiosmtplib.SMTPResponse]] = (
            asyncio.get_running_loop().create_future()
        )

    async def read(self, commands: bytes) -> list[aiosmtplib.SMTPResponse]:
        """Write ``commands`` and wait for their replies (cancel the wait to give up)."""
        if self._transport.is_closing():
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        self._transport.set_protocol(self)
        try:
            self._transport.write(commands)
            return await self._done
        finally:
            if self._transport.get_protocol() is self:
                self._transport.set_protocol(self._owner)

    # --- asyncio.Protocol ---------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._done.done():
            # The server said more than it was asked: the connection is out of step.
            self._transport.close()
            return
        self._buffer += data
        try:
            self._parse()
        except aiosmtplib.SMTPResponseException as exc:
            self._fail(exc)

    def eof_received(self) -> bool | None:
        self._fail(aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"))
        return self._owner.eof_received() if isinstance(self._owner, asyncio.Protocol) else None

    def connection_lost(self, exc: Exception | None) -> None:
        lost = aiosmtplib.SMTPServerDisconnected("Connection lost")
        lost.__cause__ = exc
        self._fail(lost)
        self._owner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._owner.pause_writing()

    def resume_writing(self) -> None:
        self._owner.resume_writing()

    # --- replies ------------------------------------------------------------------------

    def _parse(self) -> None:
        end = self._buffer.rfind(b"\n") + 1
        if not end:  # no line complete yet
            if len(self._buffer) >= MAX_LINE:
                raise aiosmtplib.SMTPResponseException(-1, "Response too long")
            return
        complete = bytes(self._buffer[:end])
        del self._buffer[:end]
        lines = complete.split(b"\n")[:-1]
        for index, line in enumerate(lines, 1):
            if len(line) >= MAX_LINE:
                raise aiosmtplib.SMTPResponseException(-1, "Response too long")
            if not line[:3].isdigit():
                text = line.decode("utf-8", errors="replace").strip()
                raise aiosmtplib.SMTPResponseException(
                    -1, f"Malformed SMTP response line: {text[:200]}"
                )
            self._lines.append(line)
            self._held += len(line)
            if self._held > MAX_BUFFER:  # one reply, over many lines
                raise aiosmtplib.SMTPResponseException(-1, "Response too long")
            if line[3:4] == b"-":  # a continuation: more lines of this reply follow
                continue
            message = b"\n".join(part[4:].strip(b" \t\r") for part in self._lines)
            self._lines.clear()
            self._held = 0
            self.replies.append(
                aiosmtplib.SMTPResponse(
                    int(line[:3]), message.decode("utf-8", errors="surrogateescape")
                )
            )
            self._on_reply(len(self.replies))
            if len(self.replies) == self._expected:
                if index < len(lines) or self._buffer:  # more than the replies asked for
                    raise aiosmtplib.SMTPResponseException(-1, "Unexpected data after replies")
                then, self._then = self._then, None
                follow_up = None if then is None else then(self.replies)
                if follow_up is not None:
                    self._expected += 1
                    self._transport.write(follow_up)
                    return
                self._done.set_result(self.replies)
                return

    def _fail(self, exc: BaseException) -> None:
        if not self._done.done():
            self._done.set_exception(exc)
            self._done.exception()  # retrieved: nobody may be waiting any more
