"""``outbox dev`` end to end: zero set-up, real mail delivered, clean Ctrl-C, data reused.

Runs the real console script in an empty folder with no DATABASE_URL or SMTP settings, the
way a newcomer does after cloning the repository.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from email import message_from_bytes, policy
from pathlib import Path
from typing import TypeVar

import httpx

from outbox.cli.embedded_pg import EmbeddedPostgres, free_port
from tests.dispatching import ROOT

OUTBOX = str(Path(sys.executable).with_name("outbox"))
T = TypeVar("T")


def _env() -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.upper().startswith(("DATABASE_", "SMTP_", "MAIL_", "ADMIN_", "DISPATCHER_"))
        and key.upper() != "OUTBOX_DATA_DIR"
    }
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _poll(what: str, check: Callable[[], T | None], timeout: float) -> T:
    """Call ``check`` until it returns something other than None, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        found[int(entry.name)] = (ppid, cmdline)
    return found


def _descendants(root: int) -> dict[int, str | None]:
    """Every descendant of ``root`` with its start time (to tell a reused pid apart)."""
    processes = _processes()
    result: dict[int, str | None] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _) in processes.items():
            if ppid == parent and pid not in result:
                result[pid] = _start_time(pid)
                frontier.append(pid)
    return result


def _mentioning(text: str) -> list[str]:
    return [f"{pid}: {cmd}" for pid, (_, cmd) in _processes().items() if text in cmd]


