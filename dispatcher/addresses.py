"""Email addresses as the outbox stores, compares and sends them.

* Stored: the address as the user gave it, in Unicode (``bob@bücher.de``).
* Compared: :func:`email_key`, one key per mailbox whatever the letter case, Unicode
  normalisation or IDN spelling, so uniqueness does not depend on the database collation.
* Sent: :func:`smtp_address`, the domain as an A-label (``bob@xn--bcher-kva.de``), which
  every server accepts; only a non-ASCII local part needs the server's SMTPUTF8.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass

import idna

__all__ = [
    "DOT_ATOM",
    "QUOTED_STRING",
    "SmtpAddress",
    "ascii_domain",
    "email_key",
    "plain_text",
    "smtp_address",
    "unsafe_text",
]


#: A dot-atom local part (RFC 5322 atext, and UTF-8 for RFC 6532), safe unquoted.
DOT_ATOM = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]+)*"
)
#: A quoted-string local part (printable ASCII and escapes), as a stored address has it.
QUOTED_STRING = re.compile(r'"(?:[ !#-\[\]-~]|\\[ -~])*"')

#: Characters no plain-text field (a name, a subject) may hold: they break a header, a
#: terminal or a log line, or they reorder what a reader sees. Categories Cc (C0/C1
#: controls, CR and LF among them), Cs (lone surrogates, not storable), Zl and Zp (U+2028,
#: U+2029, which the email package treats as line breaks), and the bidirectional overrides
#: and isolates (Cf, used to disguise text). Other format characters, such as the
#: zero-width joiners that Persian, Indic and emoji text need, are allowed.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})


def unsafe_text(value: str) -> str | None:
    """Why ``value`` cannot be a plain-text header field, or None if it can."""
    for ch in value:
        if ch in _BIDI_CONTROLS:
            return f"must not contain bidirectional control characters (U+{ord(ch):04X})"
        category = unicodedata.category(ch)
        if category in _UNSAFE_CATEGORIES:
            kind = {
                "Cc": "control characters (CR, LF, tab, NUL, ...)",
                "Cs": "lone surrogates",
                "Zl": "line separators",
                "Zp": "paragraph separators",
            }[category]
            return f"must be plain text without {kind} (U+{ord(ch):04X})"
    return None


def plain_text(value: str, what: str, *, longest: int, shortest: int = 1) -> str:
    """``value`` if it is ``shortest`` to ``longest`` characters of plain text
    (:func:`unsafe_text`), else a ValueError saying what is wrong with ``what``."""
    if not shortest <= len(value) <= longest:
        span = f"at most {longest}" if shortest == 0 else f"{shortest} to {longest}"
        raise ValueError(f"{what} is {span} characters long, got {len(value)}")
    reason = unsafe_text(value)
    if reason is not None:
        raise ValueError(f"{what} {reason}")
    return value


@functools.lru_cache(maxsize=4096)
def ascii_domain(domain: str) -> str:
    """The domain as ASCII (IDNA 2008 A-labels, UTS #46 mapping), lower case.

    Raises ValueError for a domain that has no valid A-label form.
    """
    if domain.isascii():
        # Already ASCII: an A-label spelling or a plain name. Still validated, so that
        # an invalid "xn--" label never reaches a server.
        lowered = domain.lower()
        if "xn--" not in lowered:
            return lowered
    try:
        return idna.encode(domain, uts46=True).decode("ascii").lower()
    except (idna.IDNAError, UnicodeError) as exc:
        raise ValueError(
            f"domain {domain!r} is not a valid internationalised name: {exc}"
        ) from None


def _split(address: str) -> tuple[str, str]:
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise ValueError(f"{address!r} is not a full address (user@domain)")
    return local, domain


def email_key(address: str) -> str:
    """The mailbox's identity: equal for every spelling of the same address.

    The local part is compared caselessly by Unicode's canonical caseless matching
    (NFC of the case fold of the NFD form: ``ÄDA``, ``äda`` and ``a\\u0308da`` are one
    key, as are ``ΣΣ`` and ``σς``); the domain by its A-label, so ``bücher.de`` and
    ``xn--bcher-kva.de`` are one domain. Strictly, RFC 5321 lets a server tell local
    parts apart by case; no provider does, and people type addresses in any case.
    """
    local, domain = _split(address)
    folded = unicodedata.normalize("NFC", unicodedata.normalize("NFD", local).casefold())
    return f"{folded}@{ascii_domain(domain)}"


@dataclass(frozen=True, slots=True)
class SmtpAddress:
    """An address as it goes on the wire (envelope and header)."""

    local: str
    domain: str  # always ASCII

    @property
    def needs_smtputf8(self) -> bool:
        """True when the local part is not ASCII: only an SMTPUTF8 server can take it."""
        return not self.local.isascii()

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"


@functools.lru_cache(maxsize=4096)
def smtp_address(address: str) -> SmtpAddress:
    """Split ``address`` and convert its domain to ASCII; ValueError if impossible.

    Also refused: a local part holding ``=?``. RFC 5322 allows it, but mail readers
    (Python's email package among them) decode it as an RFC 2047 encoded-word, so the
    address a reader sees would not be the address the mail went to.
    """
    local, domain = _split(address)
    if "=?" in local:
        raise ValueError("the local part must not contain '=?' (it reads as an encoded-word)")
    reason = unsafe_text(local)
    if reason is not None:
        raise ValueError(f"the local part {reason}")
    return SmtpAddress(unicodedata.normalize("NFC", local), ascii_domain(domain))
