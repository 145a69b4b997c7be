"""The dispatcher's actors on an in-memory store (tests/fake_store.py): milliseconds each.

No PostgreSQL here (no test asks for ``database_url`` or ``db``); where a mail must go
somewhere it goes to a real aiosmtpd server. The whole product against a real database
is proven by tests/test_dispatcher*.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import asyncpg
import pytest
from opentelemetry import trace
from opentelemetry.context import Context
from prometheus_client import REGISTRY

from outbox.dispatcher import tracing
from outbox.dispatcher.claimer import Claimer, Prefetch
from outbox.dispatcher.daemon import Dispatcher, DispatcherConfig, NameInUse
from outbox.dispatcher.listener import Listener
from outbox.dispatcher.liveness import Liveness
from outbox.dispatcher.recorder import Recorder
from outbox.dispatcher.sender import SUPPRESSED, Sender
from outbox.dispatcher.shared import BoundLog, Claim, ClaimQueue, Shared
from outbox.dispatcher.smtp import SendResult, Verdict
from outbox.dispatcher.store import Outcome, Release
from tests.dispatching import smtp_config, wait_until
from tests.fake_store import FakeStore, mail
from tests.smtp_server import Reply, SmtpServer

NAME = "unit"


def config(**overrides: Any) -> DispatcherConfig:
    """Quick settings: a poll so long that only a wake-up can explain a prompt claim."""
    values: dict[str, Any] = {
        "name": NAME,
        "concurrency": 2,
        "batch_size": 32,
        "poll_interval": 60.0,
        "heartbeat_interval": 10.0,
        "lease": 30.0,
        "retry_base": 0.01,
        "retry_cap": 0.02,
        "grace": 5.0,
    }
    return DispatcherConfig(**{**values, **overrides})


class Actors:
    """One dispatcher's shared state and liveness, as the daemon wires them."""

    def __init__(self, store: FakeStore, cfg: DispatcherConfig | None = None) -> None:
        self.store = store
        self.config = cfg or config()
        self.shared = Shared(db_backoff=lambda attempt: 0.0)
        self.log = BoundLog(self.config.name)
        self.tracer = tracing.tracer("tests")  # no SDK: no spans
        self.liveness = Liveness(self.config, store, self.shared, self.log)
        self.liveness.last_beat = time.monotonic()  # as if just registered

    def claimer(self) -> Claimer:
        return Claimer(self.config, self.store, self.shared, self.liveness, self.log, self.tracer)

    def recorder(self) -> Recorder:
        return Recorder(self.config, self.store, self.shared, self.log, self.tracer)

    def sender(self, server: SmtpServer) -> Sender:
        return Sender(
            self.config,
            smtp_config(server),
            self.shared,
            self.liveness,
            self.log,
            self.tracer,
            jitter=lambda attempt, base, cap: cap,
        )

    def claim(self, outbox_id: int, *, lease_left: float | None = None, **changes: Any) -> Claim:
        """A claim made just now, as the claimer makes it."""
        left = self.config.lease if lease_left is None else lease_left
        self.shared.held.add(outbox_id)
        return Claim(mail(outbox_id, attempts=1, **changes), time.monotonic() + left)

    async def deliver(self, sender: Sender, claims: Sequence[Claim]) -> list[Outcome | Release]:
        """Run one worker over ``claims``: what it queued for the recorder."""
        for claim in claims:
            self.shared.queue.put_nowait(claim)
        self.shared.outstanding += len(claims)
        self.shared.queue.put_nowait(None)
        await sender.work(0)
        assert self.shared.outstanding == 0 and self.shared.room.is_set()
        items = []
        while not self.shared.records.empty():
            item = self.shared.records.get_nowait()
            assert item is not None
            items.append(item)
        return items


async def stop(actors: Actors, *tasks: asyncio.Task[None]) -> None:
    actors.shared.stop.set()
    for task in tasks:
        if task.get_name() == "listener":
            task.cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(r is None or isinstance(r, asyncio.CancelledError) for r in done), done


