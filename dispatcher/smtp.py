"""SMTP delivery over reused aiosmtplib connections, and what each reply means for a mail.

One :class:`SmtpConnection` sends one message at a time and stays open between messages;
the dispatcher keeps ``concurrency`` of them. Every send returns a :class:`SendResult`
instead of raising: the classification of SMTP replies lives here and nowhere else.
"""

from __future__ import annotations

import enum
import ssl
import time
from dataclasses import dataclass

import aiosmtplib

from dispatcher.settings import Settings

#: After this long unused, a connection is checked with NOOP before it carries a mail:
#: servers drop idle clients, and a mail should not be the thing that discovers it.
IDLE_CHECK_SECONDS = 20.0


class Verdict(enum.Enum):
    """What a send attempt means for the mail."""

    SENT = "sent"  # 2xx at end of DATA
    TRANSIENT = "transient"  # retry later: 4xx, timeouts, connection trouble
    PERMANENT = "permanent"  # 5xx: never retry


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


def classify_reply(code: int, reply: str, *, at_rcpt: bool = False) -> SendResult:
    """Map a non-2xx SMTP reply to a verdict.

    4xx is transient and 5xx permanent, except 552 in answer to RCPT: RFC 5321 (4.5.3.1.10)
    says clients must treat it as 452 "too many recipients", which is transient.
    """
    if code == 552 and at_rcpt:
        return SendResult(Verdict.TRANSIENT, code, reply)
    if 400 <= code < 500:
        return SendResult(Verdict.TRANSIENT, code, reply, connection_problem=code == 421)
    return SendResult(Verdict.PERMANENT, code, reply)


class SmtpConnection:
    """One reusable SMTP connection; :meth:`send` never raises for SMTP or network trouble."""

    def __init__(self, config: SmtpConfig) -> None:
        self._config = config
        self._client: aiosmtplib.SMTP | None = None
        self._last_used = 0.0

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
        if client is not None and client.is_connected:
            if time.monotonic() - self._last_used < IDLE_CHECK_SECONDS:
                return client
            try:
                await client.noop()
                return client
            except (aiosmtplib.SMTPException, OSError):
                client.close()
        client = self._new_client()
        self._client = client
        await client.connect()
        return client

    async def send(self, sender: str, recipient: str, message: bytes) -> SendResult:
        """Send one message to one recipient and classify the outcome."""
        try:
            client = await self._ready()
        except aiosmtplib.SMTPResponseException as exc:  # greeting, EHLO, STARTTLS or AUTH
            self.close()
            return SendResult(
                Verdict.TRANSIENT,
                exc.code,
                exc.message,
                error=type(exc).__name__,
                connection_problem=True,
            )
        except (aiosmtplib.SMTPException, OSError, ssl.SSLError) as exc:
            self.close()
            return SendResult(Verdict.TRANSIENT, error=_describe(exc), connection_problem=True)
        # The transaction step by step (not sendmail()), so that we know which command a
        # refusal answered and the exact final code.
        try:
            await client.mail(sender)
            try:
                await client.rcpt(recipient)
            except aiosmtplib.SMTPRecipientRefused as exc:
                await _reset(client)
                return classify_reply(exc.code, exc.message, at_rcpt=True)
            response = await client.data(message)
        except aiosmtplib.SMTPResponseException as exc:  # MAIL FROM or DATA refused, or 421
            if client.is_connected:
                await _reset(client)
            else:
                self.close()
            return classify_reply(exc.code, exc.message)
        except (aiosmtplib.SMTPException, OSError) as exc:  # disconnects and timeouts
            self.close()
            return SendResult(Verdict.TRANSIENT, error=_describe(exc), connection_problem=True)
        finally:
            self._last_used = time.monotonic()
        return SendResult(Verdict.SENT, response.code, response.message)

    def close(self) -> None:
        """Drop the connection (the next send reconnects)."""
        if self._client is not None:
            self._client.close()
            self._client = None

    async def quit(self) -> None:
        """Say QUIT politely if connected."""
        client, self._client = self._client, None
        if client is not None and client.is_connected:
            try:
                await client.quit()
            except (aiosmtplib.SMTPException, OSError):
                client.close()


async def _reset(client: aiosmtplib.SMTP) -> None:
    # Clear the envelope so the connection can carry the next mail; if even RSET fails
    # the connection is of no further use.
    try:
        await client.rset()
    except (aiosmtplib.SMTPException, OSError):
        client.close()


def _describe(exc: BaseException) -> str:
    text = str(exc) or repr(exc)
    return f"{type(exc).__name__}: {text}"[:500]
