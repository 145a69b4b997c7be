"""The listener: LISTEN for enqueued mail on a dedicated connection, rebuilt when it dies.

A notification only wakes the claimer (the claim finds the work), so a missed one costs
at most a poll interval; after every (re)connect the claimer is woken anyway, for what
was enqueued while nobody listened.
"""

from __future__ import annotations

import asyncio
import logging

from outbox.dispatcher.db import CONNECTION_ERRORS
from outbox.dispatcher.shared import Shared
from outbox.dispatcher.store import Store, Subscription

__all__ = ["LISTENER_PROBE_SECONDS", "Listener"]

#: How often the LISTEN connection is probed with a query (a silent connection may be dead).
LISTENER_PROBE_SECONDS = 5.0


class Listener:
    """Keeps one LISTEN connection alive and turns notifications into ``shared.wake``."""

    def __init__(
        self,
        name: str,
        store: Store,
        shared: Shared,
        log: logging.LoggerAdapter[logging.Logger],
        *,
        probe_seconds: float = LISTENER_PROBE_SECONDS,
    ) -> None:
        self._name = name
        self._store = store
        self._shared = shared
        self._log = log
        self._probe_seconds = probe_seconds

    async def run(self) -> None:
        """Listen until cancelled, rebuilding the connection whenever it is lost."""
        wake = self._shared.wake
        attempt = 0
        while True:
            lost = asyncio.Event()
            subscription: Subscription | None = None
            try:
                subscription = await self._store.listen(self._name, self._shared.notified, lost.set)
                if attempt:
                    self._log.info("listener.rebuilt")
                attempt = 0
                wake.set()  # notifications may have been missed while we were away
                while not lost.is_set():
                    try:
                        await asyncio.wait_for(lost.wait(), self._probe_seconds)
                    except TimeoutError:
                        await subscription.probe(self._probe_seconds)
                self._log.warning("listener.lost")
            except CONNECTION_ERRORS as exc:
                attempt += 1
                await self._shared.db_trouble(
                    self._log, "listener", exc, attempt, interruptible=False
                )
            finally:
                if subscription is not None:
                    subscription.close()
