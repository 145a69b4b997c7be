"""An embedded PostgreSQL server from the ``pgserver`` wheel's binaries.

Used by ``outbox dev`` (data kept in a project-local folder and reused), by the tests and
by the benchmarks. The server listens on 127.0.0.1 only, on a free port, and is started
and stopped with ``pg_ctl``; as root it runs as an unprivileged ``pgserver`` user,
because PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

SERVICE_USER = "pgserver"


def _bin_dir() -> Path:
    # Located without importing pgserver: its import has side effects we do not need.
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the pgserver package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def free_port(preferred: int | None = None) -> int:
    """Return ``preferred`` if it is free on 127.0.0.1, else any free port."""
    for candidate in ([preferred] if preferred else []) + [0]:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            port: int = sock.getsockname()[1]
            return port
    raise RuntimeError("no free TCP port on 127.0.0.1")


@dataclass
class EmbeddedPostgres:
    """A PostgreSQL cluster in ``root / "pgdata"``, controlled with pg_ctl."""

    root: Path
    #: Extra server settings, e.g. {"fsync": "off"} for throwaway test clusters.
    settings: dict[str, str] = field(default_factory=dict)
    port: int = 0
    #: True once :meth:`start` started the server itself (not adopting a running one).
    started: bool = False

    @property
    def pgdata(self) -> Path:
        return self.root / "pgdata"

    @property
    def logfile(self) -> Path:
        return self.root / "postgres.log"

    def url(self, database: str = "postgres") -> str:
        """The connection URL for ``database``."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        if os.geteuid() == 0:
            # The service user's own group too: keeping root's group would make a root-owned
            # parent folder's (empty) group bits apply instead of its "others" traverse bit.
            entry = pwd.getpwnam(SERVICE_USER)
            return subprocess.run(
                [str(_bin_dir() / tool), *args],
                check=check,
                capture_output=True,
                text=True,
                user=entry.pw_uid,
                group=entry.pw_gid,
                extra_groups=[],
                timeout=120,
            )
        return subprocess.run(
            [str(_bin_dir() / tool), *args],
            check=check,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def _prepare_root(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            return
        try:
            pwd.getpwnam(SERVICE_USER)
        except KeyError:
            useradd = shutil.which("useradd") or "/usr/sbin/useradd"
            subprocess.run(
                [
                    useradd,
                    "--system",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    SERVICE_USER,
                ],
                check=True,
            )
        entry = pwd.getpwnam(SERVICE_USER)
        # The service user must be able to traverse every folder above the data folder.
        for path in reversed(self.root.resolve().parents):
            mode = path.stat().st_mode
            if not mode & 0o001:
                path.chmod(mode | 0o001)
        for path in (self.root, *(p for p in (self.pgdata, self.logfile) if p.exists())):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        self.root.chmod(0o755)

    def running(self) -> bool:
        """True if a postmaster is running on this data folder.

        What ``pg_ctl status`` checks (the pid file names a live process), read by this
        process: as root, the service user may have lost its way to the folder meanwhile
        (a parent's permissions reset), which must not make a live server look gone.
        """
        try:
            pid = int((self.pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # alive, and another user's
            return True
        return True

    def running_port(self) -> int | None:
        """The port of the running postmaster, from its pid file."""
        pidfile = self.pgdata / "postmaster.pid"
        try:
            lines = pidfile.read_text().splitlines()
        except (FileNotFoundError, PermissionError):
            return None
        return int(lines[3]) if len(lines) > 3 else None

    def start(self) -> str:
        """Initialise the cluster if needed, start it (or adopt a running one), return its URL."""
        self._prepare_root()
        if not (self.pgdata / "PG_VERSION").exists():
            self._run(
                "initdb",
                "-D",
                str(self.pgdata),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
            )
        if self.running():  # adopted: whoever started it stops it
            self.port = self.running_port() or self.port
            return self.url()
        port_file = self.root / "port"
        preferred = int(port_file.read_text()) if port_file.exists() else None
        self.port = self.port or free_port(preferred)
        options = [f"-p {self.port}", "-h 127.0.0.1", "-k ''"]
        options += [f"-c {key}={value}" for key, value in self.settings.items()]
        result = self._run(
            "pg_ctl",
            "start",
            "-w",
            "-t",
            "60",
            "-D",
            str(self.pgdata),
            "-l",
            str(self.logfile),
            "-o",
            " ".join(options),
            check=False,
        )
        if result.returncode != 0:
            tail = self.logfile.read_text()[-2000:] if self.logfile.exists() else ""
            raise RuntimeError(f"PostgreSQL did not start: {result.stderr.strip()}\n{tail}")
        port_file.write_text(str(self.port))
        self.started = True
        return self.url()

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast`` rolls back open transactions; ``immediate`` is a crash)."""
        if self.running():
            self._prepare_root()  # the service user must still reach the folder
            self._run("pg_ctl", "stop", "-w", "-t", "60", "-m", mode, "-D", str(self.pgdata))

    def restart(self, mode: str = "fast") -> None:
        """Stop and start again on the same port."""
        self.stop(mode)
        self.start()

    def create_database(self, name: str, template: str | None = None) -> str:
        """CREATE DATABASE (optionally from a template) and return its URL."""
        args = ["-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"]
        if template:
            args += ["-T", template]
        self._run("createdb", *args, name)
        return self.url(name)
