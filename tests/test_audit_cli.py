"""The ``outbox`` audit and operations commands, run as real processes against a real database."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest

from outbox.cli.embedded_pg import free_port
from outbox.cli.main import build_parser
from outbox.dispatcher import queries
from tests.audit_seed import add_attempt, add_mail, live_dispatcher, statuses

DAY = timedelta(days=1)


@dataclass
class Result:
    code: int
    out: str
    err: str


#: A data folder without an `outbox dev` in it: a developer's running `outbox dev` (which
#: the commands use when DATABASE_URL is unset) must not change what the tests see.
NO_DEV = str(Path(tempfile.gettempdir()) / "outbox-tests-no-dev-here")


async def outbox(*args: str, database_url: str | None, **extra_env: str) -> Result:
    """Run ``outbox ARGS`` (python -m cli.main) with DATABASE_URL, return code and output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "SMTP_"))}
    env["OUTBOX_DATA_DIR"] = NO_DEV
    env.update(extra_env)
    if database_url is not None:
        env["DATABASE_URL"] = database_url
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cli.main",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    result = Result(proc.returncode, out.decode(), err.decode())
    assert "Traceback" not in result.err, result.err
    return result


# --- status ---------------------------------------------------------------------------------


async def test_status(database_url: str, db: asyncpg.Pool) -> None:
    await add_mail(db, age=timedelta(minutes=7))
    await add_mail(db, status="sent")
    await add_mail(db, status="sent")
    failed = await add_mail(db, status="failed")
    await add_attempt(db, failed, 1, "failed", smtp_code=550)
    await db.execute("INSERT INTO dispatchers (name, hostname, pid) VALUES ('d-1', 'box', 42)")

    text = await outbox("status", database_url=database_url)
    assert text.code == 0, text.err
    lines = {line.split()[0]: line for line in text.out.splitlines() if line.startswith("  ")}
    assert lines["pending"].split()[1] == "1"
    assert "oldest due for 7m" in lines["pending"]
    assert lines["sent"].split()[1] == "2"
    assert lines["failed"].split()[1] == "1"
    assert "1 failed" in text.out
    assert "dispatchers: 1 live" in text.out
    assert "d-1" in text.out and "box" in text.out

    as_json = await outbox("status", "--json", database_url=database_url)
    body = json.loads(as_json.out)
    assert body["queue"]["counts"] == {
        "pending": 1,
        "sending": 0,
        "sent": 2,
        "failed": 1,
        "cancelled": 0,
        "suppressed": 0,
    }
    assert body["queue"]["oldest_due_pending_seconds"] >= 420
    assert body["dispatchers"][0]["name"] == "d-1" and body["dispatchers"][0]["live"]
    assert body["failures_last_hour"]["failed"] == 1


# --- list and show --------------------------------------------------------------------------


async def test_list_table_filters_and_json(database_url: str, db: asyncpg.Pool) -> None:
    ada = await add_mail(db, "Ada@Example.com", subject="Hi Ada")
    bob = await add_mail(db, "bob@example.com", status="failed")
    old = await add_mail(db, "ada@example.com", status="sent", age=3 * DAY)

    table = await outbox("list", database_url=database_url)
    assert table.code == 0, table.err
    rows = table.out.splitlines()
    assert rows[0].split()[:3] == ["ID", "STATUS", "ATT"]
    assert [int(r.split()[0]) for r in rows[1:]] == [old, bob, ada]
    assert "550 5.1.1 no such user" in table.out

    by_recipient = await outbox(
        "list", "--recipient", "ADA@example.com", "--json", database_url=database_url
    )
    body = json.loads(by_recipient.out)
    assert [item["id"] for item in body["items"]] == [old, ada]
    assert body["next"] is None

    failed = await outbox("list", "--status", "failed", "--json", database_url=database_url)
    assert [item["id"] for item in json.loads(failed.out)["items"]] == [bob]

    recent = await outbox("list", "--since", "1d", "--json", database_url=database_url)
    assert [item["id"] for item in json.loads(recent.out)["items"]] == [bob, ada]
    older = await outbox("list", "--until", "2d", "--json", database_url=database_url)
    assert [item["id"] for item in json.loads(older.out)["items"]] == [old]

    none = await outbox("list", "--status", "cancelled", database_url=database_url)
    assert none.code == 0 and none.out == "" and "no mail matches" in none.err


