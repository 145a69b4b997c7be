"""The MIME message built from an outbox row: exact, deterministic, safe."""

from __future__ import annotations

import base64
import re
from datetime import UTC, datetime, timedelta, timezone
from email import message_from_bytes, policy
from email.headerregistry import Address
from email.utils import format_datetime
from html import escape as html_escape
from typing import Any

import pytest
from hypothesis import given, seed
from hypothesis import strategies as st

from outbox.dispatcher.addresses import smtp_address, unsafe_text
from outbox.dispatcher.message import Rendered, build_message, header_date
from outbox.dispatcher.outbox import Mail
from tests.hostile import (
    ANY_CHAR,
    EMAILS,
    SAFE_TEXT,
    SEED,
    check_message,
    explain,
    hypothesis_settings,
    sendable,
    show_seed,
)

TRICKY = (
    "Hello Zoë 山田,\n\n"
    "= signs, =3D, trailing spaces   \n"
    ".\n"
    "..two dots\n"
    "From the start of a line\n"
    "--=_outbox_ boundary look-alike\n" + "x" * 300 + "\n\ttab-indented\r\nwindows line\n"
)


def _row(**changes: Any) -> dict[str, Any]:
    row = {
        "sender": "Outbox Team <noreply@example.org>",
        "recipient": "zoe@example.com",
        "recipient_name": 'Zoë "Z" Yamada, Jr.',
        "subject": "Welcome to Outbox, Zoë 山田!",
        "created_at": datetime(2026, 11, 24, 12, 30, tzinfo=UTC),
        "message_id": "<123.456@example.org>",
        "body_text": TRICKY,
        "body_html": "<p>Hello Zo&euml; 山田</p>\n" + "<b>long</b>" * 40,
    }
    row.update(changes)
    return row


def _parse(data: bytes):  # type: ignore[no-untyped-def]
    return message_from_bytes(data, policy=policy.default)


def test_the_parts_round_trip_exactly() -> None:
    row = _row()
    data = build_message(row).as_bytes()
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    assert data.isascii()
    parsed = _parse(data)
    assert parsed.get_content_type() == "multipart/alternative"
    text = parsed.get_body(("plain",)).get_content()
    html = parsed.get_body(("html",)).get_content()
    assert text.replace("\r\n", "\n") == row["body_text"].replace("\r\n", "\n")
    assert html.replace("\r\n", "\n") == row["body_html"]


def test_headers_are_encoded_by_the_email_package() -> None:
    parsed = _parse(build_message(_row()).as_bytes())
    assert parsed["Subject"] == "Welcome to Outbox, Zoë 山田!"
    assert parsed["To"].addresses[0].display_name == 'Zoë "Z" Yamada, Jr.'
    assert parsed["To"].addresses[0].addr_spec == "zoe@example.com"
    assert parsed["From"].addresses[0].addr_spec == "noreply@example.org"
    assert parsed["Message-ID"] == "<123.456@example.org>"
    assert parsed["Date"].datetime == datetime(2026, 11, 24, 12, 30, tzinfo=UTC)


def test_every_retry_sends_the_same_bytes() -> None:
    assert build_message(_row()).as_bytes() == build_message(_row()).as_bytes()
    other = build_message(_row(message_id="<other@example.org>")).as_bytes()
    assert other != build_message(_row()).as_bytes()


def test_plain_text_only() -> None:
    parsed = _parse(build_message(_row(body_html=None)).as_bytes())
    assert parsed.get_content_type() == "text/plain"
    assert parsed.get_content().replace("\r\n", "\n") == TRICKY.replace("\r\n", "\n")