def ids(items: Sequence[Outcome | Release]) -> list[int]:
    return [item.mail.id for item in items]


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "dispatcher" and r.getMessage() == name]


def field(record: logging.LogRecord, name: str) -> Any:
    """A structured field of a log record (an ``extra`` of the call or of the adapter)."""
    return vars(record)[name]


# --- the claimer ------------------------------------------------------------------------------


def test_the_queue_is_as_deep_as_the_senders_pace_needs() -> None:
    prefetch = Prefetch(concurrency=8, batch_size=64)
    # Nothing measured yet, or a slow relay: one waiting row per sender.
    assert (prefetch.queued(), prefetch.high_water(), prefetch.low_room()) == (8, 16, 4)
    for _ in range(20):  # 2 sends a second, claims of 5 ms
        prefetch.finished(2, 1.0)
        prefetch.claimed(0.005)
    assert prefetch.queued() == 8
    for _ in range(20):  # a fast drain: 1,000 sends a second, claims of 8 ms
        prefetch.finished(100, 0.1)
        prefetch.claimed(0.008)
    # What they finish in 50 ms (Prefetch.WORTH), more than in two claims (16): claims
    # of about 25 rows, not 8.
    assert prefetch.queued() == 50
    assert (prefetch.high_water(), prefetch.low_room()) == (58, 25)
    for _ in range(20):  # slower claims, of 40 ms: twice what they finish during one
        prefetch.claimed(0.04)
    assert prefetch.queued() == 80 and prefetch.low_room() == 40
    prefetch.claimed(1.0)  # a very slow claim: never more than two batches
    assert prefetch.queued() == 128 and prefetch.low_room() == 64
    for _ in range(20):  # the relay slows down: the queue shrinks back
        prefetch.finished(1, 1.0)
    assert prefetch.queued() == 8


async def test_the_claimer_stops_at_the_high_water_mark_and_claims_in_batches() -> None:
    # Concurrency 4, batches of 4, no pace measured: 4 may wait, high water 8, and room for
    # 2 (half the queue) is worth a claim while rows still wait.
    actors = Actors(FakeStore([mail(i) for i in range(1, 21)]), config(concurrency=4, batch_size=4))
    shared, store = actors.shared, actors.store
    claimer = asyncio.create_task(actors.claimer().run())
    await wait_until(lambda: shared.queue.qsize() == 8, timeout=2, what="the first claims")
    assert store.claim_limits == [4, 4]
    assert shared.outstanding == 8 and shared.held == set(range(1, 9))

    def finish_one() -> None:  # what a sender does when it is done with a claim
        shared.queue.get_nowait()
        shared.outstanding -= 1
        shared.room.set()

    # A sender finishes a claim: room for one, and seven still wait, so the claimer waits.
    finish_one()
    await asyncio.sleep(0.05)
    assert store.claim_limits == [4, 4]
    # Room for two: claimed at once, while six still wait, so that the senders have work
    # while the claim is on its way.
    finish_one()
    await wait_until(lambda: store.claim_limits == [4, 4, 2], timeout=2, what="a claim of 2")
    assert shared.queue.qsize() == 8 and shared.outstanding == 8
    # The senders take everything queued: the next room is claimed at once, however small.
    for _ in range(7):
        shared.queue.get_nowait()
    finish_one()
    await wait_until(lambda: store.claim_limits[-1] == 1, timeout=2, what="a claim of 1")
    assert shared.outstanding == 8
    await asyncio.sleep(0.05)
    assert store.claim_limits == [4, 4, 2, 1]  # at the mark again
    await stop(actors, claimer)


