"""LazyDeadline: one timer for a connection's successive waits, each with a deadline."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from outbox.dispatcher.deadline import LazyDeadline


class Expiries:
    """Notes when on_expiry was called (loop time) and lets a test await the next one."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.times: list[float] = []
        self.next: asyncio.Future[float] = self.loop.create_future()

    def __call__(self) -> None:
        now = self.loop.time()
        self.times.append(now)
        if not self.next.done():
            self.next.set_result(now)


async def _until(loop: asyncio.AbstractEventLoop, when: float) -> None:
    """Return once every timer due by ``when`` has run (a timer of our own, due after)."""
    done = loop.create_future()
    loop.call_at(when, done.set_result, None)
    await done
    await asyncio.sleep(0)  # timers due at the same moment ran in the same pass


@pytest.fixture
async def counted_timers(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every ``call_at`` of the running loop from now on, by its time."""
    loop = asyncio.get_running_loop()
    calls: list[float] = []
    call_at: Callable[..., asyncio.TimerHandle] = loop.call_at

    def counting(when: float, callback: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        calls.append(when)
        return call_at(when, callback, *args, **kw)

    monkeypatch.setattr(loop, "call_at", counting)
    return calls


async def test_a_wait_past_its_deadline_expires_once_at_the_deadline() -> None:
    expiries = Expiries()
    deadline = LazyDeadline(expiries)
    due = expiries.loop.time() + 0.05
    deadline.start(due)
    assert await asyncio.wait_for(expiries.next, 5) >= due
    await _until(expiries.loop, expiries.loop.time() + 0.05)
    assert len(expiries.times) == 1


async def test_a_wait_that_ends_in_time_never_expires() -> None:
    expiries = Expiries()
    deadline = LazyDeadline(expiries)
    due = expiries.loop.time() + 0.05
    deadline.start(due)
    deadline.stop()
    await _until(expiries.loop, due + 0.05)
    assert expiries.times == []


async def test_many_waits_with_later_deadlines_share_one_timer(counted_timers: list[float]) -> None:
    expiries = Expiries()
    deadline = LazyDeadline(expiries)
    start = expiries.loop.time()
    for step in range(1000):  # a reply per wait, each allowed 30 s from when it began
        deadline.start(start + 30 + step * 0.001)
        deadline.stop()
    assert counted_timers == [start + 30]
    assert expiries.times == []


async def test_the_timer_moves_to_a_later_deadline_when_it_fires_early() -> None:
    expiries = Expiries()
    deadline = LazyDeadline(expiries)
    loop = expiries.loop
    first = loop.time() + 0.05
    deadline.start(first)
    deadline.stop()
    later = first + 0.1
    deadline.start(later)  # the timer stays set for `first`, then re-arms for `later`
    await _until(loop, first + 0.01)
    assert expiries.times == []
    assert await asyncio.wait_for(expiries.next, 5) >= later


async def test_an_earlier_deadline_rearms_the_timer() -> None:
    expiries = Expiries()
    deadline = LazyDeadline(expiries)
    loop = expiries.loop
    deadline.start(loop.time() + 60)
    deadline.stop()
    soon = loop.time() + 0.05
    deadline.start(soon)
    fired = await asyncio.wait_for(expiries.next, 5)
    assert soon <= fired < soon + 30


async def test_cancel_disarms_for_good() -> None:
    expiries = Expiries()
    deadline = LazyDeadline(expiries)
    due = expiries.loop.time() + 0.05
    deadline.start(due)
    deadline.cancel()
    await _until(expiries.loop, due + 0.05)
    assert expiries.times == []
