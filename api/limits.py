"""Limits every request meets before a route sees it: body size and storable query text.

Two pure ASGI middlewares (no request object is built, nothing is buffered):

* :class:`BodyLimit`: a body over ``MAX_BODY_BYTES`` is a ``413``. A ``Content-Length``
  over the bound is refused before a byte of the body is read; a body without one
  (chunked) is counted as it streams, and reading stops at the first chunk past the
  bound. Either way the response says ``Connection: close``, so the server drops the
  rest of the upload instead of reading it.
* :class:`QueryText`: a query parameter (name or value) holding text PostgreSQL cannot
  store (NUL, lone surrogates) is a ``422`` naming the parameter, for every endpoint, so
  such text never reaches a statement (where it would be a driver error, a ``500``).
"""

from __future__ import annotations

import json
import re
from urllib.parse import parse_qsl

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["MAX_BODY_BYTES", "BodyLimit", "BodyTooLarge", "QueryText"]

#: The largest request body accepted. A registration is well under 1 KiB.
MAX_BODY_BYTES = 64 * 1024

#: Text PostgreSQL cannot store in a text column: NUL, and lone surrogates (not UTF-8).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


async def _reply(send: Send, status: int, body: object, *, close: bool = False) -> None:
    content = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(content)).encode()),
    ]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": content})


class BodyTooLarge(HTTPException):
    """Raised by the body stream once it passes the bound; answered as a 413.

    An HTTPException, so that FastAPI's body parsing passes it on as it is (any other
    exception there becomes a 400) and the app's handler renders it as ``{"detail": ...}``.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(
            413,
            f"the request body is larger than {limit // 1024} KiB",
            headers={"Connection": "close"},
        )


class BodyLimit:
    """Answer ``413`` to any request whose body is larger than ``max_bytes``."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None:
            if declared > self.max_bytes:
                await self._too_large(send)
                return
            # The server delivers exactly Content-Length bytes (HTTP framing): nothing to
            # count, and the common case costs nothing.
            await self.app(scope, receive, send)
            return

        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            if received > self.max_bytes:  # asked again after the refusal
                raise BodyTooLarge(self.max_bytes)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if started:
                raise
            await self._too_large(send)

    async def _too_large(self, send: Send) -> None:
        detail = BodyTooLarge(self.max_bytes).detail
        await _reply(send, 413, {"detail": detail}, close=True)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            if not value.isdigit():
                return None  # malformed (servers refuse it anyway): count what arrives
            return int(value) if len(value) <= 18 else 10**18
    return None


def _shown(name: str) -> str:
    """A parameter name fit to echo back: unstorable characters escaped, length capped."""
    escaped = _UNSTORABLE.sub(lambda m: f"\\u{ord(m.group()):04x}", name)
    return escaped if len(escaped) <= 100 else escaped[:100] + "..."


class QueryText:
    """Answer ``422`` when a query parameter holds text PostgreSQL cannot store."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        query: bytes = scope.get("query_string", b"") if scope["type"] == "http" else b""
        if query:
            # Parsed exactly as Starlette parses it for the routes.
            for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
                if _UNSTORABLE.search(name) or _UNSTORABLE.search(value):
                    shown = _shown(name)
                    error = {
                        "type": "unstorable_text",
                        "loc": ["query", shown],
                        "msg": f"query parameter '{shown}' must be text without NUL "
                        "characters or lone surrogates",
                    }
                    await _reply(send, 422, {"detail": [error]})
                    return
        await self.app(scope, receive, send)
