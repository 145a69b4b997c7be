"""``outbox limit|pause|resume|suppress|unsuppress|suppressions`` and the policy lines of
``outbox status``: real processes against a real database, read back from the tables."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import string
from collections.abc import AsyncIterator, Sequence

import asyncpg
import pytest
from hypothesis import event, given, seed
from hypothesis import strategies as st

from outbox.cli.embedded_pg import free_port
from outbox.cli.main import build_parser
from outbox.dispatcher.db import Connection
from outbox.dispatcher.policies import domain_name, remove_limits, set_limits, suppress, unsuppress
from outbox.dispatcher.policy import Rate
from tests.audit_seed import add_mail, live_dispatcher, set_status
from tests.hostile import ANY_TEXT, SEED, explain, hypothesis_settings, show_seed
from tests.test_audit_cli import Result, outbox

#: A database nobody listens on: argument errors must come before any connection.
NOWHERE = "postgresql://nobody@127.0.0.1:1/none"


@pytest.fixture(scope="module", autouse=True)
def _show_seed(request: pytest.FixtureRequest) -> None:
    show_seed(request)


async def policies(db: asyncpg.Pool) -> dict[str, dict[str, object]]:
    """outbox_policies by scope."""
    rows = await db.fetch("SELECT domain, paused, concurrency FROM outbox_policies")
    return {r["domain"]: {"paused": r["paused"], "concurrency": r["concurrency"]} for r in rows}


async def windows(db: asyncpg.Pool, domain: str) -> list[tuple[int, int, float, float]]:
    """A scope's rate windows: (per_seconds, max_count, burst, tokens)."""
    rows = await db.fetch(
        "SELECT per_seconds, max_count, burst, tokens FROM outbox_rate_limits "
        "WHERE domain = $1 ORDER BY per_seconds",
        domain,
    )
    return [(r["per_seconds"], r["max_count"], r["burst"], r["tokens"]) for r in rows]


def ok(result: Result) -> str:
    assert result.code == 0, result.err
    return result.out


# --- limit set / list / rm --------------------------------------------------------------------


async def test_limit_set_list_and_rm(database_url: str, db: asyncpg.Pool) -> None:
    out = ok(
        await outbox(
            "limit",
            "set",
            "--domain",
            "Bücher.DE",
            "--rate",
            "40/s",
            "--rate",
            "1000/h",
            "--concurrency",
            "5",
            database_url=database_url,
        )
    )
    assert out == (
        "limit set: xn--bcher-kva.de: 40/s 1000/h, concurrency 5; 0 in flight, 0 waiting\n"
    )
    assert await policies(db) == {"xn--bcher-kva.de": {"paused": False, "concurrency": 5}}
    # New windows start full: a second's worth, at least one mail.
    assert await windows(db, "xn--bcher-kva.de") == [(1, 40, 40.0, 40.0), (3600, 1000, 1.0, 1.0)]

    # New rates replace the windows; the concurrency stays. A window that stays keeps
    # what it has: no fresh burst (40 tokens, not 50).
    ok(
        await outbox(
            "limit",
            "set",
            "--domain",
            "xn--bcher-kva.de",
            "--rate",
            "50/s",
            database_url=database_url,
        )
    )
    assert await windows(db, "xn--bcher-kva.de") == [(1, 50, 50.0, 40.0)]
    assert (await policies(db))["xn--bcher-kva.de"]["concurrency"] == 5

    # All mail: a concurrency limit alone.
    ok(await outbox("limit", "set", "--concurrency", "20", database_url=database_url))
    assert (await policies(db))[""] == {"paused": False, "concurrency": 20}
    assert await windows(db, "") == []

    await add_mail(db, "ada@bücher.de")
    await add_mail(db, "bob@example.com")
    sending = await add_mail(db, "eve@BÜCHER.de", status="sending")
    await live_dispatcher(db, "worker-1")
    listed = json.loads(ok(await outbox("limit", "list", "--json", database_url=database_url)))
    assert [
        (p["domain"], p["concurrency"], p["in_flight"], p["waiting"]) for p in listed["items"]
    ] == [
        (None, 20, 1, 2),
        ("xn--bcher-kva.de", 5, 1, 1),
    ]
    assert listed["items"][1]["rates"] == [
        {"rate": "50/s", "count": 50, "per_seconds": 1, "burst": 50.0, "tokens": 50.0}
    ]
    assert listed["items"][0]["rates"] == [] and listed["items"][0]["throttle"] is None

    table = ok(await outbox("limit", "list", database_url=database_url)).splitlines()
    assert table[0].split() == [
        "SCOPE",
        "RATES",
        "CONCURRENCY",
        "PAUSED",
        "THROTTLE",
        "IN",
        "FLIGHT",
        "WAITING",
    ]
    assert table[1].split() == ["all", "mail", "-", "20", "-", "-", "1", "2"]
    assert table[2].split() == ["xn--bcher-kva.de", "50/s", "5", "-", "-", "1", "1"]
    await set_status(db, sending, "sent")

    # rm of a paused scope keeps the pause (and the row); of an empty scope, exit 1.
    ok(await outbox("pause", "--domain", "bücher.de", database_url=database_url))
    assert ok(await outbox("limit", "rm", "--domain", "BÜCHER.de", database_url=database_url)) == (
        "removed the limits of xn--bcher-kva.de\n"
    )
    assert await policies(db) == {
        "": {"paused": False, "concurrency": 20},
        "xn--bcher-kva.de": {"paused": True, "concurrency": None},
    }
    assert await windows(db, "xn--bcher-kva.de") == []
    again = await outbox("limit", "rm", "--domain", "bücher.de", database_url=database_url)
    assert again.code == 1
    assert again.err == "outbox limit rm: xn--bcher-kva.de has no limit to remove\n"
    ok(await outbox("resume", "--domain", "bücher.de", database_url=database_url))
    ok(await outbox("limit", "rm", database_url=database_url))
    assert await policies(db) == {}  # nothing left: no rows
    nothing = await outbox("limit", "rm", database_url=database_url)
    assert nothing.code == 1 and nothing.err == "outbox limit rm: all mail has no limit to remove\n"
    empty = await outbox("limit", "list", database_url=database_url)
    assert empty.code == 0 and empty.out == "" and "no limits" in empty.err


