"""Hostile and odd input for the property tests, and what a mail reader makes of a message.

* Strategies: addresses (hypothesis' own, IDN domains, non-ASCII local parts) and text
  (every Unicode category, encoded-word look-alikes, quotes, backslashes, RTL, emoji
  sequences, combining marks, long names).
* :func:`check_message`: parse a rendered message with the email package and check that
  it says exactly what the row says, and nothing more.
* :data:`SEED` and :func:`hypothesis_settings`: bounded, reproducible runs. Under CI the
  seed is fixed; elsewhere it is random unless ``HYPOTHESIS_SEED`` is set, and printed.
"""

from __future__ import annotations

import email
import email.header
import os
import random
import re
import string
from collections.abc import Mapping
from email import errors, policy
from email.message import EmailMessage
from typing import Any

import pytest
from hypothesis import HealthCheck, note, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from outbox.dispatcher.addresses import email_key, smtp_address, unsafe_text
from outbox.dispatcher.settings import parse_address

# --- reproducible, bounded runs ---------------------------------------------------------------

CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
#: The seed of this run: fixed under CI, else HYPOTHESIS_SEED or random.
SEED = (
    20261124
    if CI and not os.environ.get("HYPOTHESIS_SEED")
    else int(os.environ.get("HYPOTHESIS_SEED") or random.SystemRandom().randrange(2**32))
)


_seed_shown: list[bool] = []


def show_seed(request: pytest.FixtureRequest) -> None:
    """Print the seed on the terminal once, past output capturing (for a module fixture)."""
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if capture is None or reporter is None or _seed_shown:
        return
    _seed_shown.append(True)
    with capture.global_and_fixture_disabled():
        reporter.write_line(f"hypothesis seed: {SEED} (HYPOTHESIS_SEED={SEED} repeats the run)")


def explain(text: str) -> None:
    """Attach ``text`` to a failing hypothesis example (a no-op outside one)."""
    if currently_in_test_context():
        note(text)


def hypothesis_settings(max_examples: int, **more: Any) -> settings:
    """Settings for one property: a bounded number of examples, no deadline, no database."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        database=None,  # nothing written under .hypothesis/
        print_blob=True,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,  # the fixtures are reset per example
            HealthCheck.too_slow,
            HealthCheck.filter_too_much,
        ],
        **more,
    )


# --- text ---------------------------------------------------------------------------------------

#: What pydantic's ``strip_whitespace`` removes: Unicode's White_Space property (Rust's
#: ``str::trim``), which differs from Python's ``str.strip()`` (that also strips U+001C..F).
WHITE_SPACE = (
    "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
    "\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)

#: Pieces that have broken mail writers and readers: encoded-word syntax, header syntax,
#: quoting, right-to-left text, combining marks, joiners, emoji sequences, odd spaces.
TRICKY_PIECES = [
    "=?",
    "?=",
    "=?utf-8?q?",
    "=?utf-8?b?",
    "=?UTF-8?Q?Eve=0D=0ABcc:_x@evil.example?=",
    "=?utf-8?b?eEBldmlsLmV4YW1wbGUsIA==?=",
    "=?iso-8859-1?q?=E9?=",
    "=0D=0A",
    "=00",
    '"',
    "\\",
    '\\"',
    "<",
    ">",
    "<x@evil.example>",
    ",",
    ";",
    ":",
    "@",
    "(",
    ")",
    "[",
    "]",
    ".",
    "Bcc: x@evil.example",
    "Reply-To:",
    "  ",
    " ",
    "\u00a0",  # no-break space
    "\u3000",  # ideographic space
    "\u200b",  # zero-width space
    "\u200c",  # zero-width non-joiner
    "\u200d",  # zero-width joiner
    "\ufeff",  # byte order mark
    "\u00ad",  # soft hyphen
    "\u0301",  # combining acute accent
    "e\u0301",
    "\u05e9\u05dc\u05d5\u05dd",  # Hebrew
    "\u0645\u0631\u062d\u0628\u0627",  # Arabic
    "\u200f",  # right-to-left mark (allowed: not an override)
    "\u0928\u092e\u0938\u094d\u0924\u0947",  # Devanagari with a virama
    "\u5c71\u7530\u592a\u90ce",  # CJK
    "Zo\u00eb",
    "\U0001f468\u200d\U0001f469\u200d\U0001f467",  # family: ZWJ sequence
    "\U0001f3f3\ufe0f\u200d\U0001f308",  # rainbow flag
    "\U0001f1e9\U0001f1ea",  # regional indicators
    "\U0001f44d\U0001f3fd",  # skin tone modifier
    "\U0001d54f",  # astral letter
    "\ufffd",
    "\U0010fffd",  # private use, plane 16
]

#: Any character of any category (lone surrogates cannot be UTF-8 and are left out here).
ANY_CHAR = st.characters(exclude_categories=("Cs",))
#: Any character a name or subject may hold (see dispatcher.addresses.unsafe_text).
SAFE_CHAR = st.characters(
    exclude_categories=("Cs", "Cc", "Zl", "Zp"),
    exclude_characters="\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069",
)


def _text(chars: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Text of every kind from ``chars``, mixed with tricky pieces and long runs."""
    return st.one_of(
        st.text(chars, max_size=60),
        st.lists(
            st.one_of(
                st.sampled_from(TRICKY_PIECES),
                st.text(chars, min_size=1, max_size=8),
                st.text(string.ascii_letters + " ", min_size=1, max_size=12),
            ),
            max_size=12,
        ).map("".join),
        # Long text: up to and past the 200-character name limit, ASCII and not.
        st.builds(
            lambda unit, n: (unit * n)[:n],
            st.sampled_from(["x", "Ab ", "\u5c71", "\U0001f600", "\u00e9 ", "a  ", "=?"]),
            st.integers(150, 230),
        ),
    )


