"""A scenario's world: its database, SMTP servers, API and dispatcher processes, and checks.

:class:`Rig` starts everything through :class:`~tests.chaos.procs.Processes` and
:class:`~tests.chaos.smtp.ChaosSmtp`, and :meth:`Rig.reconcile` compares every row in
``users`` and ``outbox``, every 201 the load got, and every message the SMTP servers
accepted, by Message-ID.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx

from outbox.cli.embedded_pg import EmbeddedPostgres, free_port
from outbox.dispatcher.addresses import email_key
from outbox.dispatcher.db import CONNECTION_ERRORS, asyncpg_dsn
from tests.chaos.load import Load
from tests.chaos.procs import Proc, Processes, clean_environ
from tests.chaos.smtp import ChaosSmtp, Mailbox
from tests.dispatching import wait_until

#: The product's default liveness settings: recovery figures are measured with these.
LIVENESS = {"DISPATCHER_HEARTBEAT_INTERVAL": "2", "DISPATCHER_POLL_INTERVAL": "2"}
#: Shorter retries than the product's (5 s .. 30 min), and enough attempts that nothing
#: fails permanently during a 30-second SMTP outage.
RETRIES = {
    "DISPATCHER_RETRY_BASE": "0.5",
    "DISPATCHER_RETRY_CAP": "2",
    "DISPATCHER_MAX_ATTEMPTS": "1000",
    "SMTP_TIMEOUT": "10",
}
#: Width of the windows in which the slowest delivery rate is looked for (seconds).
WINDOW = 5.0
#: Seconds after which a silent dispatcher is presumed dead (3 heartbeat intervals).
STALE_AFTER = 3 * float(LIVENESS["DISPATCHER_HEARTBEAT_INTERVAL"])


@dataclass
class ChaosPostgres:
    """The chaos suite's own PostgreSQL cluster: restartable with pg_ctl on the same port."""

    embedded: EmbeddedPostgres
    template: str

    @property
    def admin_url(self) -> str:
        return self.embedded.url()

    def url(self, database: str) -> str:
        parts = urlsplit(asyncpg_dsn(self.admin_url))
        return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, ""))

    async def admin(self, *statements: str) -> None:
        conn = await asyncpg.connect(self.admin_url)
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()

    async def stop(self) -> None:
        """pg_ctl stop -m fast (open transactions are rolled back, sessions terminated)."""
        await asyncio.to_thread(self.embedded.stop, "fast")

    async def start(self) -> None:
        """pg_ctl start on the same port."""
        await asyncio.to_thread(self.embedded.start)