# --- pause / resume and status ----------------------------------------------------------------


async def test_pause_resume_and_status(database_url: str, db: asyncpg.Pool) -> None:
    await add_mail(db, "ada@example.com")
    ok(
        await outbox(
            "limit", "set", "--domain", "example.com", "--rate", "2/m", database_url=database_url
        )
    )

    assert ok(await outbox("pause", database_url=database_url)) == (
        "paused all mail: no dispatcher claims it until outbox resume\n"
    )
    assert ok(await outbox("pause", database_url=database_url)) == "all mail was paused already\n"
    assert ok(await outbox("pause", "--domain", "example.com", database_url=database_url)) == (
        "paused example.com: no dispatcher claims it until outbox resume --domain example.com\n"
    )
    assert await policies(db) == {
        "": {"paused": True, "concurrency": None},
        "example.com": {"paused": True, "concurrency": None},
    }
    assert await windows(db, "example.com") == [(60, 2, 1.0, 1.0)]  # the limit stays

    status = ok(await outbox("status", database_url=database_url))
    assert "  suppressed" in status
    lines = status.split("sending policy (outbox limit list):\n", 1)[1].splitlines()
    assert lines == [
        "  all mail: paused; 0 in flight, 1 waiting",
        "  example.com: paused, 2/m; 0 in flight, 1 waiting",
    ]
    body = json.loads(ok(await outbox("status", "--json", database_url=database_url)))
    assert body["queue"]["counts"]["suppressed"] == 0
    assert [(p["domain"], p["paused"]) for p in body["policies"]] == [
        (None, True),
        ("example.com", True),
    ]

    assert ok(await outbox("resume", database_url=database_url)) == "resumed all mail\n"
    assert ok(await outbox("resume", database_url=database_url)) == "all mail was not paused\n"
    ok(await outbox("resume", "--domain", "example.com", database_url=database_url))
    # All mail had nothing else: its row is gone; example.com keeps its rate.
    assert await policies(db) == {"example.com": {"paused": False, "concurrency": None}}
    status = ok(await outbox("status", database_url=database_url))
    assert "  example.com: 2/m; 0 in flight, 1 waiting" in status