#: Text of every kind, characters that break headers included.
ANY_TEXT = _text(ANY_CHAR)


def is_plain_text(value: str) -> bool:
    """The precondition of every name and subject: nothing that breaks a header."""
    return unsafe_text(value) is None


#: Text that may be a name or a subject.
SAFE_TEXT = _text(SAFE_CHAR).filter(is_plain_text)


def api_name(value: str) -> str | None:
    """The name the API stores for ``value``, or None if it must answer 422."""
    stripped = value.strip(WHITE_SPACE)
    if not 1 <= len(stripped) <= 200 or unsafe_text(stripped) is not None:
        return None
    return stripped


#: Names the API should take (stripped, 1..200 characters, plain text).
VALID_NAMES = _text(SAFE_CHAR).filter(lambda value: api_name(value) is not None)

# --- addresses ----------------------------------------------------------------------------------

_IDN_LABELS = [
    "b\u00fccher",
    "ex\u00e4mple",
    "m\u00fcnchen",
    "stra\u00dfe",
    "\u00f1and\u00fa",
    "\u043f\u0440\u0438\u043c\u0435\u0440",  # Cyrillic
    "\u03b4\u03bf\u03ba\u03b9\u03bc\u03ae",  # Greek
    "\u4f8b\u3048",  # Japanese
    "\u4e2d\u6587",  # Chinese
    "\u0645\u062b\u0627\u0644",  # Arabic (right to left)
    "\u05d3\u05d5\u05d2\u05de\u05d4",  # Hebrew (right to left)
    "xn--bcher-kva",  # already an A-label
    "xn--exmple-cua",
    "B\u00dcCHER",  # upper case: mapped by UTS #46
    "e\u0301xample",  # decomposed
]
_ASCII_LABELS = st.text(string.ascii_lowercase + string.digits, min_size=1, max_size=10).filter(
    lambda label: not label.startswith("xn")
)
_TLDS = ["de", "com", "org", "jp", "\u0440\u0444", "\u4e2d\u56fd", "xn--p1ai"]

IDN_DOMAINS = st.builds(
    lambda labels, tld: ".".join([*labels, tld]),
    st.lists(st.one_of(st.sampled_from(_IDN_LABELS), _ASCII_LABELS), min_size=1, max_size=2),
    st.sampled_from(_TLDS),
)