async def test_urgent_mail_is_claimed_at_once_and_handed_out_first() -> None:
    # Concurrency 4, batches of 4: high water 8, a claim for room of 2 or more.
    actors = Actors(FakeStore([mail(i) for i in range(1, 11)]), config(concurrency=4, batch_size=4))
    shared, store = actors.shared, actors.store
    listener = asyncio.create_task(Listener(NAME, store, shared, actors.log).run(), name="listener")
    claimer = asyncio.create_task(actors.claimer().run())
    await wait_until(lambda: shared.queue.qsize() == 8, timeout=2, what="the first claims")
    shared.queue.get_nowait()  # a sender finishes one: room for one, seven still queued
    shared.outstanding -= 1
    shared.room.set()
    await asyncio.sleep(0.05)
    assert store.claim_limits == [4, 4]  # waiting for room worth a claim, as usual
    # A default-priority mail changes nothing ...
    store.notify(5)
    await asyncio.sleep(0.05)
    assert store.claim_limits == [4, 4]
    # ... a more urgent one is claimed into the room there is, and goes out next.
    store.due.insert(0, mail(99, priority=0))
    store.notify(0)
    await wait_until(lambda: store.claim_limits == [4, 4, 1], timeout=2, what="urgent claim")
    claim = shared.queue.get_nowait()
    assert claim is not None and claim.mail.id == 99
    await stop(actors, claimer, listener)


def test_the_queue_hands_out_the_most_urgent_claim_first_then_in_order() -> None:
    queue = ClaimQueue()
    for outbox_id, priority in ((1, 5), (2, 5), (3, 0), (4, 9), (5, 0)):
        queue.put_nowait(Claim(mail(outbox_id, priority=priority), deadline=0.0))
    queue.put_nowait(None)
    order = []
    while not queue.empty():
        item = queue.get_nowait()
        order.append(None if item is None else item.mail.id)
    assert order == [3, 5, 1, 2, 4, None]


async def test_a_notification_wakes_the_idle_claimer_long_before_its_poll() -> None:
    actors = Actors(FakeStore())
    shared, store = actors.shared, actors.store
    listener = asyncio.create_task(Listener(NAME, store, shared, actors.log).run(), name="listener")
    claimer = asyncio.create_task(actors.claimer().run())

    async def idle() -> None:
        """Let the claimer find nothing and fall asleep for its 60 s poll interval."""
        await wait_until(lambda: store.subscriptions and store.calls["next_due_in"], timeout=2)
        await asyncio.sleep(0.05)
        claims = store.calls["claim"]
        await asyncio.sleep(0.05)
        assert store.calls["claim"] == claims

    await idle()
    store.add(mail(1))
    await asyncio.sleep(0.05)
    assert shared.queue.empty()  # enqueued, but nobody said so
    started = time.monotonic()
    store.notify()
    await wait_until(lambda: shared.queue.qsize() == 1, timeout=2, what="the claim")
    assert time.monotonic() - started < 0.5

    # A sender takes it and finishes it; the claimer, drained, sleeps on.
    shared.queue.get_nowait()
    shared.outstanding -= 1
    shared.room.set()
    await idle()
    # The listener's connection is terminated: it is rebuilt, and the claimer woken for
    # whatever was enqueued while nobody listened.
    store.add(mail(2))
    store.drop_listeners()
    await wait_until(lambda: shared.queue.qsize() == 1, timeout=2, what="the claim after")
    assert len(store.subscriptions) == 2 and store.subscriptions[0].closed
    await stop(actors, claimer, listener)


async def test_a_listener_connection_that_fails_its_probe_is_rebuilt(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "dispatcher")
    actors = Actors(FakeStore())
    shared, store = actors.shared, actors.store
    listener = asyncio.create_task(
        Listener(NAME, store, shared, actors.log, probe_seconds=0.01).run(), name="listener"
    )
    await wait_until(lambda: shared.wake.is_set(), timeout=2, what="the first wake-up")
    shared.wake.clear()
    store.subscriptions[0].closed = True  # dead, and nobody told us
    await wait_until(lambda: len(store.subscriptions) == 2, timeout=2, what="a new connection")
    await wait_until(lambda: shared.wake.is_set(), timeout=2, what="the wake-up after")
    assert [r.getMessage() for r in caplog.records] == ["listener.failed", "listener.rebuilt"]
    await stop(actors, listener)


