"""Liveness: register the dispatcher's name, heartbeat, and know when we may be fenced.

Others honour our leases only while our heartbeat is fresh. So a send never starts while
the heartbeat may look stale (:meth:`Liveness.fenced`), nor for a claim made before a
lapse (:meth:`Liveness.lapsed_since`): while we were silent it may have been taken over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Literal

from outbox.dispatcher.db import CONNECTION_ERRORS
from outbox.dispatcher.shared import Shared
from outbox.dispatcher.store import Store

if TYPE_CHECKING:
    from outbox.dispatcher.daemon import DispatcherConfig

__all__ = ["Liveness", "Registration"]

#: How registering ended: the name is ours, a stop came first, or a live dispatcher has it.
Registration = Literal["registered", "stopped", "taken"]


class Liveness:
    """Registration and the heartbeat loop; the last beat and lapse, for the others."""

    def __init__(
        self,
        config: DispatcherConfig,
        store: Store,
        shared: Shared,
        log: logging.LoggerAdapter[logging.Logger],
    ) -> None:
        self._config = config
        self._store = store
        self._shared = shared
        self._log = log
        #: time.monotonic() of the last confirmed heartbeat (or registration).
        self.last_beat = 0.0
        #: time.monotonic() of the heartbeat that ended our last lapse: claims made before
        #: it may have been taken over while we were silent, so they are never sent.
        self.lapsed_at = 0.0

    def fenced(self) -> bool:
        """True when our heartbeat may look stale to others: start no send then."""
        silent = time.monotonic() - self.last_beat
        return silent > self._config.stale_after - self._config.heartbeat_interval

    def lapsed_since(self, claimed_at: float) -> bool:
        """True if a lapse ended after ``claimed_at`` (time.monotonic()): do not send."""
        return claimed_at < self.lapsed_at

    async def register(self) -> Registration:
        """Take our name, waiting out a holder that may be a dead predecessor."""
        cfg = self._config
        attempt = 0
        waited_since = time.monotonic()
        while not self._shared.stop.is_set():
            try:
                reclaimed = await self._store.register(
                    cfg.name, stale_after=cfg.stale_after, max_abandons=cfg.max_abandons
                )
            except CONNECTION_ERRORS as exc:
                attempt += 1
                await self._shared.db_trouble(self._log, "dispatcher.register", exc, attempt)
                continue
            if reclaimed is not None:
                self.last_beat = time.monotonic()
                if reclaimed:
                    self._log.info("dispatcher.reclaimed_predecessor", extra={"rows": reclaimed})
                return "registered"
            if time.monotonic() - waited_since > cfg.stale_after + cfg.heartbeat_interval:
                return "taken"
            await self._shared.sleep(cfg.heartbeat_interval / 2)
        return "stopped"

    async def run(self) -> None:
        """Heartbeat every interval, and at once when the SMTP server's health changes."""
        cfg = self._config
        shared = self._shared
        failures = 0
        while True:
            try:
                alive = await self._store.heartbeat(
                    cfg.name,
                    shared.smtp_error,
                    stale_after=cfg.stale_after,
                    time_limit=cfg.heartbeat_interval,
                )
                now = time.monotonic()
                if not alive or self.fenced():
                    # Silent long enough to be presumed dead: others may own our leases now.
                    self.lapsed_at = now
                self.last_beat = now
                failures = 0
            except CONNECTION_ERRORS as exc:
                failures += 1
                if failures == 1 or failures % 10 == 0:
                    self._log.warning(
                        "heartbeat.failed", extra={"error": repr(exc), "failures": failures}
                    )
            shared.beat_now.clear()
            # Not cut short by a stop request: the heartbeat goes on while in-flight sends
            # finish during shutdown (their leases rely on it), at its usual pace.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(shared.beat_now.wait(), cfg.heartbeat_interval)