async def test_stored_text_on_a_terminal_that_is_not_utf8(
    database_url: str, db: asyncpg.Pool
) -> None:
    # A name and an address the output's encoding cannot hold are escaped, never a
    # traceback (they were, in list, show, suppressions and suppress); JSON stays JSON.
    ascii_out = {"PYTHONIOENCODING": "ascii"}
    mail = await add_mail(db, "jörg@bücher.de", name="Zoë 😀")
    table = await outbox("list", database_url=database_url, **ascii_out)
    assert table.code == 0, table.err
    assert "j\\xf6rg@b\\xfccher.de" in table.out
    listed = await outbox("list", "--json", database_url=database_url, **ascii_out)
    assert listed.out.isascii()
    [item] = json.loads(listed.out)["items"]
    assert (item["id"], item["recipient"]) == (mail, "jörg@bücher.de")
    shown = await outbox("show", str(mail), database_url=database_url, **ascii_out)
    assert shown.code == 0 and "Zo\\xeb \\U0001f600" in shown.out
    shown_json = await outbox("show", str(mail), "--json", database_url=database_url, **ascii_out)
    assert json.loads(shown_json.out)["row"]["recipient_name"] == "Zoë 😀"
    suppressed = await outbox("suppress", "jörg@bücher.de", database_url=database_url, **ascii_out)
    assert suppressed.code == 0, suppressed.err
    listing = await outbox("suppressions", database_url=database_url, **ascii_out)
    assert listing.code == 0 and "j\\xf6rg@b\\xfccher.de" in listing.out


async def test_list_pagination(database_url: str, db: asyncpg.Pool) -> None:
    created = [await add_mail(db, f"u{i}@example.com") for i in range(5)]

    first = await outbox("list", "--limit", "2", "--json", database_url=database_url)
    page = json.loads(first.out)
    assert [i["id"] for i in page["items"]] == created[:-3:-1]
    second = await outbox(
        "list", "--limit", "2", "--before", str(page["next"]), database_url=database_url
    )
    assert [int(r.split()[0]) for r in second.out.splitlines()[1:]] == [created[2], created[1]]
    assert f"--before {created[1]}" in second.err
    last = await outbox(
        "list", "--limit", "2", "--before", str(created[1]), "--json", database_url=database_url
    )
    last_page = json.loads(last.out)
    assert [i["id"] for i in last_page["items"]] == [created[0]]
    assert last_page["next"] is None
    exact = await outbox("list", "--limit", "5", database_url=database_url)
    assert "--before" not in exact.err


async def test_show(database_url: str, db: asyncpg.Pool) -> None:
    mail = await add_mail(db, "ada@example.com", name="Ada Lovelace", status="failed")
    await add_attempt(db, mail, 1, "deferred", smtp_code=451, reply="greylisted\x1b[2J")
    await add_attempt(db, mail, 2, "failed", smtp_code=550, reply="no such user")

    text = await outbox("show", str(mail), database_url=database_url)
    assert text.code == 0, text.err
    assert "To: Ada Lovelace <ada@example.com>" in text.out
    assert "Message-ID: <" in text.out
    assert "greylisted" in text.out and "\x1b" not in text.out  # no terminal escapes
    assert "attempts (2):" in text.out
    assert "| Hello Ada Lovelace" in text.out

    as_json = json.loads((await outbox("show", str(mail), "--json", database_url=database_url)).out)
    assert as_json["row"]["status"] == "failed"
    assert [a["outcome"] for a in as_json["history"]] == ["deferred", "failed"]
    assert ["To", "Ada Lovelace <ada@example.com>"] in as_json["headers"]

    missing = await outbox("show", "999", database_url=database_url)
    assert missing.code == 1
    assert missing.err.strip() == "outbox show: no mail with id 999"


