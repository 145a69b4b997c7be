"""``outbox dispatcher``: run the delivery daemon until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Any

from prometheus_client import REGISTRY, start_http_server

from cli import args as types
from dispatcher import logs
from dispatcher.daemon import Dispatcher, DispatcherConfig, NameInUse
from dispatcher.db import create_pool
from dispatcher.queue_metrics import QueueCollector, QueueSample, sample_queue
from dispatcher.settings import load_settings, require_database_url
from dispatcher.smtp import SmtpConfig

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
    parser.add_argument("--name", help="unique name among live dispatchers (default host-pid)")
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
    """Start the daemon; exit 0 after a graceful stop."""
    logs.configure()
    settings = load_settings()
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
    dispatcher = Dispatcher(config, database_url, SmtpConfig.from_settings(settings))
    return asyncio.run(_serve(dispatcher, database_url, metrics_port))


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
    loop = asyncio.get_running_loop()
    sampler = None
    if metrics_port:
        latest: list[QueueSample] = []
        REGISTRY.register(QueueCollector(lambda: latest[0] if latest else None))
        start_http_server(metrics_port, addr="127.0.0.1")
        sampler = asyncio.create_task(_sample_queue_forever(database_url, latest))
    received: list[int] = []

    def on_signal(signum: int) -> None:
        received.append(signum)
        if len(received) == 1:
            log.info(
                "dispatcher.signal",
                extra={"signal": signal.Signals(signum).name, "dispatcher": dispatcher.config.name},
            )
            dispatcher.request_stop()
        else:
            # Second signal: leave now. Our leases go stale and other dispatchers take over.
            log.warning("dispatcher.exit_now", extra={"dispatcher": dispatcher.config.name})
            logging.shutdown()
            os._exit(1)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await dispatcher.run()
    except NameInUse as exc:
        print(f"outbox dispatcher: --name {exc} is in use by a live dispatcher", file=sys.stderr)
        return 2
    finally:
        if sampler is not None:
            sampler.cancel()
    return 1 if dispatcher.crashed else 0
