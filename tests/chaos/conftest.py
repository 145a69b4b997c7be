"""Fixtures of the chaos suite (``./run chaos``): its own PostgreSQL, rigs, a calm baseline.

The suite starts its own embedded PostgreSQL (so that scenarios can restart it with
pg_ctl without disturbing anything else), a fresh database per scenario, and real
``outbox api`` / ``outbox dispatcher`` processes. At the end of the session every
scenario's figures are printed as a table (see tests/chaos/figures.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from outbox.cli import migrate
from outbox.cli.embedded_pg import EmbeddedPostgres
from tests.chaos import figures
from tests.chaos.load import Load
from tests.chaos.procs import Processes
from tests.chaos.rig import ChaosPostgres, Rig

#: Registrations per second offered by every scenario (and the calm baseline).
RATE = float(os.environ.get("CHAOS_RATE", "25"))
#: Seed of every random choice (kill moments, victims); printed with the figures.
#: Fixed under CI (reproducible runs), random elsewhere; CHAOS_SEED overrides either.
_DEFAULT_SEED = 20261124 if os.environ.get("CI") else random.SystemRandom().randrange(1 << 31)
SEED = int(os.environ.get("CHAOS_SEED", str(_DEFAULT_SEED)))
#: Seconds of calm load for the baseline.
CALM_SECONDS = float(os.environ.get("CHAOS_CALM_SECONDS", "15"))

TEMPLATE = "chaos_template"


@pytest.fixture(scope="session")
def chaos_pg() -> Iterator[ChaosPostgres]:
    """The suite's own PostgreSQL cluster with a migrated template database."""
    root = Path(tempfile.mkdtemp(prefix="outbox-chaos-pg-"))
    embedded = EmbeddedPostgres(
        root,
        # Throwaway data, but commits stay synchronous: a restart must lose nothing.
        settings={"fsync": "off", "full_page_writes": "off", "max_connections": "300"},
    )
    try:
        embedded.start()
        pg = ChaosPostgres(embedded, TEMPLATE)
        asyncio.run(pg.admin(f"CREATE DATABASE {TEMPLATE}"))
        migrate.upgrade(pg.url(TEMPLATE))
        yield pg
    finally:
        with contextlib.suppress(Exception):
            embedded.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


async def _new_rig(pg: ChaosPostgres, label: str, logs: Path) -> Rig:
    database = f"chaos_{label}_{os.getpid()}"
    await pg.admin(
        f"DROP DATABASE IF EXISTS {database} WITH (FORCE)",
        f"CREATE DATABASE {database} TEMPLATE {pg.template}",
    )
    return Rig(pg, database, Processes(logs / label), label)


async def _dispose(rig: Rig) -> None:
    await rig.close()
    with contextlib.suppress(Exception):
        await rig.pg.admin(f"DROP DATABASE IF EXISTS {rig.database} WITH (FORCE)")


@pytest.fixture
async def make_rig(
    chaos_pg: ChaosPostgres, tmp_path: Path
) -> AsyncIterator[Callable[[str], Awaitable[Rig]]]:
    """Make a rig (fresh database, logs under tmp_path); everything is cleaned up after."""
    rigs: list[Rig] = []

    async def make(label: str) -> Rig:
        rig = await _new_rig(chaos_pg, label, tmp_path)
        rigs.append(rig)
        return rig

    try:
        yield make
    finally:
        for rig in rigs:
            await _dispose(rig)


@pytest.fixture(scope="session")
async def calm(chaos_pg: ChaosPostgres, tmp_path_factory: pytest.TempPathFactory) -> float:
    """The calm baseline: the same load and dispatchers, no faults. Returns mails/s."""
    rig = await _new_rig(chaos_pg, "calm", tmp_path_factory.mktemp("calm"))
    try:
        rig.smtp(delay=0.05, label="smtp-a")
        rig.smtp(delay=0.05, label="smtp-b")
        await rig.start_api()
        await rig.start_dispatchers(3)
        load = Load(rig.api_url, "calm", RATE).start()
        await asyncio.sleep(CALM_SECONDS)  # hold the calm phase
        await load.stop()
        await rig.drain(60)
        problems = await rig.stop_all()
        ledger = await rig.reconcile(load)
        figures.CALM["throughput"] = ledger.throughput
        for q in (50, 99):  # 201 -> inbox, the yardstick of "no extra delay"
            latency = ledger.latency(q)
            if latency is not None:
                figures.CALM[f"latency p{q}"] = latency
        figures.record(
            f"calm baseline: {RATE:g} registrations/s for {CALM_SECONDS:g} s, 3 dispatchers",
            ledger,
        )
        figures.assert_no_loss(ledger)
        assert ledger.duplicates == 0
        assert not problems, f"unclean exits: {problems}"
        assert not rig.procs.crashes(), rig.procs.crashes()
        return ledger.throughput
    finally:
        await _dispose(rig)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not figures.TABLES:
        return
    terminalreporter.section("chaos figures")
    terminalreporter.write_line(f"seed {SEED} (CHAOS_SEED={SEED} repeats the random choices)")
    for table in figures.TABLES:
        terminalreporter.write_line("")
        for line in figures.render(table):
            terminalreporter.write_line(line)
