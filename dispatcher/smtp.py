"""SMTP delivery over reused aiosmtplib connections, and what each reply means for a mail.

One :class:`SmtpConnection` sends one message at a time and stays open between messages;
the dispatcher keeps ``concurrency`` of them. Every send returns a :class:`SendResult`
instead of raising: the classification of SMTP replies lives here and nowhere else.
"""

from __future__ import annotations

import asyncio
import enum
import math
import ssl
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Literal, TypeVar, cast

import aiosmtplib

from outbox.dispatcher.deadline import LazyDeadline
from outbox.dispatcher.message import Rendered
from outbox.dispatcher.pipelining import PipelinedReplies, command_line
from outbox.dispatcher.settings import Settings

_R = TypeVar("_R")

#: After this long unused, a connection is checked with NOOP before it carries a mail:
#: servers drop idle clients, and a mail should not be the thing that discovers it.
IDLE_CHECK_SECONDS = 20.0


class Verdict(enum.Enum):
    """What a send attempt means for the mail."""

    SENT = "sent"  # 2xx at end of DATA
    TRANSIENT = "transient"  # retry later: 4xx, timeouts, connection trouble
    PERMANENT = "permanent"  # 5xx: never retry
    #: The whole message went out but no readable reply to it came back: the server may
    #: have accepted it. Retried (with the same Message-ID), and counted apart.
    UNKNOWN = "unknown"


#: How far an SMTP transaction got: the step that was begun last. ``render`` means the
#: message could not be built; ``end_of_data`` that the server had the whole message.
Stage = Literal["render", "connect", "mail", "rcpt", "data", "end_of_data"]

#: The commands that open a transaction, and the replies that let it go on.
_ENVELOPE_STAGES: tuple[Stage, ...] = ("mail", "rcpt", "data")
_EXPECTED: dict[str, tuple[int, ...]] = {"mail": (250,), "rcpt": (250, 251), "data": (354,)}
#: The error of a send cut off at its deadline.
RAN_OUT = "send did not finish within its lease"


@dataclass(frozen=True, slots=True)
class SendResult:
    """The outcome of one SMTP transaction for one mail."""

    verdict: Verdict
    smtp_code: int | None = None
    smtp_reply: str | None = None
    error: str | None = None
    #: True when the failure was about reaching the server at all (connect, TLS, auth,
    #: disconnect), not about this mail: the dispatcher then backs off as a whole.
    connection_problem: bool = False
    stage: Stage = "end_of_data"


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    """Where and how to connect."""

    host: str
    port: int
    security: str = "none"
    username: str | None = None
    password: str | None = None
    timeout: float = 30.0
    ca_file: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> SmtpConfig:
        """Build from SMTP_* settings (SMTP_HOST defaults to localhost)."""
        return cls(
            host=settings.smtp_host or "localhost",
            port=settings.resolved_smtp_port,
            security=settings.smtp_security,
            username=settings.smtp_username,
            password=settings.smtp_password.get_secret_value() if settings.smtp_password else None,
            timeout=settings.smtp_timeout,
            ca_file=settings.smtp_ca_file,
        )

    def __repr__(self) -> str:  # never show the password
        return f"SmtpConfig(host={self.host!r}, port={self.port}, security={self.security!r})"


def classify_reply(code: int, reply: str, stage: Stage) -> SendResult:
    """Map a reply that is not the one expected at ``stage`` to a verdict.

    4xx is transient and 5xx permanent, except 552 in answer to RCPT: RFC 5321 (4.5.3.1.10)
    says clients must treat it as 452 "too many recipients", which is transient. A code
    outside 4xx/5xx is a confused server: transient, except after the end of data, where
    the server may have accepted the message (unknown).
    """
    if code == 552 and stage == "rcpt":
        return SendResult(Verdict.TRANSIENT, code, reply, stage=stage)
    if 400 <= code < 500:
        return SendResult(
            Verdict.TRANSIENT, code, reply, connection_problem=code == 421, stage=stage
        )
    if 500 <= code < 600:
        return SendResult(Verdict.PERMANENT, code, reply, stage=stage)
    verdict = Verdict.UNKNOWN if stage == "end_of_data" else Verdict.TRANSIENT
    return SendResult(verdict, code, reply, connection_problem=True, stage=stage)