async def test_a_failed_claim_is_retried_after_releasing_what_it_may_have_leased(
    caplog: pytest.LogCaptureFixture,
) -> None:
    actors = Actors(FakeStore([mail(1)]))
    actors.store.fail("claim")
    claimer = asyncio.create_task(actors.claimer().run())
    await wait_until(lambda: actors.shared.queue.qsize() == 1, timeout=2, what="the claim")
    # The failed claim may have committed: rows leased to us that we never heard of are
    # handed back before the next claim.
    assert actors.store.calls["release_unknown"] == 1 and actors.store.calls["claim"] == 2
    [failed] = events(caplog, "claim.failed")
    assert field(failed, "dispatcher") == NAME and "connection reset" in field(failed, "error")
    await stop(actors, claimer)


# --- the recorder -----------------------------------------------------------------------------


def sent(claim: Claim) -> Outcome:
    now = claim.mail.created_at
    return Outcome(claim.mail, "sent", SendResult(Verdict.SENT, 250, "OK"), now, now)


async def test_the_recorder_batches_whatever_queued_while_it_wrote() -> None:
    actors = Actors(FakeStore())
    shared, store = actors.shared, actors.store
    store.record_gate = asyncio.Event()
    recorder = asyncio.create_task(actors.recorder().run())
    shared.records.put_nowait(sent(actors.claim(1)))
    await wait_until(lambda: store.calls["record"] == 1, timeout=2, what="the first write")
    # While the first write is in flight, three more finish.
    shared.records.put_nowait(sent(actors.claim(2)))
    shared.records.put_nowait(Release(actors.claim(3).mail, "lease nearly expired"))
    shared.records.put_nowait(sent(actors.claim(4)))
    store.record_gate.set()
    shared.records.put_nowait(None)
    await asyncio.wait_for(recorder, 2)
    assert [ids(batch) for batch in store.batches] == [[1], [2, 3, 4]]
    assert shared.held == set()


async def test_the_recorder_retries_a_lost_connection_and_loses_no_outcome(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "dispatcher")
    actors = Actors(FakeStore())
    shared, store = actors.shared, actors.store
    store.fail("record", times=2)
    store.fail("record", error=asyncpg.DeadlockDetectedError("deadlock detected"))
    recorder = asyncio.create_task(actors.recorder().run())
    shared.records.put_nowait(sent(actors.claim(1)))
    shared.records.put_nowait(Release(actors.claim(2).mail, "shutdown"))
    # A stop does not cut the retries short: the outcome may be a delivered mail.
    shared.stop.set()
    shared.records.put_nowait(None)
    await asyncio.wait_for(recorder, 2)
    assert store.calls["record"] == 4
    assert [ids(batch) for batch in store.batches] == [[1, 2]]
    assert shared.held == set()
    failures = events(caplog, "record.failed")
    assert [field(f, "pending_outcomes") for f in failures] == [2, 2, 2]
    assert all(field(f, "dispatcher") == NAME for f in failures)
    assert events(caplog, "mail.sent") and events(caplog, "mail.released")


async def test_recorded_outcomes_are_logged_with_the_dispatchers_name(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "dispatcher")
    actors = Actors(FakeStore())
    actors.store.lose_leases = {2}
    recorder = asyncio.create_task(actors.recorder().run())
    for claim in (actors.claim(1), actors.claim(2)):
        actors.shared.records.put_nowait(sent(claim))
    actors.shared.records.put_nowait(None)
    await asyncio.wait_for(recorder, 2)
    [ok] = events(caplog, "mail.sent")
    [lost] = events(caplog, "mail.lease_lost")
    assert (ok.levelno, lost.levelno) == (logging.INFO, logging.WARNING)
    for record, outbox_id in ((ok, 1), (lost, 2)):
        fields = vars(record)
        assert fields["dispatcher"] == NAME and fields["outbox_id"] == outbox_id
        assert fields["message_id"] == f"<fake-{outbox_id}@example.org>"
        assert (fields["attempt"], fields["smtp_code"], fields["smtp_stage"]) == (
            1,
            250,
            "end_of_data",
        )
        assert fields["lease_lost"] is (outbox_id == 2)


