"""The MIME message built from an outbox row: exact, deterministic, safe."""

from __future__ import annotations

from datetime import UTC, datetime
from email import message_from_bytes, policy
from typing import Any

import pytest

from dispatcher.message import build_message

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
