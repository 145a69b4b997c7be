"""One timer for a sequence of waits that each must end by a deadline.

``asyncio.timeout()`` creates a timer for every wait and cancels it when the wait ends:
for a dispatcher that waits for two or three SMTP replies per mail, with a deadline for
the whole send around them, that was a tenth of its CPU in a drain. A connection waits
for one thing at a time, so one timer does: a wait only notes its deadline, and the timer
is re-armed only when a deadline comes earlier than the one it is set for. When it fires
it finds the wait over (and stays unarmed), its deadline moved later (and re-arms for
it), or the deadline passed, and then calls ``on_expiry``, which must end the wait (for a
connection: drop it, so that the read fails).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

__all__ = ["LazyDeadline"]


class LazyDeadline:
    """Deadlines for one wait at a time, on the running event loop's clock."""

    def __init__(self, on_expiry: Callable[[], None]) -> None:
        self._on_expiry = on_expiry
        #: When the current wait must end (inf: no wait).
        self._deadline = math.inf
        self._timer: asyncio.TimerHandle | None = None

    def start(self, deadline: float) -> None:
        """A wait begins that must end by ``deadline`` (``loop.time()`` seconds)."""
        self._deadline = deadline
        timer = self._timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = asyncio.get_running_loop().call_at(deadline, self._fire)

    def stop(self) -> None:
        """The wait ended in time (the timer, if armed, finds nothing to do)."""
        self._deadline = math.inf

    def cancel(self) -> None:
        """Disarm for good (the connection is gone)."""
        self._deadline = math.inf
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline == math.inf:
            return
        loop = asyncio.get_running_loop()
        if loop.time() < deadline:
            self._timer = loop.call_at(deadline, self._fire)
            return
        self._deadline = math.inf
        self._on_expiry()
