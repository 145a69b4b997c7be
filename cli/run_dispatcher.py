"""``outbox dispatcher``: run the delivery daemon until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, start_http_server

from outbox.cli import args as types
from outbox.dispatcher import logs, startup
from outbox.dispatcher.backoff import full_jitter
from outbox.dispatcher.db import create_pool
from outbox.dispatcher.queue_metrics import QueueCollector, QueueSample, sample_queue
from outbox.dispatcher.settings import load_settings, require_database_url

if TYPE_CHECKING:
    from outbox.dispatcher.daemon import Dispatcher

log = logging.getLogger("dispatcher")

#: How often the queue gauges are refreshed for the metrics endpoint.
QUEUE_SAMPLE_SECONDS = 5.0


def register(sub: Any) -> None:
    """Add the ``dispatcher`` command to the parser."""
    parser = sub.add_parser(
        "dispatcher",
        help="run the delivery daemon",
        description="Claim due mail, send it over SMTP and record every outcome. "
        "Flags override the DISPATCHER_* environment settings.",
    )
    parser.add_argument(
        "--name",
        type=types.dispatcher_name,
        help="unique name among live dispatchers (default host-pid)",
    )
    parser.add_argument(
        "--concurrency",
        type=types.positive_int,
        help="SMTP connections sending at once (default 8)",
    )
    parser.add_argument(
        "--batch-size", type=types.positive_int, help="most rows one claim takes (default 32)"
    )
    parser.add_argument(
        "--poll-interval",
        type=types.positive_float,
        help="seconds between polls when no NOTIFY arrives (default 2)",
    )
    parser.add_argument(
        "--lease",
        type=types.positive_float,
        help="seconds a claim is valid; a send never outlives it (default 120)",
    )
    parser.add_argument(
        "--max-attempts",
        type=types.positive_int,
        help="attempts before a transiently failing mail is failed (default 15)",
    )
    parser.add_argument(
        "--grace",
        type=types.positive_float,
        help="seconds in-flight sends get to finish on SIGTERM (default 20)",
    )
    parser.add_argument(
        "--metrics-port", type=types.port, help="serve Prometheus metrics on this port"
    )
    parser.set_defaults(handler=run)


def run(ns: argparse.Namespace) -> int:
    """Start the daemon once the database is usable; exit 0 after a graceful stop.

    A misconfigured database (unknown role or database, schema not at head) stops
    start-up at once with one line and status 2; an unreachable one is waited for.
    """
    # Imported here, not at the top: every `outbox` command builds this parser, and the
    # daemon's metrics must not appear in other processes (the API's /metrics).
    from outbox.cli.ports import listen_problem
    from outbox.dispatcher.daemon import Dispatcher, DispatcherConfig
    from outbox.dispatcher.smtp import SmtpConfig

    settings = load_settings()
    logs.configure(settings.log_level, settings.log_format or "json")
    database_url = require_database_url(settings)
    config = DispatcherConfig.from_settings(
        settings,
        name=ns.name,
        concurrency=ns.concurrency,
        batch_size=ns.batch_size,
        poll_interval=ns.poll_interval,
        lease=ns.lease,
        max_attempts=ns.max_attempts,
        grace=ns.grace,
    )
    metrics_port = ns.metrics_port or settings.dispatcher_metrics_port
    if metrics_port:
        problem = listen_problem("127.0.0.1", metrics_port)
        if problem is not None:
            problem = problem.replace("--port", "--metrics-port")
            print(f"outbox dispatcher: {problem}", file=sys.stderr)
            return 2
    dispatcher = Dispatcher(config, database_url, SmtpConfig.from_settings(settings))
    return asyncio.run(_serve(dispatcher, database_url, metrics_port))


async def _wait_for_database(database_url: str, name: str, stopping: asyncio.Event) -> bool:
    """Run the start-up check until it passes (True) or a stop is requested (False).

    Raises :class:`startup.StartupError` for a misconfiguration: only an unreachable
    database is retried, with capped, jittered backoff and one log line per try.
    """
    attempt = 0
    while True:
        check = asyncio.ensure_future(
            startup.check(database_url, application_name=f"outbox-dispatcher:{name}"[:63])
        )
        stop = asyncio.ensure_future(stopping.wait())
        await asyncio.wait({check, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not check.done():
            check.cancel()
            await asyncio.gather(check, return_exceptions=True)
            return False
        try:
            revision = check.result()
        except startup.StartupError as problem:
            if not problem.retryable:
                raise
            attempt += 1
            delay = full_jitter(attempt, 0.5, 5.0) + 0.1
            log.warning(
                "database.unreachable",
                extra={
                    "dispatcher": name,
                    "setting": "DATABASE_URL",
                    "error": str(problem),
                    "attempt": attempt,
                    "retry_in": round(delay, 2),
                },
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), delay)
            if stopping.is_set():
                return False
            continue
        if attempt:
            log.info("database.reachable", extra={"dispatcher": name, "schema": revision})
        return True


async def _sample_queue_forever(database_url: str, latest: list[QueueSample]) -> None:
    """Keep the queue gauges of the metrics endpoint fresh (Prometheus scrapes are sync)."""
    pool = await create_pool(
        database_url, min_size=0, max_size=1, application_name="outbox-dispatcher-metrics"
    )
    try:
        while True:
            latest[:] = [await sample_queue(pool)]
            await asyncio.sleep(QUEUE_SAMPLE_SECONDS)
    finally:
        await pool.close()


async def _serve(dispatcher: Dispatcher, database_url: str, metrics_port: int | None) -> int:
    from outbox.dispatcher.daemon import NameInUse

    loop = asyncio.get_running_loop()
    sampler = None
    if metrics_port:
        latest: list[QueueSample] = []
        REGISTRY.register(QueueCollector(lambda: latest[0] if latest else None))
        start_http_server(metrics_port, addr="127.0.0.1")
        sampler = asyncio.create_task(_sample_queue_forever(database_url, latest))
    received: list[int] = []
    stopping = asyncio.Event()

    def on_signal(signum: int) -> None:
        received.append(signum)
        if len(received) == 1:
            log.info(
                "dispatcher.signal",
                extra={"signal": signal.Signals(signum).name, "dispatcher": dispatcher.config.name},
            )
            stopping.set()
            dispatcher.request_stop()
        else:
            # Second signal: leave now. Our leases go stale and other dispatchers take over.
            log.warning("dispatcher.exit_now", extra={"dispatcher": dispatcher.config.name})
            logging.shutdown()
            os._exit(1)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        if not await _wait_for_database(database_url, dispatcher.config.name, stopping):
            return 0  # stopped while waiting: nothing was claimed
        await dispatcher.run()
    except startup.StartupError as problem:
        print(f"outbox dispatcher: {problem}", file=sys.stderr)
        return problem.exit_code
    except NameInUse as exc:
        print(f"outbox dispatcher: --name {exc} is in use by a live dispatcher", file=sys.stderr)
        return 2
    finally:
        if sampler is not None:
            sampler.cancel()
    return 1 if dispatcher.crashed else 0