_LOCAL_PIECES = [
    "jos\u00e9",
    "J\u00d6RG",
    "\u00e4da",
    "a\u0308da",  # decomposed
    "\u7528\u6237",  # CJK
    "\u0395\u03bb\u03ad\u03bd\u03b7",  # Greek
    "\u03c3\u03c2",
    "\u0905\u091c\u092f",  # Devanagari
    "\u0627\u062d\u0645\u062f",  # Arabic
    "stra\u00dfe",
    "\u0131da",  # dotless i
    "x+tag",
    "o'brien",
    "a_b-c",
    "first.last",
    "UPPER",
    "!#$%&'*+/^`{|}~",
    "\U0001f600",
]
LOCAL_PARTS = st.one_of(
    st.sampled_from(_LOCAL_PIECES),
    st.text(string.ascii_letters + string.digits + "!#$%&'*+-/^_`{|}~", min_size=1, max_size=20),
    st.lists(st.sampled_from(_LOCAL_PIECES), min_size=1, max_size=3).map(".".join),
)


def no_encoded_word_opener(address: str) -> bool:
    """True unless the local part holds ``=?`` (refused; tested on its own)."""
    return "=?" not in address.rpartition("@")[0]


#: Addresses of every kind the tests feed the API: most valid, some not.
EMAILS = st.one_of(
    st.emails(),
    st.builds(lambda local, domain: f"{local}@{domain}", LOCAL_PARTS, IDN_DOMAINS),
    st.builds(lambda local: f"{local}@example.com", LOCAL_PARTS),
    st.builds(lambda domain: f"ada@{domain}", IDN_DOMAINS),
).filter(no_encoded_word_opener)


def sendable(address: str) -> bool:
    """True if the dispatcher can put ``address`` on the wire (library callers' addresses)."""
    try:
        smtp_address(address)
    except ValueError:
        return False
    return True


def mailbox_key(address: str) -> str:
    """``email_key``, or the address itself when it has none (for uniqueness only)."""
    try:
        return email_key(address)
    except ValueError:
        return address


# --- what a reader sees -------------------------------------------------------------------------

MULTIPART_HEADERS = ["From", "To", "Subject", "Date", "Message-ID", "MIME-Version", "Content-Type"]
TEXT_ONLY_HEADERS = [*MULTIPART_HEADERS, "Content-Transfer-Encoding"]

_UNFOLD = re.compile(r"\r\n(?=[ \t])")
_ENCODED_WORD = re.compile(r"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=")