@contextmanager
def _dev(cwd: Path, data: Path, port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``outbox dev`` as its own process group, like a terminal's foreground job."""
    with log.open("ab") as out:
        process = subprocess.Popen(
            [OUTBOX, "dev", "--port", str(port), "--data-dir", str(data)],
            cwd=cwd,
            env=_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        if process.poll() is None:  # the test failed half-way: leave nothing behind
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _wait_healthy(http: httpx.Client, process: subprocess.Popen[bytes], log: Path) -> None:
    def healthy() -> bool | None:
        if process.poll() is not None:
            raise AssertionError(f"outbox dev exited with {process.returncode}:\n{log.read_text()}")
        try:
            return http.get("/healthz").status_code == 200 or None
        except httpx.TransportError:
            return None

    _poll("GET /healthz", healthy, timeout=90)


def _wait_for_mail(mail_dir: Path, message_id: str) -> bytes:
    def delivered() -> bytes | None:
        for path in mail_dir.glob("*.eml") if mail_dir.is_dir() else []:
            content = path.read_bytes()
            if message_id.encode() in content:
                return content
        return None

    return _poll(f"an .eml file with {message_id} in {mail_dir}", delivered, timeout=60)


def _ctrl_c(process: subprocess.Popen[bytes], log: Path) -> None:
    """Ctrl-C: SIGINT to the foreground process group; everything stops, exit status 0."""
    descendants = _descendants(process.pid)
    assert descendants, "outbox dev should run the API and the dispatcher as child processes"
    os.killpg(process.pid, signal.SIGINT)
    try:
        code = process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"outbox dev did not stop within 60 s:\n{log.read_text()}") from None
    assert code == 0, log.read_text()[-3000:]

    def all_gone() -> bool | None:
        alive = [pid for pid, started in descendants.items() if _start_time(pid) == started]
        return not alive or None

    _poll(f"the children {sorted(descendants)} to exit", all_gone, timeout=10)


def _assert_no_orphans(data: Path) -> None:
    # The embedded PostgreSQL (started with pg_ctl, so not a descendant) included.
    def none_left() -> bool | None:
        return not _mentioning(str(data)) or None

    try:
        _poll(f"no process mentioning {data}", none_left, timeout=10)
    except AssertionError:
        raise AssertionError(f"processes left behind: {_mentioning(str(data))}") from None


def test_outbox_dev_end_to_end(tmp_path: Path) -> None:
    cwd = tmp_path / "project"
    cwd.mkdir()
    data = cwd / "data"
    log = tmp_path / "dev.log"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    ada = {"email": "ada@example.com", "name": "Ada Lovelace"}

    # First run: starts everything from nothing.
    with _dev(cwd, data, port, log) as process, httpx.Client(base_url=base, timeout=10) as http:
        _wait_healthy(http, process, log)
        assert http.get("/readyz").status_code == 200
        response = http.post("/register", json=ada)
        assert response.status_code == 201, response.text
        registered = response.json()

        # The dispatcher delivers it to the local sink, which stores it as a file.
        content = _wait_for_mail(data / "mail", registered["message_id"])
        message = message_from_bytes(content, policy=policy.default)
        assert message["Message-ID"] == registered["message_id"]
        assert message["To"].addresses[0].addr_spec == "ada@example.com"
        assert "Ada Lovelace" in message["Subject"]
        _ctrl_c(process, log)
    _assert_no_orphans(data)
    # Nothing written outside the data folder (logs went to our own file elsewhere).
    assert sorted(os.listdir(cwd)) == ["data"]
    assert (data / "postgres").is_dir()

    # Second run: the same data, so Ada is still registered.
    with _dev(cwd, data, port, log) as process, httpx.Client(base_url=base, timeout=10) as http:
        _wait_healthy(http, process, log)
        again = http.post("/register", json=ada)
        assert again.status_code == 409, again.text
        response = http.post("/register", json={"email": "bob@example.com", "name": "Bob"})
        assert response.status_code == 201, response.text
        assert response.json()["id"] > registered["id"]
        _wait_for_mail(data / "mail", response.json()["message_id"])

        # Without DATABASE_URL, the audit commands find the running dev database.
        env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
        status = subprocess.run(
            [sys.executable, "-m", "outbox.cli.main", "list", "--json"],
            cwd=ROOT,
            env={**env, "OUTBOX_DATA_DIR": str(data)},
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert status.returncode == 0, status.stderr
        assert "using the outbox dev database" in status.stderr
        assert {"ada@example.com", "bob@example.com"} <= {
            item["recipient"] for item in json.loads(status.stdout)["items"]
        }
        _ctrl_c(process, log)
    _assert_no_orphans(data)
    assert sorted(os.listdir(cwd)) == ["data"]


def _outbox_dev(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [OUTBOX, "dev", *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_outbox_dev_guards_its_data_and_its_port(tmp_path: Path) -> None:
    cwd = tmp_path / "project"
    cwd.mkdir()
    data = cwd / "data"
    log = tmp_path / "dev.log"
    port = free_port()
    # A PostgreSQL that `outbox dev` did not start: it uses it, and never stops it.
    pg = EmbeddedPostgres(data / "postgres")
    pg.start()
    try:
        with (
            _dev(cwd, data, port, log) as first,
            httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http,
        ):
            _poll("the banner", lambda: "outbox dev is running" in log.read_text() or None, 90)
            # The banner comes once the API listens: it answers at once, no retry needed.
            assert http.get("/healthz").status_code == 200
            text = log.read_text()
            assert text.index("Uvicorn running on") < text.index("outbox dev is running")
            # Readable console logs, not JSON, under `outbox dev`.
            started = next(line for line in text.splitlines() if "dispatcher.started" in line)
            assert not started.startswith("{") and " INFO " in started

            # A second instance on the same data: one line, status 2, the first untouched.
            second = _outbox_dev("--port", str(free_port()), "--data-dir", str(data), cwd=cwd)
            assert second.returncode == 2, second.stderr
            assert second.stderr.strip().splitlines() == [
                f"outbox dev: already running at http://127.0.0.1:{port}, pid {first.pid} "
                f"(data in {data}); stop it first, or use another --data-dir"
            ]
            assert first.poll() is None and pg.running()
            assert http.get("/readyz").status_code == 200

            # The port taken: named with the flag that changes it, before anything starts.
            other = tmp_path / "other"
            taken = _outbox_dev("--port", str(port), "--data-dir", str(other), cwd=cwd)
            assert taken.returncode == 2, taken.stderr
            [line] = taken.stderr.strip().splitlines()
            assert line.startswith(f"outbox dev: port {port} on 127.0.0.1 is already in use")
            assert "choose another with --port" in line
            assert not (other / "postgres").exists()
            assert "Traceback" not in second.stderr + taken.stderr

            _ctrl_c(first, log)
        assert pg.running(), "outbox dev stopped a PostgreSQL it did not start"
    finally:
        pg.stop()