class Db:
    """One checking connection that reconnects by itself (PostgreSQL may be restarting)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: asyncpg.Connection | None = None

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(
                self.url, timeout=5, server_settings={"application_name": "chaos-checks"}
            )
        return self._conn

    async def fetch(self, query: str, *args: Any, retry_for: float = 60.0) -> list[asyncpg.Record]:
        deadline = time.monotonic() + retry_for
        while True:
            try:
                conn = await self._connection()
                return await conn.fetch(query, *args, timeout=30)
            except CONNECTION_ERRORS:
                if self._conn is not None:
                    self._conn.terminate()
                self._conn = None
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)

    async def fetchval(self, query: str, *args: Any) -> Any:
        rows = await self.fetch(query, *args)
        return rows[0][0] if rows else None

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(*CONNECTION_ERRORS):
                await self._conn.close(timeout=5)
            self._conn = None


def mailbox_key(address: str) -> str:
    """The address's ``email_key``, or the address itself if it has none (a row written
    without the API, such as ``nobody``: no user can have that key)."""
    try:
        return email_key(address)
    except ValueError:
        return address


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


@dataclass
class Ledger:
    """What the database, the HTTP clients and the SMTP servers say happened."""

    requests: int
    created: int  # 201 answers
    http_status: Counter[int | None]
    committed: int  # rows in users
    outbox_rows: int
    status: Counter[str]
    delivered: int  # distinct Message-IDs received that have an outbox row
    copies: int  # every message received
    lost: set[str]  # committed (or 201) mail never received
    stray: set[str]  # received, but no outbox row has this Message-ID
    duplicate_ids: set[str]
    duplicates: int  # copies beyond the first
    nonidentical: set[str]  # duplicates whose copies differ in a byte
    unexplained: set[str]  # duplicates whose history shows no abandoned or lease-lost attempt
    orphan_users: int  # users without their mail
    orphan_mails: int  # mail without its user
    missing_201: int  # 201 answers whose user row or outbox row does not exist
    in_doubt: int  # requests without an answer
    in_doubt_committed: int  # ... whose registration committed anyway
    holder_violations: list[str]  # rows whose final outcome was not recorded once, by the holder
    attempts: Counter[str]  # outcome -> count in outbox_attempts
    lease_lost: int
    lost_lease_sends: int  # sends started after the row had been reclaimed from the sender
    max_attempts: int
    latencies: list[float]  # 201 -> first copy received, seconds
    throughput: float  # distinct mails received per second, first request -> last mail
    worst_window: float | None  # the fewest mails received per second in a 5 s window under load
    abandoned_by: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    def latency(self, q: float) -> float | None:
        return _percentile(self.latencies, q)


class Rig:
    """Everything one scenario runs, and the checks at its end."""

    def __init__(self, pg: ChaosPostgres, database: str, procs: Processes, scenario: str) -> None:
        self.pg = pg
        self.database = database
        self.database_url = pg.url(database)
        self.procs = procs
        self.scenario = scenario
        self.db = Db(self.database_url)
        self.mailbox = Mailbox()
        self.smtps: list[ChaosSmtp] = []
        self.api: Proc | None = None
        self.api_port = free_port()
        self.dispatchers: dict[str, Proc] = {}
        self._names = itertools.count(1)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    # --- SMTP ------------------------------------------------------------------------------

    def smtp(
        self,
        delay: float = 0.05,
        label: str | None = None,
        reply_delay: float = 0.0,
        smtputf8: bool = False,
    ) -> ChaosSmtp:
        label = label or f"smtp{len(self.smtps) + 1}"
        server = ChaosSmtp(
            self.mailbox, label, delay=delay, reply_delay=reply_delay, smtputf8=smtputf8
        )
        server.up()
        self.smtps.append(server)
        return server

    # --- API -------------------------------------------------------------------------------

    async def start_api(self, **env: str) -> Proc:
        environ = clean_environ(DATABASE_URL=self.database_url, **env)
        args = ["api", "--port", str(self.api_port)]
        self.api = self.procs.spawn("api", f"{self.scenario}-api", args, environ)
        await self.wait_api()
        return self.api

    async def wait_api(self, timeout: float = 30.0) -> None:
        assert self.api is not None
        api = self.api

        async def ready() -> bool:
            assert api.alive, f"the API exited:\n{api.tail()}"
            try:
                async with httpx.AsyncClient(timeout=2) as client:
                    response = await client.get(f"{self.api_url}/readyz")
            except httpx.HTTPError:
                return False
            return response.status_code == 200

        await wait_until(ready, timeout=timeout, interval=0.1, what="the API to be ready")

    # --- dispatchers -----------------------------------------------------------------------

    def dispatcher_env(self, smtp: ChaosSmtp, **env: str) -> dict[str, str]:
        return clean_environ(
            DATABASE_URL=self.database_url,
            SMTP_HOST="127.0.0.1",
            SMTP_PORT=str(smtp.port),
            SMTP_SECURITY="none",
            **{**LIVENESS, **RETRIES, **env},
        )

    def spawn_dispatcher(
        self, smtp: ChaosSmtp | None = None, name: str | None = None, **env: str
    ) -> Proc:
        """Start a dispatcher process (without waiting for it to register)."""
        server = smtp or self.smtps[0]
        name = name or f"{self.scenario}-d{next(self._names)}"
        proc = self.procs.spawn(
            "dispatcher", name, ["dispatcher", "--name", name], self.dispatcher_env(server, **env)
        )
        self.dispatchers[name] = proc
        return proc

    async def start_dispatchers(
        self, count: int, servers: list[ChaosSmtp] | None = None, **env: str
    ) -> list[Proc]:
        """Start ``count`` dispatchers, spread over ``servers`` (default: all of them)."""
        servers = servers or self.smtps
        procs = [self.spawn_dispatcher(servers[i % len(servers)], **env) for i in range(count)]
        await asyncio.gather(*(self.wait_registered(p) for p in procs))
        return procs

    async def wait_registered(self, proc: Proc, timeout: float = 30.0) -> None:
        async def registered() -> bool:
            assert proc.alive, f"dispatcher {proc.name} exited:\n{proc.tail()}"
            return bool(
                await self.db.fetchval(
                    "SELECT count(*) FROM dispatchers WHERE name = $1", proc.name
                )
            )

        await wait_until(registered, timeout=timeout, interval=0.1, what=f"{proc.name} to start")

    async def registered(self) -> list[Proc]:
        """Running, unfrozen dispatchers that have registered."""
        rows = await self.db.fetch("SELECT name FROM dispatchers")
        names = {r["name"] for r in rows}
        return [p for n, p in self.dispatchers.items() if n in names and p.alive and not p.frozen]

    async def backends_gone(self, name: str, timeout: float = 10.0) -> None:
        """Wait until PostgreSQL has no session of dispatcher ``name`` left."""

        async def gone() -> bool:
            return not await self.db.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = ANY($1)",
                [f"outbox-dispatcher:{name}"[:63], f"outbox-listener:{name}"[:63]],
            )

        await wait_until(gone, timeout=timeout, interval=0.02, what=f"{name}'s sessions to end")

    async def leased_by(self, name: str) -> set[int]:
        rows = await self.db.fetch(
            "SELECT id FROM outbox WHERE status = 'sending' AND lease_owner = $1", name
        )
        return {r["id"] for r in rows}

    async def terminate(self, proc: Proc, timeout: float = 60.0) -> int:
        """SIGTERM and wait for the exit code."""
        proc.signal(signal.SIGTERM)
        return await asyncio.to_thread(proc.popen.wait, timeout)

    async def stop_all(self) -> dict[str, int]:
        """SIGTERM every running process (continuing frozen ones); their exit problems.

        Returns ``{name: exit code}`` for each process that did not stop cleanly: after a
        graceful stop every process, the API included, exits 0.
        """
        running = self.procs.running()
        for proc in running:
            if proc.frozen:
                proc.thaw()
            proc.signal(signal.SIGTERM)
        codes = await asyncio.gather(*(asyncio.to_thread(p.popen.wait, 60) for p in running))
        problems = {}
        for proc, code in zip(running, codes, strict=True):
            if code != 0:
                problems[proc.name] = code
        return problems

    # --- progress --------------------------------------------------------------------------

    async def unfinished(self) -> int:
        return int(
            await self.db.fetchval(
                "SELECT count(*) FROM outbox WHERE status IN ('pending', 'sending')"
            )
        )

    async def drain(self, timeout: float = 60.0) -> float:
        """Wait until no mail is pending or being sent; return how long that took."""

        async def drained() -> bool:
            return await self.unfinished() == 0

        return await wait_until(drained, timeout=timeout, interval=0.2, what="the outbox to drain")

    _SESSIONS = (
        "FROM pg_stat_activity WHERE datname = current_database() AND "
        "(application_name LIKE 'outbox-dispatcher:%' OR application_name LIKE 'outbox-listener:%')"
    )

    async def wait_for_sessions(self, count: int, timeout: float = 30.0) -> None:
        """Wait until ``count`` dispatcher and listener sessions are connected (after a
        restart, listeners come back only when their next probe notices the loss)."""
        deadline = time.monotonic() + timeout
        while await self.db.fetchval(f"SELECT count(*) {self._SESSIONS}") < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"fewer than {count} dispatcher sessions after {timeout}s")
            await asyncio.sleep(0.1)

    async def terminate_backends(self) -> int:
        """pg_terminate_backend on every dispatcher and listener session of this database."""
        rows = await self.db.fetch(f"SELECT pg_terminate_backend(pid) AS ok {self._SESSIONS}")
        return sum(1 for r in rows if r["ok"])

    # --- the reckoning ---------------------------------------------------------------------

    async def reconcile(self, load: Load) -> Ledger:
        # Addresses are compared by mailbox (users.email_key, the key that makes them unique).
        users = await self.db.fetch("SELECT id, email_key AS email FROM users")
        outbox = await self.db.fetch(
            "SELECT id, message_id, recipient, status, attempts, sent_at FROM outbox"
        )
        attempts = await self.db.fetch(
            "SELECT outbox_id, attempt, dispatcher, outcome, lease_lost, started_at, "
            "finished_at FROM outbox_attempts ORDER BY id"
        )
        deliveries = self.mailbox.snapshot()

        emails = {r["email"] for r in users}
        by_id = {r["id"]: r for r in outbox}
        by_message = {r["message_id"]: r for r in outbox}
        recipients = {mailbox_key(r["recipient"]) for r in outbox}
        received = Counter(d.message_id for d in deliveries)
        first_at: dict[str, float] = {}
        digests: dict[str, set[str]] = defaultdict(set)
        for d in deliveries:
            first_at.setdefault(d.message_id, d.at)
            digests[d.message_id].add(d.digest)

        history: dict[int, list[asyncpg.Record]] = defaultdict(list)
        for a in attempts:
            history[a["outbox_id"]].append(a)

        created = load.created
        lost = {m for m in by_message if m not in received}
        lost |= {r.message_id for r in created if r.message_id not in received}
        lost.discard(None)  # type: ignore[arg-type]
        stray = {m for m in received if m not in by_message}
        duplicate_ids = {m for m, n in received.items() if n > 1}
        unexplained = set()
        for m in duplicate_ids:
            row = by_message.get(m)
            trail = history.get(row["id"], []) if row else []
            if not any(a["outcome"] == "abandoned" or a["lease_lost"] for a in trail):
                unexplained.add(m)

        missing_201 = 0
        for r in created:
            row = by_id.get(r.outbox_id)  # type: ignore[arg-type]
            if row is None or row["message_id"] != r.message_id or email_key(r.email) not in emails:
                missing_201 += 1
        unanswered = [r for r in load.requests if r.status is None]

        holder_violations = []
        lost_lease_sends = 0
        for row in outbox:
            trail = history.get(row["id"], [])
            held = [a for a in trail if a["outcome"] == "sent" and not a["lease_lost"]]
            if row["status"] == "sent" and (
                len(held) != 1 or held[0]["finished_at"] != row["sent_at"]
            ):
                holder_violations.append(f"outbox {row['id']}: {[dict(a) for a in trail]}")
            for a in trail:
                if a["lease_lost"] and any(
                    b["outcome"] == "abandoned"
                    and b["dispatcher"] == a["dispatcher"]
                    and b["finished_at"] < a["started_at"]
                    for b in trail
                ):
                    lost_lease_sends += 1

        abandoned_by: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for a in attempts:
            if a["outcome"] == "abandoned":
                abandoned_by[a["dispatcher"]].append((a["outbox_id"], a["finished_at"].timestamp()))

        latencies = [
            first_at[r.message_id] - r.done_at
            for r in created
            if r.message_id in first_at and r.done_at is not None
        ]
        ours = [t for m, t in first_at.items() if m in by_message]
        span = (max(ours) - load.started_at) if ours else 0.0
        windows = Counter(
            int((t - load.started_at) // WINDOW)
            for t in ours
            if load.started_at <= t < load.stopped_at
        )
        full = int((load.stopped_at - load.started_at) // WINDOW)
        return Ledger(
            requests=len(load.requests),
            created=len(created),
            http_status=Counter(r.status for r in load.requests),
            committed=len(users),
            outbox_rows=len(outbox),
            status=Counter(r["status"] for r in outbox),
            delivered=sum(1 for m in received if m in by_message),
            copies=len(deliveries),
            lost=lost,
            stray=stray,
            duplicate_ids=duplicate_ids,
            duplicates=sum(n - 1 for n in received.values()),
            nonidentical={m for m in duplicate_ids if len(digests[m]) > 1},
            unexplained=unexplained,
            orphan_users=len(emails - recipients),
            orphan_mails=len(recipients - emails),
            missing_201=missing_201,
            in_doubt=len(unanswered),
            in_doubt_committed=sum(1 for r in unanswered if email_key(r.email) in emails),
            holder_violations=holder_violations,
            attempts=Counter(a["outcome"] for a in attempts),
            lease_lost=sum(1 for a in attempts if a["lease_lost"]),
            lost_lease_sends=lost_lease_sends,
            max_attempts=max((r["attempts"] for r in outbox), default=0),
            latencies=latencies,
            throughput=len(ours) / span if span > 0 else 0.0,
            worst_window=min((windows[i] / WINDOW for i in range(full)), default=None),
            abandoned_by=dict(abandoned_by),
        )

    async def close(self) -> None:
        self.procs.cleanup()
        for server in self.smtps:
            server.down()
        await self.db.close()


def log_dir(base: Path, scenario: str) -> Path:
    return base / scenario