# --- retry, cancel, prune -------------------------------------------------------------------


async def test_retry_ids(database_url: str, db: asyncpg.Pool) -> None:
    failed = await add_mail(db, status="failed")
    sent = await add_mail(db, status="sent")

    result = await outbox("retry", str(failed), database_url=database_url)
    assert result.code == 0, result.err
    assert result.out.strip() == f"retried: {failed}"
    claimed = await db.fetch(queries.CLAIM, 10, "cli-test", 60.0, 10.0, 5)
    assert [r["id"] for r in claimed] == [failed]

    refused = await outbox("retry", str(sent), "777", database_url=database_url)
    assert refused.code == 1
    assert f"outbox retry: {sent}: already sent" in refused.err
    assert "outbox retry: 777: no such mail" in refused.err


async def test_retry_all_failed_shows_progress(database_url: str, db: asyncpg.Pool) -> None:
    failed = [await add_mail(db, status="failed") for _ in range(5)]
    sent = await add_mail(db, status="sent")

    result = await outbox("retry", "--all-failed", "--batch-size", "2", database_url=database_url)

    assert result.code == 0, result.err
    assert result.out.strip() == "retried 5 failed mails"
    assert "retry: 2 failed mails queued again" in result.err  # the first batch
    assert "retry: 5 failed mails queued again" in result.err  # the last one
    after = await statuses(db)
    assert all(after[i] == "pending" for i in failed) and after[sent] == "sent"


async def test_cancel(database_url: str, db: asyncpg.Pool) -> None:
    pending = await add_mail(db)
    sending = await add_mail(db, status="sending")
    await live_dispatcher(db)  # its dispatcher is alive: the row cannot be recalled

    result = await outbox("cancel", str(pending), str(sending), database_url=database_url)

    assert result.code == 1
    assert result.out.strip() == f"cancelled: {pending}"
    assert f"{sending}: being sent right now and cannot be recalled" in result.err
    assert await statuses(db) == {pending: "cancelled", sending: "sending"}


async def test_prune(database_url: str, db: asyncpg.Pool) -> None:
    old_sent = [await add_mail(db, status="sent", age=40 * DAY) for _ in range(3)]
    await add_attempt(db, old_sent[0], 1, "sent", smtp_code=250)
    old_cancelled = await add_mail(db, status="cancelled", age=40 * DAY)
    kept = {
        await add_mail(db, status="failed", age=40 * DAY),
        await add_mail(db, age=40 * DAY),
        await add_mail(db, status="sending", age=40 * DAY),
        await add_mail(db, status="sent", age=DAY),
    }

    dry = await outbox("prune", "--older-than", "30d", "--dry-run", database_url=database_url)
    assert dry.code == 0, dry.err
    assert dry.out.startswith(
        "would delete 4 mails (sent 3, cancelled 1, suppressed 0) and 1 attempts"
    )
    assert len(await statuses(db)) == 8

    result = await outbox(
        "prune", "--older-than", "30d", "--batch-size", "1", database_url=database_url
    )
    assert result.code == 0, result.err
    assert result.out.startswith(
        "deleted 4 mails (sent 3, cancelled 1, suppressed 0) and 1 attempts"
    )
    assert "prune: 1 mails deleted" in result.err  # progress from the first batch
    assert (
        "prune: 4 mails deleted (sent 3, cancelled 1, suppressed 0), 1 attempts, 4 batches"
        in result.err
    )
    assert set(await statuses(db)) == kept
    assert old_cancelled not in await statuses(db)

    with_failed = await outbox(
        "prune", "--older-than", "30d", "--include-failed", database_url=database_url
    )
    assert "deleted 1 mails (sent 0, cancelled 0, suppressed 0, failed 1)" in with_failed.out
    assert sorted((await statuses(db)).values()) == ["pending", "sending", "sent"]


