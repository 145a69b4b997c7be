"""Build the MIME message for an outbox row: a pure function of the row's columns."""

from __future__ import annotations

import functools
import hashlib
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Any

from dispatcher.settings import parse_address


@functools.lru_cache(maxsize=64)
def sender_address(sender: str) -> Address:
    """The parsed From address (there are only a few senders, so parsing is cached)."""
    return parse_address(sender)


def build_message(row: Any) -> EmailMessage:
    """Render the outbox row (a record or mapping of its columns) as the message sent.

    Deterministic: the Date header is the row's ``created_at`` and the MIME boundary is
    derived from the Message-ID, so every retry sends byte-identical content.
    """
    local, _, domain = row["recipient"].rpartition("@")
    msg = EmailMessage(policy=policy.SMTP)
    msg["From"] = sender_address(row["sender"])
    msg["To"] = Address(display_name=row["recipient_name"] or "", username=local, domain=domain)
    msg["Subject"] = row["subject"]
    msg["Date"] = format_datetime(row["created_at"])
    msg["Message-ID"] = row["message_id"]
    msg.set_content(row["body_text"])
    if row["body_html"] is not None:
        digest = hashlib.sha256(row["message_id"].encode()).hexdigest()[:32]
        msg.make_alternative(boundary=f"=_outbox_{digest}")
        msg.add_alternative(row["body_html"], subtype="html")
    return msg
