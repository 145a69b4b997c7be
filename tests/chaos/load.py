"""Registrations at a steady rate over real HTTP, recording what each request got."""

from __future__ import annotations

import asyncio
import time
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
