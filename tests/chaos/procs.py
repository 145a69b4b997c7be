"""Real processes for the chaos scenarios: ``outbox api`` and ``outbox dispatcher``.

Every process is started through a :class:`Processes` manager, which logs each one to its
own file (never to an unread pipe) and kills whatever is still running when the scenario
ends, pass or fail (stopped processes are continued first, then killed).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: Inherited settings that would change what a scenario runs against.
_SCRUBBED = re.compile(r"^(DATABASE_URL|SMTP_.*|DISPATCHER_.*|ADMIN_TOKEN|MAIL_FROM)$")

_ERROR = re.compile(r'"level": "(error|critical)"')

#: Every process started by any manager in this session (the atexit safety net).
_ALL: set[subprocess.Popen[bytes]] = set()


def _kill_leftovers() -> None:
    for popen in list(_ALL):
        if popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(popen.pid, signal.SIGCONT)
                os.kill(popen.pid, signal.SIGKILL)


atexit.register(_kill_leftovers)


def clean_environ(**env: str) -> dict[str, str]:
    """os.environ without outbox settings, plus ``env``."""
    base = {k: v for k, v in os.environ.items() if not _SCRUBBED.match(k)}
    return {**base, **env}


@dataclass
class Proc:
    """One started process."""

    kind: str  # "api" | "dispatcher"
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    started_at: float = field(default_factory=time.monotonic)
    frozen: bool = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        os.kill(self.popen.pid, signum)

    def kill(self) -> float:
        """kill -9; returns the wall-clock time of the kill once the process is gone."""
        self.signal(signal.SIGKILL)
        at = time.time()
        self.popen.wait(timeout=10)
        self.frozen = False
        return at

    def freeze(self) -> float:
        self.signal(signal.SIGSTOP)
        self.frozen = True
        return time.time()

    def thaw(self) -> float:
        self.signal(signal.SIGCONT)
        self.frozen = False
        return time.time()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])


class Processes:
    """Starts processes, remembers them, and cleans all of them up."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.all: list[Proc] = []

    def spawn(self, kind: str, name: str, args: list[str], env: dict[str, str]) -> Proc:
        log_path = self.log_dir / f"{kind}-{name}-{len(self.all)}.log"
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                [sys.executable, "-m", "outbox.cli.main", *args],
                env=env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        _ALL.add(popen)
        proc = Proc(kind, name, popen, log_path)
        self.all.append(proc)
        return proc

    def running(self, kind: str | None = None) -> list[Proc]:
        return [p for p in self.all if p.alive and (kind is None or p.kind == kind)]

    def cleanup(self) -> None:
        """Kill everything still running (continuing stopped processes first)."""
        for proc in self.all:
            if proc.alive:
                with contextlib.suppress(ProcessLookupError):
                    proc.signal(signal.SIGCONT)
                    proc.signal(signal.SIGKILL)
        for proc in self.all:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=10)
            _ALL.discard(proc.popen)

    def crashes(self) -> list[str]:
        """Error-level log lines and tracebacks: signs of a bug, not of a signal we sent."""
        found = []
        for proc in self.all:
            for line in proc.log().splitlines():
                if _ERROR.search(line) or line.startswith("Traceback"):
                    found.append(f"{proc.kind} {proc.name}: {line[:400]}")
        return found