async def test_a_throttled_scope(database_url: str, db: asyncpg.Pool) -> None:
    # As the dispatchers leave a scope after a 421: 2/s halved to 1/s, rising again.
    await db.execute(
        "INSERT INTO outbox_policies (domain, throttle_rate, throttle_base, throttled_at) "
        "VALUES ('example.com', 1, 2, now())"
    )
    listed = json.loads(ok(await outbox("limit", "list", "--json", database_url=database_url)))
    throttle = listed["items"][0]["throttle"]
    assert 1 <= throttle["rate"] < 1.5 and throttle["base"] == 2.0
    table = ok(await outbox("limit", "list", database_url=database_url))
    assert re.search(r"example\.com +- +- +- +1(\.\d+)?/s \(halved from 2/s at \d{4}-", table), (
        table
    )
    status = ok(await outbox("status", database_url=database_url))
    assert re.search(r"  example\.com: throttled to 1(\.\d+)?/s \(halved from 2/s at ", status), (
        status
    )
    # A throttle does not go with `limit rm`: it is the dispatchers' to lift.
    assert (
        await outbox("limit", "rm", "--domain", "example.com", database_url=database_url)
    ).code == 1
    # Once it has run its course it is shown no more.
    await db.execute("UPDATE outbox_policies SET throttled_at = now() - interval '1 hour'")
    listed = json.loads(ok(await outbox("limit", "list", "--json", database_url=database_url)))
    assert listed["items"][0]["throttle"] is None


async def test_status_counts_suppressed_mail(database_url: str, db: asyncpg.Pool) -> None:
    mail = await add_mail(db)
    await db.execute("UPDATE outbox SET status = 'suppressed' WHERE id = $1", mail)
    status = ok(await outbox("status", database_url=database_url))
    line = next(line for line in status.splitlines() if line.startswith("  suppressed"))
    assert line.split()[1] == "1"
    assert "sending policy" not in status  # no policy: no lines about it
    listed = json.loads(
        ok(await outbox("list", "--status", "suppressed", "--json", database_url=database_url))
    )
    assert [item["id"] for item in listed["items"]] == [mail]


# --- suppress / unsuppress / suppressions -----------------------------------------------------


async def test_suppress_unsuppress_and_list(database_url: str, db: asyncpg.Pool) -> None:
    assert ok(
        await outbox(
            "suppress", "Ada@Example.COM", "--reason", "asked us to stop", database_url=database_url
        )
    ) == ("suppressed Ada@Example.COM: mail to it is not sent\n")
    ok(await outbox("suppress", "jörg@bücher.de", database_url=database_url))
    rows = await db.fetch(
        "SELECT address_key, address, source, reason, outbox_id FROM outbox_suppressions "
        "ORDER BY address_key"
    )
    assert [tuple(r) for r in rows] == [
        ("ada@example.com", "Ada@Example.COM", "operator", "asked us to stop", None),
        ("jörg@xn--bcher-kva.de", "jörg@bücher.de", "operator", "suppressed by an operator", None),
    ]

    # Any spelling of a listed address is on the list already: its entry stays as it was.
    again = ok(
        await outbox("suppress", "ada@example.com", "--reason", "other", database_url=database_url)
    )
    assert again.startswith("Ada@Example.COM is on the suppression list already, since ")
    assert again.endswith("(operator: asked us to stop)\n")
    assert await db.fetchval("SELECT count(*) FROM outbox_suppressions") == 2

    listed = json.loads(ok(await outbox("suppressions", "--json", database_url=database_url)))
    assert listed["total"] == 2
    assert [s["address"] for s in listed["items"]] == ["jörg@bücher.de", "Ada@Example.COM"]
    assert listed["items"][1]["reason"] == "asked us to stop"
    table = ok(await outbox("suppressions", database_url=database_url)).splitlines()
    assert table[0].split() == ["ADDRESS", "SOURCE", "SINCE", "(UTC)", "REASON"]
    assert table[1].startswith("jörg@bücher.de")
    one = await outbox("suppressions", "--limit", "1", database_url=database_url)
    assert len(one.out.splitlines()) == 2 and "1 more not shown (--limit)" in one.err

    assert ok(await outbox("unsuppress", "ADA@example.com", database_url=database_url)) == (
        "unsuppressed ADA@example.com\n"
    )
    missing = await outbox("unsuppress", "ada@example.com", database_url=database_url)
    assert missing.code == 1
    assert missing.err == "outbox unsuppress: ada@example.com is not on the suppression list\n"
    ok(await outbox("unsuppress", "JÖRG@xn--bcher-kva.de", database_url=database_url))
    empty = await outbox("suppressions", database_url=database_url)
    assert empty.code == 0 and empty.out == "" and "empty" in empty.err


