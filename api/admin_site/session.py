"""Sign-in sessions, CSRF tokens and flash messages of the operator's page, all stateless.

A session is a cookie ``EXPIRES.NONCE.MAC``: when it ends, a random nonce, and an
HMAC-SHA256 of both under a key derived from ``ADMIN_TOKEN``. Why signed, not a random id
kept on the server: ``outbox api --workers N`` runs separate processes that share no
memory, and a sessions table would be a schema change for one operator. Why this is safe:

* the cookie holds no secret (the admin token never leaves the sign-in form; the key is
  ``HMAC(ADMIN_TOKEN, label)``, and HMAC does not reveal its key);
* nobody can make or extend a session without the token (the MAC), and a session ends
  at the latest ``SESSION_SECONDS`` after sign-in (``EXPIRES`` is under the MAC);
* changing ``ADMIN_TOKEN`` changes the key, which ends every session at once.

Signing out deletes the cookie in the browser; a copy taken before (which HttpOnly and
SameSite=Strict make hard to take) stays valid until it expires, as with any stateless
session. The CSRF token is another MAC of the session's nonce: tied to that session,
useless in any other, and never stored. Flash messages ride in a short-lived cookie
under their own MAC, so nobody else can make the page say something.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Final, Literal

__all__ = ["FLASH_SECONDS", "SESSION_SECONDS", "Flash", "Session", "Signer"]

#: A session lasts this long after sign-in, then the operator signs in again.
SESSION_SECONDS: Final = 8 * 3600
#: A flash message is shown by the page the browser loads next, within this time.
FLASH_SECONDS: Final = 60
#: Longest flash text kept (a refusal reason is one short line).
_FLASH_MAX = 500


@dataclass(frozen=True, slots=True)
class Session:
    """A signed-in browser: its random nonce and when the session ends (epoch seconds)."""

    nonce: str
    expires: int


@dataclass(frozen=True, slots=True)
class Flash:
    """One message for the next page: ``ok`` (what was done) or ``refused`` (why not)."""

    kind: Literal["ok", "refused"]
    text: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _same(given: str, expected: str) -> bool:
    """Constant-time equality of two strings (any text, not only ASCII)."""
    return hmac.compare_digest(
        given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass")
    )


class Signer:
    """Everything keyed by ``ADMIN_TOKEN``: the token check, sessions, CSRF, flashes."""

    def __init__(self, admin_token: str) -> None:
        token = admin_token.encode()
        # The token's digest, for comparisons whose time depends on neither input.
        self._token_digest = hashlib.sha256(token).digest()
        # One key per use, so a MAC made for one can never pass for another.
        self._keys = {
            label: hmac.new(token, f"outbox-admin/{label}/v1".encode(), hashlib.sha256).digest()
            for label in ("session", "csrf", "flash")
        }

    def _mac(self, label: str, message: str) -> str:
        return _b64(hmac.new(self._keys[label], message.encode(), hashlib.sha256).digest())

    def token_matches(self, given: str) -> bool:
        """Whether ``given`` is the admin token, compared in constant time (digests of
        equal length, so not even the token's length shows in the time taken)."""
        digest = hashlib.sha256(given.encode("utf-8", "surrogatepass")).digest()
        return hmac.compare_digest(digest, self._token_digest)

    # --- sessions -------------------------------------------------------------------------

    def new_session(self, now: float | None = None) -> tuple[Session, str]:
        """A fresh session and its cookie value."""
        now = time.time() if now is None else now
        session = Session(nonce=secrets.token_urlsafe(18), expires=int(now) + SESSION_SECONDS)
        body = f"{session.expires}.{session.nonce}"
        return session, f"{body}.{self._mac('session', body)}"

    def session(self, cookie: str | None, now: float | None = None) -> Session | None:
        """The session a cookie value stands for, or None (absent, forged, expired)."""
        if not cookie or len(cookie) > 200:
            return None
        expires, _, rest = cookie.partition(".")
        nonce, _, mac = rest.partition(".")
        if not (expires.isdigit() and nonce and mac):
            return None
        if not _same(mac, self._mac("session", f"{expires}.{nonce}")):
            return None
        if int(expires) <= (time.time() if now is None else now):
            return None
        return Session(nonce=nonce, expires=int(expires))

    # --- CSRF -----------------------------------------------------------------------------

    def csrf_token(self, session: Session) -> str:
        """The token every form of this session carries."""
        return self._mac("csrf", session.nonce)

    def csrf_matches(self, session: Session, given: str | None) -> bool:
        """Whether a form's token belongs to this session."""
        return given is not None and _same(given, self.csrf_token(session))

    # --- flash messages -------------------------------------------------------------------

    def seal_flash(self, flash: Flash, now: float | None = None) -> str:
        """The cookie value carrying ``flash`` to the next page."""
        expires = int(time.time() if now is None else now) + FLASH_SECONDS
        payload = json.dumps([flash.kind, flash.text[:_FLASH_MAX], expires])
        body = _b64(payload.encode())
        return f"{body}.{self._mac('flash', body)}"

    def open_flash(self, cookie: str | None, now: float | None = None) -> Flash | None:
        """The flash a cookie value carries, or None (absent, forged, stale)."""
        if not cookie or len(cookie) > 4000:
            return None
        body, _, mac = cookie.partition(".")
        if not _same(mac, self._mac("flash", body)):
            return None
        try:
            kind, text, expires = json.loads(_unb64(body))
        except (ValueError, TypeError):
            return None
        if kind not in ("ok", "refused") or not isinstance(text, str):
            return None
        if not isinstance(expires, int) or expires <= (time.time() if now is None else now):
            return None
        return Flash(kind=kind, text=text)
