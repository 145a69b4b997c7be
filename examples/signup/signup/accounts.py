"""Each write and its mail, in the caller's transaction.

The caller owns the transaction (``async with session.begin(): ...``): the user and the
welcome mail, or the reset token and its mail, are committed together or not at all, and
``outbox dispatcher`` is woken at the commit.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

from outbox import Enqueued, enqueue
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from signup import mails
from signup.models import PasswordReset, User

#: How long a password-reset link works.
RESET_VALID_FOR: Final = timedelta(hours=1)


@dataclass(frozen=True)
class SignedUp:
    user: User
    welcome: Enqueued
    #: False when the address had signed up before: the same user, the same welcome mail.
    created: bool


async def find_user(session: AsyncSession, email: str) -> User | None:
    """The user with this address, in any letter case."""
    found: User | None = await session.scalar(
        select(User).where(func.lower(User.email) == email.strip().lower())
    )
    return found


async def sign_up(session: AsyncSession, email: str, display_name: str) -> SignedUp:
    """Create the user with this address (unless there is one) and enqueue the welcome mail.

    ValueError, before any SQL, when the mail could not be sent (a bad address or name).
    The mail's key is the user's id: however often this runs for one address (a double
    click, a retried request), the user gets one welcome mail, and a repeat returns it.
    Two first sign-ups with one address at once: the second fails at the unique index
    (``IntegrityError``); its transaction, run again, finds the user.
    """
    welcome = mails.welcome(email, display_name)
    user = await find_user(session, email)
    created = user is None
    if user is None:
        user = User(email=email.strip(), display_name=display_name)
        session.add(user)
        await session.flush()  # user.id
    queued = await enqueue(session, welcome, key=f"welcome:{user.id}")
    return SignedUp(user, queued, created)


def token_hash(token: str) -> bytes:
    """What is stored of a reset token."""
    return hashlib.sha256(token.encode()).digest()


async def request_password_reset(
    session: AsyncSession, email: str, reset_url: str
) -> Enqueued | None:
    """Store a new reset token for the user with this address and enqueue the mail with
    its link (``reset_url?token=...``); None when nobody has the address."""
    user = await find_user(session, email)
    if user is None:
        return None
    token = secrets.token_urlsafe(32)
    expires = datetime.now(UTC) + RESET_VALID_FOR
    session.add(PasswordReset(user_id=user.id, token_hash=token_hash(token), expires_at=expires))
    await session.flush()
    link = f"{reset_url}?token={token}"
    mail = mails.password_reset(user.email, user.display_name, link, "1 hour")
    return await enqueue(session, mail)


async def valid_reset(session: AsyncSession, token: str) -> User | None:
    """The user a reset token is for, while it is unused and unexpired."""
    found: User | None = await session.scalar(
        select(User)
        .join(PasswordReset, PasswordReset.user_id == User.id)
        .where(
            PasswordReset.token_hash == token_hash(token),
            PasswordReset.used_at.is_(None),
            PasswordReset.expires_at > func.now(),
        )
    )
    return found