# --- the senders ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("lease nearly expired", "lease nearly expired"),
        ("heartbeat lapsed after the claim", "heartbeat lapsed since the claim"),
        ("heartbeat stale now", "heartbeat not confirmed"),
    ],
)
async def test_a_claim_whose_lease_may_be_gone_is_released_unsent(
    case: str, reason: str, smtp_server: SmtpServer
) -> None:
    actors = Actors(FakeStore())
    if case == "lease nearly expired":
        claim = actors.claim(1, lease_left=actors.config.lease_margin / 2)
    elif case == "heartbeat lapsed after the claim":
        claim = actors.claim(1)
        actors.liveness.lapsed_at = time.monotonic()  # a late heartbeat ended a lapse
    else:
        claim = actors.claim(1)
        actors.liveness.last_beat = time.monotonic() - actors.config.stale_after
    [item] = await actors.deliver(actors.sender(smtp_server), [claim])
    assert isinstance(item, Release) and item.reason == reason
    assert smtp_server.handler.rcpt_seen == {} and smtp_server.received == []


async def test_a_suppressed_mail_is_recorded_without_any_smtp_connection() -> None:
    nowhere = SmtpServer()  # never started: a connection attempt would fail and pause
    actors = Actors(FakeStore())
    before = _mails_total("suppressed")
    [item] = await actors.deliver(actors.sender(nowhere), [actors.claim(1, suppressed=True)])
    assert isinstance(item, Outcome)
    assert (item.outcome, item.error, item.stage) == ("suppressed", SUPPRESSED, None)
    assert (item.result.verdict, item.result.smtp_code) == (Verdict.PERMANENT, None)
    assert actors.shared.smtp_error is None and actors.shared.smtp_pause_until == 0.0

    recorder = asyncio.create_task(actors.recorder().run())
    actors.shared.records.put_nowait(item)
    actors.shared.records.put_nowait(None)
    await asyncio.wait_for(recorder, 2)
    assert actors.store.history(1) == [("suppressed", 1)]
    assert _mails_total("suppressed") == before + 1


def _mails_total(outcome: str) -> float:
    return REGISTRY.get_sample_value("outbox_mails_total", {"outcome": outcome}) or 0.0


async def test_suppressed_mail_is_skipped_and_the_rest_delivered(smtp_server: SmtpServer) -> None:
    store = FakeStore([mail(1), mail(2, suppressed=True), mail(3)])
    async with dispatching(store, smtp_server):
        await wait_until(lambda: len(store.outcomes) == 3, timeout=5, what="three outcomes")
    assert [store.history(i) for i in (1, 2, 3)] == [
        [("sent", 1)],
        [("suppressed", 1)],
        [("sent", 1)],
    ]
    assert sorted(smtp_server.message_ids()) == ["<fake-1@example.org>", "<fake-3@example.org>"]
    assert "user-2@example.com" not in smtp_server.handler.rcpt_seen


# --- the whole dispatcher on the fake store ---------------------------------------------------


@contextmanager
def _no_context() -> Iterator[trace.Span]:
    yield trace.INVALID_SPAN


class _CrashingOnce(trace.Tracer):
    """A tracer whose first span fails (a broken exporter, say), and no-op after that."""

    def __init__(self) -> None:
        self.crashed = False

    def start_span(
        self, name: str, context: Context | None = None, *a: Any, **k: Any
    ) -> trace.Span:
        if not self.crashed:
            self.crashed = True
            raise RuntimeError("exporter exploded")
        return trace.INVALID_SPAN

    def start_as_current_span(self, *a: Any, **k: Any) -> Any:
        return _no_context()