# --- errors: one line naming the flag, exit 2, nothing touched --------------------------------

BAD = [
    (["limit", "set", "--rate", "40/x"], "--rate"),
    (["limit", "set", "--rate", "0/s"], "--rate"),
    (["limit", "set", "--rate", "forty/s"], "--rate"),
    (["limit", "set", "--rate", "\u0663/s"], "--rate"),  # another script's digit 3
    (["limit", "set", "--rate", "40/s", "--rate", "100/s"], "--rate"),  # one window twice
    (["limit", "set", "--rate", "1/h", "--rate", "24/d", "--rate", "2/1h"], "--rate"),
    (["limit", "set", *[f"--rate=1/{n}s" for n in range(1, 12)]], "--rate"),  # too many
    (["limit", "set", "--domain", "ex ample.com", "--rate", "1/s"], "--domain"),
    (["limit", "set", "--domain", "", "--rate", "1/s"], "--domain"),
    (["limit", "set", "--domain", "a..b", "--rate", "1/s"], "--domain"),
    (["limit", "set", "--domain", "xn--zz.de", "--rate", "1/s"], "--domain"),
    (["limit", "set", "--domain", "x\u202eexample.com", "--rate", "1/s"], "--domain"),
    (["limit", "set"], "--rate"),
    (["limit", "set", "--domain", "example.com"], "--concurrency"),
    (["limit", "set", "--concurrency", "0"], "--concurrency"),
    (["limit", "set", "--concurrency", "many"], "--concurrency"),
    (["limit", "set", "--concurrency", "10000001"], "--concurrency"),
    (["limit", "rm", "--domain", "exa mple.com"], "--domain"),
    (["limit"], "ACTION"),
    (["limit", "drop"], "ACTION"),
    (["pause", "--domain", "-bad-.com"], "--domain"),
    (["resume", "--domain", "[127.0.0.1]"], "--domain"),
    (["suppress"], "ADDRESS"),
    (["suppress", "not-an-address"], "ADDRESS"),
    (["suppress", "<ada@example.com"], "ADDRESS"),
    (["suppress", "a@b@example.com"], "ADDRESS"),
    (["suppress", "ada@"], "ADDRESS"),
    (["suppress", "a b@example.com"], "ADDRESS"),
    (["suppress", "ada@exa mple.com"], "ADDRESS"),
    (["suppress", "=?utf-8?q?x?=@example.com"], "ADDRESS"),
    (["suppress", "ada@example.com", "--reason", ""], "--reason"),
    (["suppress", "ada@example.com", "--reason", "line\nbreak"], "--reason"),
    (["unsuppress", "@example.com"], "ADDRESS"),
    (["suppressions", "--limit", "0"], "--limit"),
]


def check_usage_error(result: Result, flag: str) -> None:
    """Exit 2, nothing on stdout, no traceback, and one error line naming ``flag``."""
    assert result.code == 2, result
    assert result.out == ""
    assert "Traceback" not in result.err
    errors = [line for line in result.err.splitlines() if "error:" in line]
    assert len(errors) == 1, result.err
    assert result.err.endswith(errors[0] + "\n")  # the last line, after the usage
    assert flag in errors[0], result.err


@pytest.mark.parametrize(("args", "flag"), BAD)
async def test_bad_arguments_name_the_flag(args: list[str], flag: str) -> None:
    check_usage_error(await outbox(*args, database_url=NOWHERE), flag)


async def test_a_bad_argument_changes_nothing(database_url: str, db: asyncpg.Pool) -> None:
    ok(await outbox("limit", "set", "--rate", "10/s", database_url=database_url))
    result = await outbox(
        "limit", "set", "--rate", "20/s", "--rate", "30/s", database_url=database_url
    )
    check_usage_error(result, "--rate")
    assert "20/s and 30/s have the same window" in result.err
    assert await windows(db, "") == [(1, 10, 10.0, 10.0)]


@pytest.mark.parametrize(
    "args",
    [
        ["limit", "list"],
        ["limit", "set", "--rate", "1/s"],
        ["limit", "rm"],
        ["pause"],
        ["resume", "--domain", "example.com"],
        ["suppress", "ada@example.com"],
        ["unsuppress", "ada@example.com"],
        ["suppressions"],
    ],
)
async def test_unreachable_database_is_one_line_and_exit_1(args: list[str]) -> None:
    url = f"postgresql://app:secret@127.0.0.1:{free_port()}/outbox"
    result = await outbox(*args, database_url=url)
    assert result.code == 1
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the database" in lines[0], result.err
    assert "secret" not in result.err