async def test_keys_in_show_list_and_prune(database_url: str, db: asyncpg.Pool) -> None:
    keyed = await add_mail(db, status="sent", age=40 * DAY, key="welcome:1")
    await add_mail(db, status="sent", key="welcome:2")
    await add_mail(db)

    shown = await outbox("show", str(keyed), database_url=database_url)
    assert "  key           welcome:1" in shown.out.splitlines()
    listed = json.loads(
        (await outbox("list", "--key", "welcome:1", "--json", database_url=database_url)).out
    )
    assert [(r["id"], r["idempotency_key"]) for r in listed["items"]] == [(keyed, "welcome:1")]

    # The mail goes after its window; its key stays, until its own (longer) one ends.
    result = await outbox("prune", "--older-than", "30d", database_url=database_url)
    assert result.out.startswith("deleted 1 mails (sent 1, cancelled 0, suppressed 0)")
    assert "idempotency keys" not in result.out
    assert await db.fetchval("SELECT count(*) FROM outbox_keys") == 2
    await db.execute("UPDATE outbox_keys SET created_at = now() - interval '500 days'")
    result = await outbox(
        "prune", "--older-than", "30d", "--keys-older-than", "400d", database_url=database_url
    )
    assert result.code == 0, result.err
    assert "deleted 1 idempotency keys made before" in result.out  # welcome:2's mail is there
    assert await db.fetchval("SELECT key FROM outbox_keys") == "welcome:2"


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["list", "--limit", "0"], "--limit"),
        (["list", "--limit", "many"], "--limit"),
        (["list", "--limit", "10001"], "--limit"),
        (["list", "--status", "lost"], "--status"),
        (["list", "--since", "yesterday"], "--since"),
        (["list", "--until", "2026-13-45"], "--until"),
        (["list", "--before", "-3"], "--before"),
        (["show", "abc"], "ID"),
        (["show"], "ID"),
        (["show", str(2**63)], "ID"),
        (["retry"], "--all-failed"),
        (["retry", "1", "--all-failed"], "--all-failed"),
        (["retry", "x"], "ID"),
        (["retry", "--all-failed", "--batch-size", "0"], "--batch-size"),
        (["cancel"], "ID"),
        (["cancel", "0"], "ID"),
        (["prune"], "--older-than"),
        (["prune", "--older-than", "30"], "--older-than"),
        (["prune", "--older-than", "forever"], "--older-than"),
        (["prune", "--older-than", "30d", "--batch-size", "-1"], "--batch-size"),
        (["prune", "--older-than", "30d", "--keys-older-than", "7d"], "--keys-older-than"),
        (["list", "--key", ""], "--key"),
        (["list", "--key", "x" * 201], "--key"),
        (["list", "--key", "a\tb"], "--key"),
        # A byte that is not UTF-8 (a lone surrogate here) was blamed on the database.
        (["list", "--recipient", "\udcff@example.com"], "--recipient"),
        (["list", "--recipient", "x" * 321], "--recipient"),
    ],
)
async def test_bad_arguments_name_the_flag(args: list[str], flag: str) -> None:
    # Parsing fails before any database is needed.
    result = await outbox(*args, database_url="postgresql://nobody@127.0.0.1:1/none")
    assert result.code == 2
    assert flag in result.err
    assert result.out == ""


@pytest.mark.parametrize(
    "args",
    [
        ["status"],
        ["list"],
        ["show", "1"],
        ["retry", "1"],
        ["retry", "--all-failed"],
        ["cancel", "1"],
        ["prune", "--older-than", "30d"],
    ],
)
async def test_unreachable_database_is_one_line_and_exit_1(args: list[str]) -> None:
    url = f"postgresql://app:secret@127.0.0.1:{free_port()}/outbox"
    result = await outbox(*args, database_url=url)
    assert result.code == 1
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert "cannot reach the database" in lines[0]
    assert "secret" not in result.err  # the password is redacted


async def test_unmigrated_database_says_to_migrate(pg_server: object) -> None:
    from tests.conftest import PgServer

    assert isinstance(pg_server, PgServer)
    result = await outbox("status", database_url=pg_server.url("postgres"))
    assert result.code == 2  # a configuration problem, not an outage
    assert "run `outbox migrate`" in result.err


