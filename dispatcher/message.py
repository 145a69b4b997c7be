"""Build the MIME message for an outbox row: a pure function of the row's columns."""

from __future__ import annotations

import hashlib
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Any

from dispatcher.settings import parse_address


def build_message(row: Any) -> EmailMessage:
    """Render the outbox row (a record or mapping of its columns) as the message sent.

    Deterministic: the Date header is the row's ``created_at`` and the MIME boundary is
    derived from the Message-ID, so every retry sends byte-identical content.
    """
    msg = EmailMessage(policy=policy.SMTP)
    msg["From"] = parse_address(row["sender"])
    msg["To"] = Address(display_name=row["recipient_name"] or "", addr_spec=row["recipient"])
    msg["Subject"] = row["subject"]
    msg["Date"] = format_datetime(row["created_at"])
    msg["Message-ID"] = row["message_id"]
    msg.set_content(row["body_text"])
    if row["body_html"] is not None:
        msg.add_alternative(row["body_html"], subtype="html")
        digest = hashlib.sha256(row["message_id"].encode()).hexdigest()[:32]
        msg.set_boundary(f"=_outbox_{digest}")
    return msg
