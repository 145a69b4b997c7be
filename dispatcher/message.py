"""Build the message for an outbox row: a pure function of the row's columns.

Headers are written here, strictly, instead of through ``email.message.EmailMessage``:
setting a header there *parses* the value, and the parser decodes RFC 2047 encoded-words
(``=?utf-8?q?...?=``) in a display name or a subject, turning a user's literal text into
structure (a ``Bcc:`` line, a second recipient, a new body). Here every text field is
written so that a reader decodes it back to exactly the stored text:

* a subject that is plain printable ASCII (single spaces, no ``=?``) is written as it is,
  and so is a display name of printable ASCII (as a quoted string unless it is atoms);
* anything else is written entirely as base64 encoded-words of whole characters, which
  carry any Unicode text and no syntax at all;
* addresses are never decoded from anything: the envelope and the header get the same
  ``local@domain``, the domain as an A-label (``dispatcher.addresses``). Only a non-ASCII
  local part needs SMTPUTF8; then that header carries UTF-8 (RFC 6532).

The body parts have a fixed shape (UTF-8 text, quoted-printable), encoded directly with
:func:`binascii.b2a_qp`. Quoted-printable keeps the body 7-bit and line-length safe for
any content, and ``=`` is always encoded in it, so the boundary (which starts with
``=_``) can never occur inside a part. Line breaks in a body become CRLF, a lone CR
included: a bare CR never reaches the wire (some servers take ``CR . CR LF`` as the end of
data). The property tests in tests/test_message.py parse what this writes with the email
package and check it says exactly what the row says. (One allowance: Python's parser
reads the fold between two encoded-words of a display name as a space, against RFC 2047
6.2; the tests decode those names by the RFC.)
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from outbox.dispatcher.addresses import (
    DOT_ATOM,
    QUOTED_STRING,
    SmtpAddress,
    smtp_address,
    unsafe_text,
)
from outbox.dispatcher.settings import parse_address

__all__ = ["Rendered", "build_message", "header_date", "sender_address"]

#: A line of printable ASCII words separated by single spaces, with no encoded-word
#: opener: the only text written into a header as it is.
_PLAIN = re.compile(r"(?!.*=\?)[!-~]+(?: [!-~]+)*")
#: A display name of printable ASCII, written as a quoted string (spaces kept as they are).
_QUOTABLE = re.compile(r"(?!.*=\?)[ -~]{1,200}")
#: A display name that is a phrase of atoms (RFC 5322 atext words), safe unquoted.
_ATOMS = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-]+(?: [A-Za-z0-9!#$%&'*+/=?^_`{|}~\-]+)*")
#: Bytes of text per encoded-word: 42 bytes are 56 base64 characters, and with the
#: ``=?utf-8?b?`` ``?=`` frame a folded line stays within 78 characters.
_EW_BYTES = 42
#: Longest text written as it is; longer text is encoded (and so folded anywhere).
_PLAIN_MAX = 200


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def header_date(when: datetime) -> str:
    """A Date header's text (RFC 5322 3.3), as ``email.utils.format_datetime`` writes it.

    Written directly (English names, whatever the locale): the standard library's route
    through a time tuple cost more than the rest of the headers together. A naive time
    gets ``-0000`` (zone unknown), as there.
    """
    offset = when.utcoffset()
    if offset is None:
        zone = "-0000"
    else:
        minutes = int(offset.total_seconds()) // 60
        hours, minutes = divmod(abs(minutes), 60)
        zone = f"{'-' if offset.total_seconds() < 0 else '+'}{hours:02d}{minutes:02d}"
    return (
        f"{_DAYS[when.weekday()]}, {when.day:02d} {_MONTHS[when.month - 1]} {when.year:04d} "
        f"{when.hour:02d}:{when.minute:02d}:{when.second:02d} {zone}"
    )


@dataclass(frozen=True, slots=True)
class Rendered:
    """The message for one row: envelope addresses, header lines and body, as sent."""

    sender: SmtpAddress
    recipient: SmtpAddress
    #: (name, value) pairs; a value may hold folds (CRLF + space) as it is written.
    headers: tuple[tuple[str, str], ...]
    body: bytes

    @property
    def smtputf8(self) -> bool:
        """True when the message needs a server offering SMTPUTF8."""
        return self.sender.needs_smtputf8 or self.recipient.needs_smtputf8

    def as_bytes(self) -> bytes:
        """The message as it goes after DATA (before dot-stuffing)."""
        head = "".join(f"{name}: {value}\r\n" for name, value in self.headers)
        return head.encode("utf-8" if self.smtputf8 else "ascii") + b"\r\n" + self.body

    def data(self) -> bytes:
        """The DATA payload: dot-stuffed, ending with CRLF (the final dot is not included)."""
        # Every line starting with a dot gets another one (RFC 5321 4.5.2).
        data = self.as_bytes().replace(b"\n.", b"\n..")
        if data.startswith(b"."):
            data = b"." + data
        return data if data.endswith(b"\r\n") else data + b"\r\n"


def build_message(row: Any) -> Rendered:
    """Render the outbox row (a record or mapping of its columns) as the message sent.

    Deterministic: the Date header is the row's ``created_at`` and the MIME boundary is
    derived from the Message-ID, so every retry sends byte-identical content. Raises
    ValueError for a row no server could be sent (a malformed address, a header field
    with a line break).
    """
    _, sender = _sender(row["sender"])
    recipient = smtp_address(row["recipient"])
    message_id = row["message_id"]
    if not _PLAIN.fullmatch(message_id) or " " in message_id:
        raise ValueError(f"malformed Message-ID {message_id!r}")
    headers = (
        ("From", _from_header(row["sender"])),
        ("To", _mailbox(row["recipient_name"] or "", recipient)),
        ("Subject", _unstructured(row["subject"])),
        ("Date", header_date(row["created_at"])),
        ("Message-ID", message_id),
        ("MIME-Version", "1.0"),
    )
    if row["body_html"] is None:
        return Rendered(
            sender,
            recipient,
            (
                *headers,
                ("Content-Type", 'text/plain; charset="utf-8"'),
                ("Content-Transfer-Encoding", "quoted-printable"),
            ),
            _quoted_printable(row["body_text"]),
        )
    boundary = "=_outbox_" + hashlib.sha256(message_id.encode()).hexdigest()[:32]
    marker = f"--{boundary}\r\n".encode()
    body = b"".join(
        (
            marker,
            _part(b"plain", row["body_text"]),
            b"\r\n",
            marker,
            _part(b"html", row["body_html"]),
            f"\r\n--{boundary}--\r\n".encode(),
        )
    )
    content_type = f'multipart/alternative; boundary="{boundary}"'
    return Rendered(sender, recipient, (*headers, ("Content-Type", content_type)), body)


@functools.lru_cache(maxsize=64)
def sender_address(sender: str) -> SmtpAddress:
    """The envelope sender for a row's ``sender`` column (there are few: cached)."""
    return _sender(sender)[1]


