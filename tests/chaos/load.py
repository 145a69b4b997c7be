"""Registrations over real HTTP, recording what each request got: a steady stream of
ordinary ones (:class:`Load`) and a catalogue of hostile ones (:class:`HostileLoad`)."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx


@dataclass
class Request:
    """One POST /register and what came of it."""

    email: str
    sent_at: float  # time.monotonic()
    done_at: float | None = None
    status: int | None = None  # None: no HTTP answer (connection refused or dropped)
    outbox_id: int | None = None
    message_id: str | None = None
    error: str | None = None

    @property
    def created(self) -> bool:
        return self.status == 201


class Load:
    """Open-loop load: a new registration every 1/rate seconds, however the last one went.

    Emails are unique (``{prefix}-{n}@example.com``) and every request is sent once: no
    retries, so an email's fate is decided by that single request.
    """

    def __init__(self, base_url: str, prefix: str, rate: float, timeout: float = 10.0) -> None:
        self.base_url = base_url
        self.prefix = prefix
        self.rate = rate
        self.timeout = timeout
        self.requests: list[Request] = []
        self.started_at = 0.0
        self.stopped_at = 0.0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> Load:
        self._task = asyncio.create_task(self._run(), name=f"load-{self.prefix}")
        return self

    async def stop(self) -> None:
        """Stop sending and wait for the requests in flight to finish."""
        self._stop.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=32)
        client = httpx.AsyncClient(base_url=self.base_url, timeout=self.timeout, limits=limits)
        async with client, asyncio.TaskGroup() as group:
            self.started_at = time.monotonic()
            interval = 1.0 / self.rate
            due = self.started_at
            n = 0
            while not self._stop.is_set():
                request = Request(f"{self.prefix}-{n:06d}@example.com", time.monotonic())
                self.requests.append(request)
                group.create_task(self._one(client, request, n))
                n += 1
                due += interval
                # Pacing, not waiting for a condition: this is the load's clock.
                await asyncio.sleep(max(0.0, due - time.monotonic()))
            self.stopped_at = time.monotonic()

    async def _one(self, client: httpx.AsyncClient, request: Request, n: int) -> None:
        try:
            response = await client.post(
                "/register", json={"email": request.email, "name": f"Chaos User {n}"}
            )
        except httpx.HTTPError as exc:
            request.error = type(exc).__name__
        else:
            request.status = response.status_code
            if response.status_code == 201:
                body = response.json()
                request.outbox_id = body["outbox_id"]
                request.message_id = body["message_id"]
        finally:
            request.done_at = time.monotonic()

    # --- what came of it ----------------------------------------------------------------

    @property
    def created(self) -> list[Request]:
        return [r for r in self.requests if r.created]

    def count(self, status: int) -> int:
        return sum(1 for r in self.requests if r.status == status)

    @property
    def unanswered(self) -> int:
        return sum(1 for r in self.requests if r.status is None)

    def first_created_after(self, t: float) -> float | None:
        """When the first request sent after monotonic time ``t`` got its 201."""
        times = [r.done_at for r in self.created if r.sent_at >= t and r.done_at is not None]
        return min(times) if times else None


# --- hostile registrations ------------------------------------------------------------------


@dataclass(frozen=True)
class Hostile:
    """One hostile POST /register: what is sent, and the status it must get.

    ``token`` is unique text in the email or the name, so that a refused request can be
    shown to have stored nothing: no row anywhere holds its token.
    """

    kind: str  # what it tries, for the figures
    token: str
    email: str = ""
    name: str = ""
    expect: int = 201
    #: Sent instead of ``{"email", "name"}`` as JSON: this body as it is (with its
    #: Content-Length), or, with ``chunked``, streamed in chunks (no Content-Length).
    raw: bytes | None = None
    chunked: bool = False

    @property
    def body(self) -> bytes:
        if self.raw is not None:
            return self.raw
        # UTF-8 as typed; a lone surrogate goes out as the invalid bytes it stands for.
        text = json.dumps({"email": self.email, "name": self.name}, ensure_ascii=False)
        return text.encode("utf-8", "surrogatepass")


@dataclass
class HostileRequest:
    """A hostile case as sent, and what came of it."""

    case: Hostile
    request: Request


def _b64_word(text: str) -> str:
    return "=?utf-8?b?" + base64.b64encode(text.encode()).decode() + "?="


def hostile_round(round_no: int) -> list[list[Hostile]]:
    """One round of hostile registrations, as groups sent in order (a mailbox first, then
    other spellings of it, which must get 409). Every address is new in each round."""
    n = itertools.count()

    def tok() -> str:
        return f"h{round_no}x{next(n):03d}z"

    groups: list[list[Hostile]] = []

    def accept(kind: str, email: str, name: str) -> None:
        t = tok()
        groups.append([Hostile(kind, t, email.format(t=t), name)])

    def refuse(kind: str, email: str, name: str, expect: int = 422) -> None:
        t = tok()
        groups.append([Hostile(kind, t, email.format(t=t), name.format(t=t), expect)])

    def spellings(kind: str, email: str, others: list[str], name: str) -> None:
        t = tok()
        group = [Hostile(kind, t, email.format(t=t), name)]
        for other in others:
            t2 = tok()  # the duplicate's own token, in its name
            group.append(Hostile("other spelling", t2, other.format(t=t), f"Dup {t2}", 409))
        groups.append(group)

    # IDN domains (the envelope and the header must carry A-labels).
    accept("IDN domain", "bob-{t}@exämple.com", "Bob")
    accept("IDN domain", "x-{t}@xn--bcher-kva.de", "X")
    accept("IDN domain", "{t}@例子.测试", "Li")
    accept("IDN domain", "mail-{t}@ΠΑΡΆΔΕΙΓΜΑ.δοκιμή", "Greek")
    spellings(
        "IDN domain",
        "user-{t}@bücher.de",
        ["user-{t}@xn--bcher-kva.de", "USER-{t}@BÜCHER.DE"],
        "Büchernarr",
    )
    # Non-ASCII local parts: only a server offering SMTPUTF8 can take them.
    accept("non-ASCII local part", "jörg-{t}@example.com", "Jörg")
    accept("non-ASCII local part", "用户-{t}@例子.测试", "用户")
    accept("non-ASCII local part", "δοκιμή-{t}@παράδειγμα.δοκιμή", "Δοκιμή")
    accept("non-ASCII local part", "пользователь-{t}@пример.рф", "Пользователь")
    accept("non-ASCII local part", "مستخدم-{t}@example.com", "مستخدم")
    accept("non-ASCII local part", "Ünïcode-{t}@Bücher.DE", "Ünïcode")
    spellings(
        "non-ASCII local part",
        "a\u0308da-{t}@example.com",  # decomposed; stored NFC
        ["ÄDA-{t}@example.com", "\u00e4da-{t}@EXAMPLE.com"],
        "Äda",
    )
    spellings("non-ASCII local part", "ΣΣ-{t}@example.com", ["σς-{t}@example.com"], "Σ")
    # Names that look like RFC 2047 encoded-words: they must arrive as those characters.
    for name in (
        "=?utf-8?q?Eve=0D=0ABcc:_victim@evil.example?=",
        "=?UTF-8?Q?Mallory=0D=0AReply-To:_attacker@evil.example=0D=0A=0D=0Ainjected_body?=",
        _b64_word("Eve\r\nBcc: victim@evil.example\r\n\r\nowned"),
        _b64_word("Eve <eve@evil.example>, Mallory <m@evil.example>"),
        _b64_word("a@evil.example") + " <b@evil.example>, c@evil.example",
        "=?utf-8?q?nul=00byte?=",
        "=?utf-8?b?AA==?= NUL",
        "Zoë =?utf-8?q?=0D=0ABcc:_x@evil.example?= 山田",
        "=?iso-8859-1?q?caf=E9?= =?utf-8?q?=E2=80=A8?=",
        "=?utf-8?q? ?= =? ?= =?=?=",
    ):
        accept("encoded-word name", "ew-{t}@example.com", name)
    # Very long names (200 characters is the limit).
    for name in (
        ("Zoë 山田 👨‍👩‍👧‍👦 محمد بن موسى " * 20)[:200].strip(),
        "A" * 200,
        ("=?utf-8?q?=0D=0ABcc:_x@evil.example?= " * 10)[:200].strip(),
        "😀" * 200,
    ):
        accept("long name", "long-{t}@example.com", name)
    # Right-to-left, emoji, joiners, combining marks, quotes and backslashes.
    for name in (
        "محمد بن موسى الخوارزمي",
        "שָׁלוֹם עֲלֵיכֶם",
        "👩‍💻 Dev",
        "🏳️‍🌈 👨‍👩‍👧‍👦",
        "می‌خواهم",  # ZWNJ
        "क्‍ष",  # ZWJ
        "Z̷̢̛a̶̡l̸̨g̵̢o̴̧",
        "e\u0301 Ame\u0301lie",
        "\u200bhidden \ufeffBOM",
        "Ω≈ç√∫ \U0001d518\U0001d52b\U0001d526\U0001d520\U0001d52c\U0001d521\U0001d522",  # astral
        'Ada "The Countess" Lovelace',
        'back\\slash \\" quote\\',
        '"',
        "O'Brien, Jr. <ceo@evil.example>",
        "Bcc: victim@evil.example",
        "(comment) Bob; Reply-To: x@evil.example",
        "Ada  Lovelace",
        "Ada\u00a0Lovelace",
    ):
        accept("odd name", "name-{t}@example.com", name)
    # Refused: 4xx, and nothing stored.
    for name in (
        "Eve\u2028Bcc: victim@evil.example",
        "Eve\u2029para",
        "nul\u0000byte",
        "Eve\r\nBcc: victim@evil.example",
        "abc\u202etxt.exe",
        "isolate\u2066x\u2069",
        "next\u0085line",
        "tab\there",
        "lone \ud800 surrogate",
        "x" * 201,
        "   ",
    ):
        refuse("refused name", "refused-{t}@example.com", name)
    for email in (
        "=?utf-8?q?x?=-{t}@example.com",
        "a=?b-{t}@example.com",
        "nul\u0000-{t}@example.com",
        "crlf-{t}@example.com\r\nBcc: victim@evil.example",
        "Eve <eve-{t}@example.com>",
        "bidi\u202e-{t}@example.com",
        "bad-{t}@xn--zz.de",
        "line\u2028-{t}@example.com",
    ):
        refuse("refused email", email, "Refused {t}")
    t = tok()
    groups.append(
        [
            Hostile(
                "refused body",
                t,
                raw=f'{{"email": "raw-{t}@example.com", "name": "a\x00b"}}'.encode(),
                expect=422,
            )
        ]
    )
    t = tok()
    extra = {"email": f"extra-{t}@example.com", "name": "Eve", "is_admin": True}
    groups.append([Hostile("refused body", t, raw=json.dumps(extra).encode(), expect=422)])
    for chunked, size in ((False, 100 * 1024), (True, 70 * 1024)):
        t = tok()
        big = json.dumps({"email": f"big-{t}@example.com", "name": "x" * size}).encode()
        groups.append([Hostile("oversized body", t, raw=big, chunked=chunked, expect=413)])
    return groups


class HostileLoad:
    """Hostile registrations one at a time, spread evenly over ``seconds``."""

    def __init__(
        self, base_url: str, groups: list[list[Hostile]], seconds: float, timeout: float = 10.0
    ) -> None:
        self.base_url = base_url
        self.groups = groups
        self.seconds = seconds
        self.timeout = timeout
        self.requests: list[HostileRequest] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> HostileLoad:
        self._task = asyncio.create_task(self._run(), name="load-hostile")
        return self

    async def wait(self) -> None:
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        cases = [case for group in self.groups for case in group]
        interval = self.seconds / max(1, len(cases))
        async with httpx.AsyncClient(base_url=self.base_url, timeout=self.timeout) as client:
            due = time.monotonic()
            for case in cases:
                request = Request(case.email, time.monotonic())
                self.requests.append(HostileRequest(case, request))
                await self._one(client, case, request)
                due += interval
                await asyncio.sleep(max(0.0, due - time.monotonic()))  # the stream's pace

    async def _one(self, client: httpx.AsyncClient, case: Hostile, request: Request) -> None:
        body = case.body
        content: bytes | AsyncIterator[bytes] = body
        if case.chunked:

            async def chunks() -> AsyncIterator[bytes]:
                for i in range(0, len(body), 8192):
                    yield body[i : i + 8192]

            content = chunks()
        try:
            response = await client.post(
                "/register", content=content, headers={"content-type": "application/json"}
            )
        except httpx.HTTPError as exc:
            request.error = type(exc).__name__
        else:
            request.status = response.status_code
            if response.status_code == 201:
                answer = response.json()
                request.outbox_id = answer["outbox_id"]
                request.message_id = answer["message_id"]
        finally:
            request.done_at = time.monotonic()