@pytest.mark.parametrize(
    "changes",
    [{"subject": "Hi\r\nBcc: victim@example.net"}, {"recipient_name": "Eve\nBcc: x@y.z"}],
)
def test_header_injection_is_refused(changes: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        build_message(_row(**changes)).as_bytes()


# --- properties: any plain-text name and subject, any address, any body ------------------------

LIBRARY_ADDRESSES = EMAILS.filter(sendable)


@pytest.fixture(scope="module", autouse=True)
def _show_seed(request: pytest.FixtureRequest) -> None:
    show_seed(request)


def _check(row: dict[str, Any]) -> Rendered:
    explain(f"row: {row!r}")
    rendered = build_message(row)
    data = rendered.as_bytes()
    explain(f"message: {data!r}")
    assert rendered.recipient == smtp_address(row["recipient"])
    assert rendered.smtputf8 == (not rendered.recipient.local.isascii())
    check_message(data, row, smtputf8=rendered.smtputf8)
    assert build_message(row).as_bytes() == data  # deterministic
    return rendered


@seed(SEED)
@hypothesis_settings(500)
@given(name=SAFE_TEXT, subject=SAFE_TEXT, recipient=LIBRARY_ADDRESSES, html=st.booleans())
def test_any_plain_text_name_and_subject_read_back_exactly(
    name: str, subject: str, recipient: str, html: bool
) -> None:
    # The precondition is the one Mail and the API enforce: unsafe_text(x) is None. Text
    # that looks like an encoded-word, quotes, backslashes, RTL, emoji sequences, combining
    # marks and names past 200 characters are all in range.
    assert unsafe_text(name) is None and unsafe_text(subject) is None
    _check(
        _row(
            recipient=recipient,
            recipient_name=name,
            subject=subject,
            body_text=f"Hello {name},\n\n{subject}\n",
            body_html=f"<p>{html_escape(name)}</p>\n" if html else None,
        )
    )


@seed(SEED)
@hypothesis_settings(200)
@given(body_text=st.text(ANY_CHAR, max_size=400), body_html=st.none() | st.text(ANY_CHAR))
def test_any_body_reads_back_with_its_line_breaks_as_crlf(
    body_text: str, body_html: str | None
) -> None:
    # Bodies are not checked at all (a library caller may store any text), so every
    # character must arrive; only line breaks may change, to CRLF.
    _check(_row(body_text=body_text, body_html=body_html))


@pytest.mark.parametrize("body", ["one\rtwo", "dot\r.\r\nafter", "x\r\r\ny", "end\r"])
def test_a_lone_cr_in_a_body_never_goes_out_bare(body: str) -> None:
    # SMTP forbids a bare CR (RFC 5321 2.3.8): servers refuse it or read it as a line
    # break, and "\r.\r" ends the data for some of them (SMTP smuggling).
    for row in (_row(body_text=body, body_html=None), _row(body_text="text", body_html=body)):
        data = build_message(row).data()
        assert re.search(rb"\r(?!\n)", data) is None, data


CRLF_REPLY_TO = base64.b64encode(b"Eve\r\nReply-To: x@evil.example\r\n\r\nHi").decode()


@pytest.mark.parametrize(
    "name",
    [
        "=?utf-8?q?Eve=0D=0ABcc:_x@evil.example?=",
        f"=?utf-8?b?{CRLF_REPLY_TO}?=",
        "=?utf-8?b?eEBldmlsLmV4YW1wbGUsIA==?=",
        "=?utf-8?q?a=00b?=",
        "=?utf-8?b?YQBi?=",
        '"Eve" <x@evil.example>, y@evil.example',
        "Eve\\",
        "Zo\u00eb \u05e9\u05dc\u05d5\u05dd \U0001f468\u200d\U0001f469",
    ],
)
def test_encoded_word_and_header_syntax_in_a_name_stays_literal(name: str) -> None:
    subject = f"Welcome, {name}!"
    rendered = _check(_row(recipient_name=name, subject=subject))
    data = rendered.as_bytes()
    head = data.split(b"\r\n\r\n", 1)[0]
    assert b"\x00" not in data
    assert not re.search(rb"^(Bcc|Cc|Reply-To):", head, re.IGNORECASE | re.MULTILINE)


@pytest.mark.parametrize(
    "name",
    # Found by the property test above: white space runs with U+00A0 in them, which only
    # an encoded-word can carry (the email package reads such a run as one space; the
    # RFC 2047 reading is exact).
    [
        "  \xa0",
        " \xa0",
        "Zoë \u3000Ada",
        "a \xa0b",
        "0" * 23 + "\u0800\u0800" + "\U00010000" * 3 + "\xa0",
    ],
)
def test_a_name_with_unicode_white_space_runs_reads_back_by_the_rfc(name: str) -> None:
    _check(_row(recipient_name=name, body_text=f"Hello {name}\n"))


@pytest.mark.parametrize("name", ["Ada  Lovelace", "Ada   Byron  King"])
def test_a_name_with_runs_of_spaces_reads_back_exactly(name: str) -> None:
    # Printable ASCII with a run of spaces can be written as a quoted string, which the
    # email package (and every reader) reads back exactly; as an encoded-word the email
    # package's phrase parser reads each run as one space.
    parsed = _parse(build_message(_row(recipient_name=name)).as_bytes())
    assert parsed["To"].addresses[0].display_name == name


def test_a_local_part_with_an_encoded_word_opener_is_refused() -> None:
    with pytest.raises(ValueError, match="=\\?"):
        build_message(_row(recipient="=?utf-8?q?x?=@example.com"))
    with pytest.raises(ValueError, match="=\\?"):
        Mail(Address("Eve", "a=?b", "example.com"), "subject", "text")


def test_a_quoted_local_part_is_written_once_quoted() -> None:
    # What enqueue() stores for Address(username="john doe"): the quotes are part of it.
    rendered = build_message(_row(recipient='"john doe"@example.com'))
    assert str(rendered.recipient) == '"john doe"@example.com'
    parsed = _parse(rendered.as_bytes())
    assert parsed["To"].addresses[0].addr_spec == '"john doe"@example.com'


@seed(SEED)
@hypothesis_settings(500)
@given(
    when=st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31)),
    minutes=st.none() | st.integers(min_value=-24 * 60 + 1, max_value=24 * 60 - 1),
)
def test_the_date_header_is_what_the_email_package_writes(
    when: datetime, minutes: int | None
) -> None:
    if minutes is not None:
        when = when.replace(tzinfo=timezone(timedelta(minutes=minutes)))
    assert header_date(when) == format_datetime(when)
