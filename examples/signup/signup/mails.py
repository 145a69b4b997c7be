"""The app's two mails, rendered in full before they go into the outbox."""

from __future__ import annotations

import html
from email.errors import HeaderParseError
from email.headerregistry import Address

from outbox import Mail

PRODUCT = "Signup example"


def recipient(email: str, display_name: str) -> Address:
    """The address as an Address: the name is sent as typed, never parsed as syntax.

    ValueError when ``email`` is not one address.
    """
    try:
        return Address(display_name, addr_spec=email.strip())
    except (ValueError, HeaderParseError, IndexError):
        raise ValueError(f"{email!r} is not an email address") from None


def welcome(email: str, display_name: str) -> Mail:
    """The welcome mail (ValueError when it could not be sent: a bad address or name)."""
    text = f"Hello {display_name},\n\nwelcome to {PRODUCT}! Your account for {email} is ready.\n"
    markup = (
        f"<p>Hello {html.escape(display_name)},</p>"
        f"<p>welcome to {PRODUCT}! Your account for {html.escape(email)} is ready.</p>"
    )
    return Mail(recipient(email, display_name), f"Welcome to {PRODUCT}", text, markup)


def password_reset(email: str, display_name: str, link: str, valid_for: str) -> Mail:
    """The mail with the reset link (the only place the token is ever written)."""
    text = (
        f"Hello {display_name},\n\n"
        f"to choose a new password, open this link within {valid_for}:\n\n{link}\n\n"
        "If you did not ask for it, ignore this mail: your password stays as it is.\n"
    )
    markup = (
        f"<p>Hello {html.escape(display_name)},</p>"
        f'<p>to choose a new password, <a href="{html.escape(link)}">open this link</a> '
        f"within {valid_for}.</p>"
        "<p>If you did not ask for it, ignore this mail: your password stays as it is.</p>"
    )
    return Mail(recipient(email, display_name), f"Reset your {PRODUCT} password", text, markup)