class _Provider(trace.TracerProvider):
    def __init__(self, tracer: trace.Tracer) -> None:
        self.tracer = tracer

    def get_tracer(self, *a: Any, **k: Any) -> trace.Tracer:
        return self.tracer


@asynccontextmanager
async def dispatching(
    store: FakeStore, server: SmtpServer, provider: Any = None, **overrides: Any
) -> AsyncIterator[Dispatcher]:
    """Run a Dispatcher on ``store`` for the block, then stop it; it must not have crashed."""
    cfg = config(**{"heartbeat_interval": 0.2, "poll_interval": 0.5, "batch_size": 4, **overrides})
    running = Dispatcher(cfg, "", smtp_config(server), provider, store=store)
    task = asyncio.create_task(running.run())
    await asyncio.wait_for(running.started.wait(), 5)
    try:
        yield running
    finally:
        running.request_stop()
        await asyncio.wait_for(task, 10)
    assert not running.crashed


async def test_a_crash_inside_delivery_costs_one_attempt_not_the_dispatcher(
    smtp_server: SmtpServer, caplog: pytest.LogCaptureFixture
) -> None:
    store = FakeStore([mail(1), mail(2)])
    tracer = _CrashingOnce()
    # A short poll: the deferred mail is back in line at once, and found by the next poll.
    async with dispatching(store, smtp_server, _Provider(tracer), poll_interval=0.05) as running:
        await wait_until(lambda: len(smtp_server.received) == 2, timeout=5, what="both sent")
        await wait_until(lambda: len(store.outcomes) == 3, timeout=5, what="three outcomes")
        assert not running.crashed
    histories = sorted(store.history(i) for i in (1, 2))
    assert histories == [[("deferred", 1), ("sent", 2)], [("sent", 1)]]
    [crash] = events(caplog, "mail.deliver_crashed")
    assert crash.exc_info is not None and "exploded" in str(crash.exc_info[1])
    assert smtp_server.message_ids() == {"<fake-1@example.org>": 1, "<fake-2@example.org>": 1}


async def test_shutdown_finishes_the_send_in_flight_and_hands_back_the_rest(
    smtp_server: SmtpServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "dispatcher")
    smtp_server.handler.data_plan = lambda rcpt, seen: Reply(delay=0.3)
    store = FakeStore([mail(1), mail(2), mail(3)])
    # One sender, so high water 2: mail 1 is being sent, mail 2 waits in the queue.
    async with dispatching(store, smtp_server, concurrency=1, batch_size=1) as running:
        assert running.fenced() is False
        await wait_until(lambda: smtp_server.handler.data_seen, timeout=5, what="the send")
    assert store.history(1) == [("sent", 1)]
    assert [(r.mail.id, r.reason) for r in store.releases] == [(2, "shutdown")]
    assert store.claim_limits == [1, 1] and [m.id for m in store.due] == [3, 2]
    assert store.deregistered == [NAME] and store.closed
    [drained] = events(caplog, "dispatcher.drained")
    assert (field(drained, "handed_back"), field(drained, "dispatcher")) == (1, NAME)
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("dispatcher.")][
        -3:
    ] == ["dispatcher.stopping", "dispatcher.drained", "dispatcher.stopped"]


async def test_a_name_held_by_a_live_dispatcher_is_refused(smtp_server: SmtpServer) -> None:
    store = FakeStore()
    store.name_taken = True
    cfg = config(heartbeat_interval=0.02)
    running = Dispatcher(cfg, "", smtp_config(smtp_server), store=store)
    with pytest.raises(NameInUse, match=NAME):
        await asyncio.wait_for(running.run(), 5)
    assert store.calls["register"] > 1 and store.closed  # waited for a stale holder first