@functools.lru_cache(maxsize=64)
def _sender(sender: str) -> tuple[str, SmtpAddress]:
    address = parse_address(sender)
    return address.display_name, smtp_address(address.addr_spec)


@functools.lru_cache(maxsize=64)
def _from_header(sender: str) -> str:
    """The From header for a ``sender`` column (cached: it is the same for every mail)."""
    return _mailbox(*_sender(sender))


def _mailbox(display_name: str, address: SmtpAddress) -> str:
    local = address.local
    if QUOTED_STRING.fullmatch(local) and "=?" not in local:
        pass  # a quoted local part as stored ("john doe"@...): written as it is
    elif not DOT_ATOM.fullmatch(local) or "=?" in local:
        # Never reached for addresses the API accepts; a library caller's quoted local
        # part is written as a quoted string, and "=?" (which mail readers would decode
        # as an encoded-word even there) cannot be written faithfully at all.
        if "=?" in local or unsafe_text(local) is not None:
            raise ValueError(f"local part {local!r} cannot be written in a header")
        local = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
    spec = f"<{local}@{address.domain}>"
    if not display_name:
        return spec
    # Plain printable ASCII holds nothing unsafe_text refuses; anything else is checked.
    if _QUOTABLE.fullmatch(display_name):
        phrase = (
            display_name
            if _ATOMS.fullmatch(display_name)
            else '"' + display_name.replace("\\", "\\\\").replace('"', '\\"') + '"'
        )
    else:
        _check_text("display name", display_name)
        phrase = _encoded_words(display_name)
    # Fold before the address when the line would be long (RFC 5322's 78 characters).
    joiner = " " if len(phrase) + len(spec) < 70 and "\r\n" not in phrase else "\r\n "
    return phrase + joiner + spec


def _unstructured(text: str) -> str:
    if _is_plain(text):
        return _fold_words(text)
    _check_text("subject", text)
    return _encoded_words(text)


def _is_plain(text: str) -> bool:
    return len(text) <= _PLAIN_MAX and _PLAIN.fullmatch(text) is not None


def _check_text(field: str, text: str) -> None:
    reason = unsafe_text(text)
    if reason is not None:
        raise ValueError(f"{field} {reason}")


def _fold_words(text: str) -> str:
    """Fold plain text at spaces so lines stay near 78 characters (never splits a word)."""
    if len(text) <= 68:
        return text
    lines: list[str] = []
    line = ""
    for word in text.split(" "):
        if line and len(line) + 1 + len(word) > 68:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    lines.append(line)
    return "\r\n ".join(lines)


def _encoded_words(text: str) -> str:
    """``text`` as base64 encoded-words of whole characters, one per folded line.

    Readers join adjacent encoded-words without the folding whitespace between them
    (RFC 2047 6.2), so the decoded value is exactly ``text``, spaces included.
    """
    words: list[str] = []
    chunk = bytearray()
    for ch in text:
        encoded = ch.encode("utf-8")
        if len(chunk) + len(encoded) > _EW_BYTES:
            words.append(_ew(bytes(chunk)))
            chunk.clear()
        chunk += encoded
    if chunk:
        words.append(_ew(bytes(chunk)))
    return "\r\n ".join(words)


def _ew(data: bytes) -> str:
    return "=?utf-8?b?" + base64.b64encode(data).decode("ascii") + "?="


def _quoted_printable(text: str) -> bytes:
    # Every line break (CRLF, LF, a lone CR) becomes one CRLF: b2a_qp passes a lone CR
    # through, and a bare CR must never reach the wire.
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    encoded = binascii.b2a_qp(text.encode("utf-8"), istext=True)
    return encoded.replace(b"\n", b"\r\n")


def _part(subtype: bytes, text: str) -> bytes:
    return (
        b"Content-Type: text/" + subtype + b'; charset="utf-8"\r\n'
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + _quoted_printable(text)
    )