def test_every_policy_command_is_registered() -> None:
    parser = build_parser()
    for command in (
        ["limit", "set", "--rate", "1/s"],
        ["limit", "list"],
        ["limit", "rm"],
        ["pause"],
        ["resume"],
        ["suppress", "a@example.com"],
        ["unsuppress", "a@example.com"],
        ["suppressions"],
    ):
        assert callable(parser.parse_args(command).handler)


# --- any text: a clean error or success, never a traceback ------------------------------------


def parse(argv: Sequence[str]) -> tuple[object | None, str]:
    """Parse ``outbox ARGV`` in-process: (namespace or None, what went to stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return build_parser().parse(list(argv)), err.getvalue()
        except SystemExit as stop:
            assert stop.code == 2, (stop.code, err.getvalue())
            return None, err.getvalue()


def _one_error_line(stderr: str, flag: str) -> None:
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and flag in errors[0], stderr


@pytest.fixture
async def conn(db: asyncpg.Pool) -> AsyncIterator[Connection]:
    async with db.acquire() as connection:
        yield connection


#: Text of every kind, plus things that look almost right.
POLICY_TEXT = st.one_of(
    ANY_TEXT,
    st.builds(
        lambda n, m, unit: f"{n}/{m}{unit}",
        st.integers(-5, 10**10),
        st.sampled_from(["", "0", "1", "5", "999999", "1000000"]),
        st.sampled_from([*"smhdxS ", "sec", "\u00b5s"]),
    ),
    st.text(string.ascii_letters + string.digits + "-._@", max_size=30),
    st.builds(lambda a, b: f"{a}@{b}", st.text(max_size=10), st.text(max_size=15)),
)


@seed(SEED)
@hypothesis_settings(300)
@given(text=POLICY_TEXT)
async def test_any_text_as_rate_domain_or_address(conn: Connection, text: str) -> None:
    explain(f"text={text!r}")
    # --rate: refused naming --rate, or a rate the database takes.
    ns, err = parse(["limit", "set", f"--rate={text}"])
    event("rate refused" if ns is None else "rate taken")
    if ns is None:
        _one_error_line(err, "--rate")
    else:
        await set_limits(conn, None, rates=ns.rate)  # type: ignore[attr-defined]
    # --domain: refused naming --domain, or a domain whose limit can be set and removed.
    ns, err = parse(["limit", "set", "--rate", "1/s", f"--domain={text}"])
    event("domain refused" if ns is None else "domain taken")
    if ns is None:
        _one_error_line(err, "--domain")
    else:
        domain = ns.domain  # type: ignore[attr-defined]
        assert domain == domain_name(domain) and domain.isascii()
        await set_limits(conn, domain, rates=[Rate(1, 1)])
        assert await remove_limits(conn, domain)
    # ADDRESS: refused naming ADDRESS, or an address that can be suppressed and back.
    ns, err = parse(["suppress", "--", text])
    event("address refused" if ns is None else "address taken")
    if ns is None:
        _one_error_line(err, "ADDRESS")
    else:
        entry, _ = await suppress(conn, text)
        assert entry.address == text
        assert await unsuppress(conn, text)
    await conn.execute("DELETE FROM outbox_policies")


def _passable(text: str) -> bool:
    """Whether ``text`` can be a command-line argument at all (no NUL, encodable)."""
    try:
        os.fsencode(text)
    except UnicodeError:
        return False
    return "\x00" not in text


@seed(SEED)
@hypothesis_settings(12)
@given(
    command=st.sampled_from(["rate", "domain", "address"]),
    text=POLICY_TEXT.filter(_passable),
)
async def test_any_text_on_a_real_process(database_url: str, command: str, text: str) -> None:
    explain(f"{command}={text!r}")
    args = {
        "rate": ["limit", "set", f"--rate={text}"],
        "domain": ["limit", "set", "--rate", "1/s", f"--domain={text}"],
        "address": ["suppress", "--", text],
    }[command]
    result = await outbox(*args, database_url=database_url)  # no traceback, ever
    flag = {"rate": "--rate", "domain": "--domain", "address": "ADDRESS"}[command]
    if result.code == 2:
        check_usage_error(result, flag)
    else:
        assert result.code == 0, result
