"""``outbox api`` as a real process for tests: started on a free port, waited for, killed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from outbox.cli.embedded_pg import free_port
from tests.dispatching import ROOT


@dataclass
class Api:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text()

    def events(self, name: str) -> list[dict[str, object]]:
        found = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                entry = json.loads(line)
                if entry.get("event") == name:
                    found.append(entry)
        return found


def poll(what: str, check: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


@contextmanager
def api(database_url: str, *, ready: str = "/healthz", **settings: str) -> Iterator[Api]:
    """Run ``outbox api`` (with extra environment ``settings``, e.g. ``ADMIN_TOKEN``) until
    the block ends; wait until ``ready`` answers 200."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOG_", "ADMIN_"))}
    env["DATABASE_URL"] = database_url
    env.update(settings)
    with tempfile.NamedTemporaryFile(prefix="api-", suffix=".log", delete=False) as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "outbox.cli.main", "api", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    running = Api(f"http://127.0.0.1:{port}", proc, Path(log.name))

    def healthy() -> bool:
        assert proc.poll() is None, running.log()
        try:
            return httpx.get(f"{running.url}{ready}", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        poll(f"GET {ready}", healthy)
        yield running
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        running.log_path.unlink(missing_ok=True)