def parse(data: bytes, smtputf8: bool) -> EmailMessage:
    """Parse a message as a mail reader would (RFC 6532 UTF-8 headers when SMTPUTF8)."""
    if smtputf8:
        parsed = email.message_from_string(data.decode("utf-8"), policy=policy.default)
    else:
        parsed = email.message_from_bytes(data, policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def raw_headers(data: bytes) -> list[tuple[str, str]]:
    """The header fields as written: (name, unfolded value), without the email package."""
    head = data.split(b"\r\n\r\n", 1)[0].decode("utf-8")
    fields = []
    for line in _UNFOLD.sub("", head).split("\r\n"):
        name, colon, value = line.partition(":")
        assert colon, f"not a header field: {line!r}"
        fields.append((name, value.removeprefix(" ")))
    return fields


def rfc2047_phrase(raw: str) -> str:
    """The display name in an unfolded ``phrase <addr>`` as RFC 2047 says to read it.

    Adjacent encoded-words are joined without the white space between them (6.2); the
    text inside an encoded-word is taken as it is. A quoted string is unquoted.
    """
    phrase = raw[: raw.rindex("<")].rstrip(" ")
    if phrase.startswith('"'):
        assert phrase.endswith('"') and len(phrase) >= 2, raw
        return re.sub(r"\\(.)", r"\1", phrase[1:-1])
    if not _ENCODED_WORD.search(phrase):
        return phrase
    decoded = email.header.decode_header(phrase)
    return "".join(
        part.decode(charset or "ascii") if isinstance(part, bytes) else part
        for part, charset in decoded
    )


def python_reads_phrase_exactly(raw: str, name: str) -> bool:
    """False where the email package's phrase parser is known to change the text.

    In a display name (unlike an unstructured field such as Subject) it keeps the folding
    white space between adjacent encoded-words as a space, against RFC 2047 6.2, and
    reads every run of white space inside an encoded-word that starts with a space or a
    tab as one space, the run taken as far as Unicode white space goes (``a \xa0b`` reads
    as ``a b``).
    """
    encoded = _ENCODED_WORD.findall(raw[: raw.rindex("<")])
    return len(encoded) <= 1 and not (encoded and re.search(r"[ \t]\s", name))


def without_white_space(text: str) -> str:
    """``text`` without white space, which the email package's phrase parser changes
    around folds and runs (see :func:`python_reads_phrase_exactly`); the rest it must
    still read exactly."""
    return "".join(text.split())


def _body(part: EmailMessage) -> str:
    content = part.get_content()
    assert isinstance(content, str)
    return content


def _lines(text: str) -> str:
    # A body's line breaks become CRLF on the wire, whichever it held (CRLF, LF or CR).
    return text.replace("\r\n", "\n").replace("\r", "\n")


def check_message(data: bytes, row: Mapping[str, Any], *, smtputf8: bool) -> EmailMessage:
    """Assert that ``data`` (a rendered message) says exactly what ``row`` says.

    Returns the parsed message for further checks.
    """
    name = row["recipient_name"] or ""
    # The wire format: CRLF line ends only, lines within RFC 5322's 998 octets, and 8-bit
    # content only in a message sent with SMTPUTF8.
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", data) is None, "a bare CR or LF"
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    assert data.isascii() or smtputf8
    data.decode("utf-8")

    # The header fields as written: the fixed set, each once, in order.
    expected = MULTIPART_HEADERS if row["body_html"] is not None else TEXT_ONLY_HEADERS
    raw = raw_headers(data)
    assert [field for field, _ in raw] == expected
    raw_value = dict(raw)

    parsed = parse(data, smtputf8)
    assert list(parsed.keys()) == expected
    for part in parsed.walk():
        assert part.defects == [], part.defects
    for field in expected:
        defects = [
            defect
            for defect in parsed[field].defects
            # The email package flags a UTF-8 local part (RFC 6532) although it reads it.
            if not (smtputf8 and isinstance(defect, errors.NonASCIILocalPartDefect))
        ]
        assert defects == [], (field, defects)

    sender = parse_address(row["sender"])
    [from_] = parsed["From"].addresses
    assert from_.display_name == sender.display_name
    assert email_key(from_.addr_spec) == email_key(sender.addr_spec)

    to = parsed["To"]
    assert len(to.groups) == 1 and to.groups[0].display_name is None
    [recipient] = to.addresses
    assert email_key(recipient.addr_spec) == email_key(row["recipient"])
    assert recipient.domain.isascii()  # the A-label form
    # Exactly the stored name, read as RFC 2047 says; the email package reads the same
    # except where its phrase parser changes white space (see python_reads_phrase_exactly).
    assert rfc2047_phrase(raw_value["To"]) == name
    if python_reads_phrase_exactly(raw_value["To"], name):
        assert recipient.display_name == name
    else:
        assert without_white_space(recipient.display_name) == without_white_space(name)

    assert str(parsed["Subject"]) == row["subject"]
    assert str(parsed["Message-ID"]) == row["message_id"]
    assert parsed["Date"].datetime == row["created_at"].replace(microsecond=0)
    assert str(parsed["MIME-Version"]) == "1.0"

    if row["body_html"] is None:
        assert parsed.get_content_type() == "text/plain"
        assert parsed.get_content_charset() == "utf-8"
        assert _lines(_body(parsed)) == _lines(row["body_text"])
    else:
        assert parsed.get_content_type() == "multipart/alternative"
        parts = list(parsed.iter_parts())
        assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
        assert all(isinstance(p, EmailMessage) for p in parts)
        text, html = parts
        assert isinstance(text, EmailMessage) and isinstance(html, EmailMessage)
        assert _lines(_body(text)) == _lines(row["body_text"])
        assert _lines(_body(html)) == _lines(row["body_html"])
    return parsed
