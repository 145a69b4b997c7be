"""An in-memory :class:`~dispatcher.store.Store`: the daemon's logic without PostgreSQL.

It claims from a list of due mails, keeps every batch it was asked to record, puts
deferred and released mail back in line (as the database would, minus the delay), and
can be told to fail the next calls of any method with a connection error.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from outbox.dispatcher.store import ClaimedMail, Outcome, Recorded, Release, Subscription

__all__ = ["FakeStore", "FakeSubscription", "mail"]


def mail(outbox_id: int, **changes: Any) -> ClaimedMail:
    """A pending mail as the claim would return it, before the claim counts the attempt."""
    values: dict[str, Any] = {
        "id": outbox_id,
        "message_id": f"<fake-{outbox_id}@example.org>",
        "sender": "Outbox Tests <noreply@example.org>",
        "recipient": f"user-{outbox_id}@example.com",
        "recipient_name": f"User {outbox_id}",
        "subject": f"Hello {outbox_id}",
        "body_text": f"Hello number {outbox_id}\n",
        "body_html": None,
        "created_at": datetime.now(UTC),
        "attempts": 0,
        "lease_token": uuid.uuid4(),
        "lease_expires_at": datetime.now(UTC),
        "trace_context": None,
        "recipient_domain": "example.com",
    }
    return ClaimedMail(**{**values, **changes})


class FakeSubscription:
    """A LISTEN that :meth:`FakeStore.notify` and :meth:`FakeStore.drop_listeners` drive."""

    def __init__(self, on_notify: Callable[[str], None], on_lost: Callable[[], None]) -> None:
        self.on_notify = on_notify
        self.on_lost = on_lost
        self.closed = False

    async def probe(self, time_limit: float) -> None:
        if self.closed:
            raise ConnectionResetError("the listener connection is closed")

    def close(self) -> None:
        self.closed = True


class FakeStore:
    """A store whose database is a few lists."""

    def __init__(self, mails: Sequence[ClaimedMail] = ()) -> None:
        #: Claimable mail, in claim order.
        self.due: list[ClaimedMail] = list(mails)
        #: The ``limit`` of every claim call, and what each returned.
        self.claim_limits: list[int] = []
        self.claimed: list[list[ClaimedMail]] = []
        #: Every batch :meth:`record` wrote, in order.
        self.batches: list[list[Outcome | Release]] = []
        #: Ids :meth:`record` reports as lease lost.
        self.lose_leases: set[int] = set()
        #: While set and cleared, :meth:`record` waits for it (to let a backlog build up).
        self.record_gate: asyncio.Event | None = None
        #: Registrations fail (the name is held by a live dispatcher) while this is true.
        self.name_taken = False
        self.calls: Counter[str] = Counter()
        self.subscriptions: list[FakeSubscription] = []
        self.deregistered: list[str] = []
        self.closed = False
        self._failures: dict[str, list[BaseException]] = {}

    # --- test controls -----------------------------------------------------------------

    def fail(self, method: str, times: int = 1, error: BaseException | None = None) -> None:
        """Make the next ``times`` calls of ``method`` raise ``error`` (a lost connection)."""
        exc = error or ConnectionResetError(f"{method}: connection reset by the test")
        self._failures.setdefault(method, []).extend([exc] * times)

    def add(self, *mails: ClaimedMail) -> None:
        """Make more mail due (without notifying: see :meth:`notify`)."""
        self.due.extend(mails)

    def notify(self, priority: int = 5) -> None:
        """What a committed enqueue does: every live listener hears of it (the payload
        is the mail's priority)."""
        for subscription in self.subscriptions:
            if not subscription.closed:
                subscription.on_notify(str(priority))

    def drop_listeners(self) -> None:
        """The server terminates every LISTEN connection."""
        for subscription in self.subscriptions:
            if not subscription.closed:
                subscription.closed = True
                subscription.on_lost()

    @property
    def outcomes(self) -> list[Outcome]:
        return [item for batch in self.batches for item in batch if isinstance(item, Outcome)]

    @property
    def releases(self) -> list[Release]:
        return [item for batch in self.batches for item in batch if isinstance(item, Release)]

    def history(self, outbox_id: int) -> list[tuple[str, int]]:
        """(outcome, attempt) of every recorded attempt of one mail."""
        return [(o.outcome, o.mail.attempts) for o in self.outcomes if o.mail.id == outbox_id]

    def _call(self, method: str) -> None:
        self.calls[method] += 1
        pending = self._failures.get(method)
        if pending:
            raise pending.pop(0)

    # --- Store -------------------------------------------------------------------------

    async def register(self, name: str, *, stale_after: float, max_abandons: int) -> int | None:
        self._call("register")
        return None if self.name_taken else 0

    async def heartbeat(
        self, name: str, smtp_error: str | None, *, stale_after: float, time_limit: float
    ) -> bool:
        self._call("heartbeat")
        return True

    async def deregister(self, name: str, *, time_limit: float) -> None:
        self._call("deregister")
        self.deregistered.append(name)

    async def claim(
        self, name: str, limit: int, *, lease: float, stale_after: float, max_abandons: int
    ) -> list[ClaimedMail]:
        self._call("claim")
        self.claim_limits.append(limit)
        taken, self.due = self.due[:limit], self.due[limit:]
        expires = datetime.now(UTC) + timedelta(seconds=lease)
        claimed = [
            replace(m, attempts=m.attempts + 1, lease_token=uuid.uuid4(), lease_expires_at=expires)
            for m in taken
        ]
        self.claimed.append(claimed)
        return claimed

    async def release_unknown(self, name: str, held: Collection[int]) -> int:
        self._call("release_unknown")
        return 0

    async def next_due_in(self) -> float | None:
        self._call("next_due_in")
        return 0.0 if self.due else None  # what is put back in line is due at once

    async def record(self, dispatcher: str, batch: Sequence[Outcome | Release]) -> Recorded:
        self._call("record")
        if self.record_gate is not None:
            await self.record_gate.wait()
        self.batches.append(list(batch))
        for item in batch:
            if isinstance(item, Release):
                self.due.append(replace(item.mail, attempts=item.mail.attempts - 1))
            elif item.outcome in ("deferred", "unknown") and item.mail.id not in self.lose_leases:
                self.due.append(item.mail)
        return Recorded({item.mail.id for item in batch} & self.lose_leases, {})

    async def listen(
        self, name: str, on_notify: Callable[[str], None], on_lost: Callable[[], None]
    ) -> Subscription:
        self._call("listen")
        subscription = FakeSubscription(on_notify, on_lost)
        self.subscriptions.append(subscription)
        return subscription

    async def close(self) -> None:
        self.closed = True