class LeaseRunOut(aiosmtplib.SMTPTimeoutError):
    """The send reached the end of the time its lease allowed (the deadline of :meth:`send`)."""


class SmtpConnection:
    """One reusable SMTP connection; :meth:`send` never raises for SMTP or network trouble."""

    def __init__(self, config: SmtpConfig) -> None:
        self._config = config
        self._client: aiosmtplib.SMTP | None = None
        self._last_used = 0.0
        #: How far the current (or last) transaction got; read after a timeout.
        self.stage: Stage = "connect"
        #: The current send's deadline (``loop.time()``), and the error a wait cut short by
        #: it or by SMTP_TIMEOUT raises.
        self._send_deadline = math.inf
        self._timed_out: aiosmtplib.SMTPTimeoutError | None = None
        self._deadline = LazyDeadline(self._expire)

    def _new_client(self) -> aiosmtplib.SMTP:
        config = self._config
        tls_context = None
        if config.security != "none":
            # Certificates are always verified; SMTP_CA_FILE adds a private CA.
            tls_context = ssl.create_default_context(cafile=config.ca_file)
        return aiosmtplib.SMTP(
            hostname=config.host,
            port=config.port,
            username=config.username,
            password=config.password,
            use_tls=config.security == "tls",
            # Explicit False: "none" must not opportunistically upgrade either.
            start_tls=config.security == "starttls",
            tls_context=tls_context,
            timeout=config.timeout,
        )

    async def _ready(self) -> aiosmtplib.SMTP:
        client = self._client
        if (
            client is not None
            and client.is_connected
            and time.monotonic() - self._last_used < IDLE_CHECK_SECONDS
        ):
            return client
        deadline = asyncio.timeout_at(
            None if self._send_deadline == math.inf else self._send_deadline
        )
        try:
            async with deadline:
                return await self._connect()
        except TimeoutError:
            if deadline.expired():  # ours; aiosmtplib's own timeouts are TimeoutErrors too
                raise LeaseRunOut(RAN_OUT) from None
            raise

    async def _connect(self) -> aiosmtplib.SMTP:
        """The connection, checked with NOOP if it has been idle, or a new one."""
        client = self._client
        if client is not None and client.is_connected:
            try:
                await client.noop()
                return client
            except (aiosmtplib.SMTPException, OSError):
                client.close()
        client = self._new_client()
        self._client = client
        await client.connect()
        if client.is_ehlo_or_helo_needed:  # so that the server's extensions are known
            try:
                await client.ehlo()
            except aiosmtplib.SMTPHeloError:
                await client.helo()
        return client

    async def send(self, message: Rendered, *, deadline: float | None = None) -> SendResult:
        """Send one message to its one recipient and classify the outcome.

        The replies are read one by one (MAIL, RCPT and DATA in one write when the
        server offers PIPELINING), so that the result says which step a refusal
        answered (``stage``) and whether the server already had the whole message when
        the connection failed. ``deadline`` (``loop.time()`` seconds) is when the whole
        send must be over (the lease's end): past it the connection is dropped.
        """
        self.stage = "connect"
        self._send_deadline = math.inf if deadline is None else deadline
        self._timed_out = None
        try:
            client = await self._ready()
        except aiosmtplib.SMTPResponseException as exc:  # greeting, EHLO, STARTTLS or AUTH
            self.close()
            return SendResult(
                Verdict.TRANSIENT,
                exc.code,
                exc.message,
                error=f"{type(exc).__name__}: {exc.code} {exc.message}"[:500],
                connection_problem=True,
                stage="connect",
            )
        except (aiosmtplib.SMTPException, OSError, ssl.SSLError) as exc:
            self.close()
            return SendResult(
                Verdict.TRANSIENT, error=describe(exc), connection_problem=True, stage="connect"
            )
        options: list[bytes] = []
        if message.smtputf8:
            if not client.supports_extension("smtputf8"):
                return SendResult(
                    Verdict.PERMANENT,
                    error="the address has a non-ASCII local part and the server does not "
                    "offer SMTPUTF8",
                    stage="mail",
                )
            options = [b"SMTPUTF8", b"BODY=8BITMIME"]
        envelope = (
            (b"MAIL", b"FROM:<" + str(message.sender).encode("utf-8") + b">", *options),
            (b"RCPT", b"TO:<" + str(message.recipient).encode("utf-8") + b">"),
            (b"DATA",),
        )
        # The content and the lone dot that ends it go straight to the transport: a
        # command may not hold line breaks, and this connection carries one transaction
        # at a time, so no other command can interleave.
        content = message.data() + b".\r\n"
        try:
            if client.supports_extension("pipelining"):
                answer = await self._pipelined(client, envelope, content)
                if isinstance(answer, SendResult):
                    return answer
                reply = answer
            else:
                refused = await self._envelope(client, envelope)
                if refused is not None:
                    return refused
                self.stage = "end_of_data"
                protocol = client.protocol
                if protocol is None:
                    raise aiosmtplib.SMTPServerDisconnected("connection lost before the data")
                protocol.write(content)
                reply = await self._reply(protocol.read_response(timeout=None))
        except (aiosmtplib.SMTPException, OSError) as exc:  # disconnects, timeouts, garbage
            self.close()
            verdict = Verdict.UNKNOWN if self.stage == "end_of_data" else Verdict.TRANSIENT
            return SendResult(
                verdict, error=describe(exc), connection_problem=True, stage=self.stage
            )
        finally:
            self._last_used = time.monotonic()
        if 200 <= reply.code < 300:
            return SendResult(Verdict.SENT, reply.code, reply.message, stage="end_of_data")
        return await self._refused(client, reply.code, reply.message)

    async def _envelope(
        self, client: aiosmtplib.SMTP, envelope: tuple[tuple[bytes, ...], ...]
    ) -> SendResult | None:
        """MAIL, RCPT and DATA one at a time; the result of a refusal, or None on 354."""
        for stage, command in zip(_ENVELOPE_STAGES, envelope, strict=True):
            self.stage = stage
            reply = await self._command(client, *command)
            if reply.code not in _EXPECTED[stage]:
                return await self._refused(client, reply.code, reply.message)
        return None

    async def _pipelined(
        self, client: aiosmtplib.SMTP, envelope: tuple[tuple[bytes, ...], ...], content: bytes
    ) -> SendResult | aiosmtplib.SMTPResponse:
        """MAIL, RCPT and DATA in one write (RFC 2920), then the content as soon as DATA
        is answered with 354: two round trips per mail instead of four, and no trip
        through the event loop's tasks between them. The reply to the content, or the
        result of a refusal.

        Every reply is checked, in order: the first refusal is the result, and the
        content goes out only if MAIL, RCPT and DATA were all accepted. A server that
        answers DATA with 354 although it refused the envelope would now read the
        message as data; the connection is dropped instead, which aborts the
        transaction (RFC 5321 4.1.1.4) without a message ever being completed.
        """
        transport = client.transport
        if transport is None or transport.is_closing():
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")

        def progress(count: int) -> None:  # how far it got, should the wait be cut short
            if count < len(_ENVELOPE_STAGES):
                self.stage = _ENVELOPE_STAGES[count]

        def accepted(replies: list[aiosmtplib.SMTPResponse]) -> bytes | None:
            if any(
                reply.code not in _EXPECTED[stage]
                for stage, reply in zip(_ENVELOPE_STAGES, replies, strict=True)
            ):
                return None
            self.stage = "end_of_data"
            self._deadline.start(self._reply_deadline())  # the content's reply: a new wait
            return content

        self.stage = "mail"
        reader = PipelinedReplies(
            cast(asyncio.Transport, transport), len(envelope), progress, accepted
        )
        commands = b"".join(command_line(*command) for command in envelope)
        replies = await self._reply(reader.read(commands))
        if len(replies) > len(envelope):
            return replies[-1]
        for stage, reply in zip(_ENVELOPE_STAGES, replies, strict=True):
            if reply.code not in _EXPECTED[stage]:
                self.stage = stage
                if replies[-1].code == 354:
                    self.close()
                    return classify_reply(reply.code, reply.message, stage)
                return await self._refused(client, reply.code, reply.message)
        raise AssertionError("unreachable: accepted() sends the content unless one is refused")

    async def _command(self, client: aiosmtplib.SMTP, *args: bytes) -> aiosmtplib.SMTPResponse:
        """Send one command and read its reply, within ``SMTP_TIMEOUT``."""
        return await self._reply(client.execute_command(*args, timeout=None))

    async def _reply(self, reading: Awaitable[_R]) -> _R:
        """Await ``reading`` (a command, a reply or pipelined replies) within ``SMTP_TIMEOUT``
        and the send's deadline.

        What aiosmtplib does with ``timeout=``, with one timer per connection instead of one
        per reply (:class:`~dispatcher.deadline.LazyDeadline`). As there, a reply that does
        not come in time closes the connection (it would be out of step) and raises
        SMTPReadTimeoutError (:class:`LeaseRunOut` at the send's deadline).
        """
        self._deadline.start(self._reply_deadline())
        try:
            return await reading
        except aiosmtplib.SMTPException:
            if self._timed_out is not None:
                raise self._timed_out from None
            raise
        finally:
            self._deadline.stop()

    def _reply_deadline(self) -> float:
        """When a reply awaited from now must have come: SMTP_TIMEOUT, within the send's."""
        return min(asyncio.get_running_loop().time() + self._config.timeout, self._send_deadline)

    def _expire(self) -> None:
        """A wait ran past its deadline: drop the connection, which fails the read."""
        lease = asyncio.get_running_loop().time() >= self._send_deadline
        self._timed_out = (
            LeaseRunOut(RAN_OUT)
            if lease
            else aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response")
        )
        client = self._client
        if client is not None:
            transport = client.transport
            if isinstance(transport, asyncio.WriteTransport):
                transport.abort()  # at once, even with unsent data buffered
            self.close()

    async def _refused(self, client: aiosmtplib.SMTP, code: int, reply: str) -> SendResult:
        result = classify_reply(code, reply, self.stage)
        if client.is_connected and 400 <= code < 600 and code != 421:
            # Clear the envelope for the next mail; if even RSET fails the connection is
            # of no further use.
            try:
                reset: aiosmtplib.SMTPResponse | None = await self._command(client, b"RSET")
            except (aiosmtplib.SMTPException, OSError):
                reset = None
            if reset is None or reset.code != 250:
                self.close()
        else:
            self.close()  # 421 or a reply that makes no sense: start afresh
        return result

    def close(self) -> None:
        """Drop the connection (the next send reconnects)."""
        self._deadline.cancel()
        if self._client is not None:
            self._client.close()
            self._client = None

    async def quit(self) -> None:
        """Say QUIT politely if connected."""
        self._deadline.cancel()
        client, self._client = self._client, None
        if client is not None and client.is_connected:
            try:
                await client.quit()
            except (aiosmtplib.SMTPException, OSError):
                client.close()


def describe(exc: BaseException) -> str:
    """``Type: message`` of an exception, bounded (for attempts and logs)."""
    text = str(exc) or repr(exc)
    return f"{type(exc).__name__}: {text}"[:500]