async def test_missing_database_url_is_named() -> None:
    result = await outbox("status", database_url=None)
    assert result.code == 2
    assert "DATABASE_URL" in result.err


def test_every_command_is_registered() -> None:
    parser = build_parser()
    for command in (
        ["status"],
        ["list"],
        ["show", "1"],
        ["retry", "1"],
        ["cancel", "1"],
        ["prune", "--older-than", "1d"],
    ):
        assert callable(parser.parse_args(command).handler)


# --- retry --now, replies that are not errors, a closed pipe, misspellings -------------------


async def _due_now(db: asyncpg.Pool, mail: int) -> bool:
    due: bool = await db.fetchval(
        "SELECT status = 'pending' AND next_attempt_at <= now() FROM outbox WHERE id = $1", mail
    )
    return due


async def test_retry_now_makes_deferred_mail_due_at_once(
    database_url: str, db: asyncpg.Pool
) -> None:
    deferred = await add_mail(db)
    await db.execute(
        "UPDATE outbox SET next_attempt_at = now() + interval '1 hour', attempts = 2 WHERE id = $1",
        deferred,
    )
    failed = await add_mail(db, status="failed")
    sent = await add_mail(db, status="sent")

    plain = await outbox("retry", str(deferred), database_url=database_url)
    assert plain.code == 1
    assert plain.err.strip() == (
        f"outbox retry: {deferred}: already pending: it is queued and will be sent "
        "(--now makes it due at once)"
    )
    assert not await _due_now(db, deferred)

    result = await outbox(
        "retry", "--now", str(deferred), str(failed), str(sent), database_url=database_url
    )
    assert result.code == 1  # the sent one is refused
    assert result.out.strip() == f"retried: {deferred} {failed}"
    assert result.err.strip() == f"outbox retry: {sent}: already sent"
    assert await _due_now(db, deferred) and await _due_now(db, failed)
    assert await db.fetchval("SELECT attempts FROM outbox WHERE id = $1", deferred) == 2
    assert (await statuses(db))[sent] == "sent"


async def test_a_250_is_not_shown_as_an_error(database_url: str, db: asyncpg.Pool) -> None:
    sent = await add_mail(db, status="sent")  # last_smtp_code 250, no error
    failed = await add_mail(db, status="failed")

    table = await outbox("list", database_url=database_url)
    rows = {int(line.split()[0]): line for line in table.out.splitlines()[1:]}
    assert "250" not in rows[sent]
    assert rows[failed].endswith("550 550 5.1.1 no such user")

    shown = await outbox("show", str(sent), database_url=database_url)
    last_error = next(line for line in shown.out.splitlines() if "last error" in line)
    assert last_error.split() == ["last", "error", "-"]


async def test_a_closed_output_pipe_stops_quietly(database_url: str, db: asyncpg.Pool) -> None:
    for _ in range(3):
        await add_mail(db)
    read, write = os.pipe()
    os.close(read)  # like `outbox list | head -1` once head has its line
    try:
        proc = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "outbox.cli.main", "list", "--limit", "5"],
            env={**os.environ, "DATABASE_URL": database_url, "OUTBOX_DATA_DIR": NO_DEV},
            stdout=write,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write)
    assert proc.returncode == 141, proc.stderr  # 128 + SIGPIPE, like other Unix tools
    assert proc.stderr == ""


@pytest.mark.parametrize(
    ("args", "usage", "hint"),
    [
        (
            ["dispatcher", "--concurency", "4"],
            "usage: outbox dispatcher",
            "did you mean --concurrency?",
        ),
        (["list", "--limt", "3"], "usage: outbox list", "did you mean --limit?"),
        (["stauts"], "usage: outbox ", "did you mean 'status'?"),
    ],
)
async def test_misspelt_flags_and_commands_get_the_right_usage_and_a_suggestion(
    args: list[str], usage: str, hint: str
) -> None:
    result = await outbox(*args, database_url="postgresql://nobody@127.0.0.1:1/none")
    assert result.code == 2
    assert result.err.startswith(usage), result.err
    assert hint in result.err.strip().splitlines()[-1], result.err
