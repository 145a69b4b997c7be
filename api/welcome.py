"""The welcome email, rendered at registration time and stored in the outbox as it is."""

from __future__ import annotations

from email.headerregistry import Address
from html import escape

from dispatcher.outbox import Mail

PRODUCT = "Outbox"


def welcome_mail(email: str, name: str) -> Mail:
    """Render the welcome mail for a new user (plain text with an HTML alternative)."""
    subject = f"Welcome to {PRODUCT}, {name}!"
    text = (
        f"Hello {name},\n\n"
        f"thank you for registering with {PRODUCT}. Your account ({email}) is ready.\n\n"
        f"-- The {PRODUCT} team\n"
    )
    html = (
        "<!doctype html>\n<html><body>\n"
        f"<p>Hello {escape(name)},</p>\n"
        f"<p>thank you for registering with {PRODUCT}. "
        f"Your account (<b>{escape(email)}</b>) is ready.</p>\n"
        f"<p>&mdash; The {PRODUCT} team</p>\n"
        "</body></html>\n"
    )
    local, _, domain = email.rpartition("@")
    return Mail(
        recipient=Address(display_name=name, username=local, domain=domain),
        subject=subject,
        body_text=text,
        body_html=html,
    )
