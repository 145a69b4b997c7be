"""Odd and hostile mail through a real dispatcher and real aiosmtpd servers.

IDN domains go out as A-labels; a non-ASCII local part needs SMTPUTF8 and fails alone,
permanently, without it; a row no server could take fails at 'render' without stopping
the dispatcher; an unreadable reply to the data is an 'unknown' outcome, retried with
the same Message-ID; a row that keeps taking dispatchers down with it is failed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from email.headerregistry import Address

import asyncpg
import httpx
import pytest

from outbox.api.app import create_app
from outbox.dispatcher import queries
from outbox.dispatcher.outbox import Enqueued, Mail, enqueue
from outbox.dispatcher.settings import Settings
from tests.asgi import app_client
from tests.dispatching import SENDER, enqueue_many, running_dispatcher, wait_until
from tests.hostile import check_message, parse
from tests.smtp_server import Reply, SmtpServer, long_reply

MAIL_FROM = "Outbox <hello@example.org>"


@pytest.fixture
async def client(database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(database_url=database_url, mail_from=MAIL_FROM))
    async with app_client(app, raise_app_exceptions=False) as http:
        yield http


@pytest.fixture
def ascii_server() -> Iterator[SmtpServer]:
    """A server that does not offer SMTPUTF8."""
    server = SmtpServer(enable_SMTPUTF8=False).start()
    try:
        yield server
    finally:
        server.stop()


async def _register(client: httpx.AsyncClient, email: str, name: str = "Bob") -> str:
    response = await client.post("/register", json={"email": email, "name": name})
    assert response.status_code == 201, response.text
    message_id: str = response.json()["message_id"]
    return message_id


async def _mail(pool: asyncpg.Pool, local: str, domain: str = "example.com") -> Enqueued:
    async with pool.acquire() as conn, conn.transaction():
        mail = Mail(Address("Zoë", local, domain), "Hello", "Hello\n", "<p>Hello</p>")
        return await enqueue(conn, mail, sender=SENDER)


async def _row(pool: asyncpg.Pool, outbox_id: int) -> asyncpg.Record:
    row = await pool.fetchrow("SELECT * FROM outbox WHERE id = $1", outbox_id)
    assert row is not None
    return row


async def _statuses(pool: asyncpg.Pool, expected: dict[int, str]) -> bool:
    rows = await pool.fetch("SELECT id, status FROM outbox WHERE id = ANY($1)", list(expected))
    return {r["id"]: r["status"] for r in rows} == expected


async def _attempts(pool: asyncpg.Pool, outbox_id: int) -> list[tuple[str, str | None]]:
    rows = await pool.fetch(
        "SELECT outcome, smtp_stage FROM outbox_attempts WHERE outbox_id = $1 ORDER BY id",
        outbox_id,
    )
    return [(r["outcome"], r["smtp_stage"]) for r in rows]


# --- addresses ---------------------------------------------------------------------------------


async def test_idn_domains_go_out_as_a_labels_to_a_server_without_smtputf8(
    client: httpx.AsyncClient, db: asyncpg.Pool, database_url: str, ascii_server: SmtpServer
) -> None:
    smtp_server = ascii_server
    expected = {
        await _register(client, "bob@exämple.com"): ("bob@exämple.com", "bob@xn--exmple-cua.com"),
        await _register(client, "user@bücher.de"): ("user@bücher.de", "user@xn--bcher-kva.de"),
        await _register(client, "x@xn--bcher-kva.de"): ("x@bücher.de", "x@xn--bcher-kva.de"),
    }
    async with running_dispatcher(database_url, smtp_server):
        await wait_until(lambda: len(smtp_server.received) >= 3, what="three mails")
    assert smtp_server.message_ids() == dict.fromkeys(expected, 1)
    for received in smtp_server.received:
        stored, a_label = expected[received.message_id]
        row = await db.fetchrow("SELECT * FROM outbox WHERE message_id = $1", received.message_id)
        assert row is not None and row["recipient"] == stored
        assert received.rcpt_tos == (a_label,)
        assert received.mail_options == ()  # no SMTPUTF8 needed, none asked for
        assert received.data.isascii()
        parsed = check_message(received.data, row, smtputf8=False)
        assert parsed["To"].addresses[0].addr_spec == a_label


async def test_a_non_ascii_local_part_is_sent_with_smtputf8_when_offered(
    db: asyncpg.Pool, database_url: str, smtputf8_server: SmtpServer
) -> None:
    utf8 = await _mail(db, "josé", "exämple.com")
    ascii_ = await _mail(db, "ada")
    async with running_dispatcher(database_url, smtputf8_server):
        await wait_until(
            lambda: _statuses(db, {utf8.id: "sent", ascii_.id: "sent"}), what="both sent"
        )
    received = {r.message_id: r for r in smtputf8_server.received}
    assert set(received) == {utf8.message_id, ascii_.message_id}

    sent = received[utf8.message_id]
    assert sent.rcpt_tos == ("josé@xn--exmple-cua.com",)
    assert "SMTPUTF8" in sent.mail_options
    parsed = check_message(sent.data, await _row(db, utf8.id), smtputf8=True)
    assert parsed["To"].addresses[0].addr_spec == "josé@xn--exmple-cua.com"

    plain = received[ascii_.message_id]
    assert plain.rcpt_tos == ("ada@example.com",)
    assert "SMTPUTF8" not in plain.mail_options and plain.data.isascii()


async def test_a_non_ascii_local_part_fails_alone_and_permanently_without_smtputf8(
    db: asyncpg.Pool, database_url: str, ascii_server: SmtpServer
) -> None:
    smtp_server = ascii_server
    utf8 = await _mail(db, "josé")
    before = await _mail(db, "ada")
    async with running_dispatcher(database_url, smtp_server) as dispatcher:
        await wait_until(
            lambda: _statuses(db, {utf8.id: "failed", before.id: "sent"}),
            what="the UTF-8 address failed, the other mail sent",
        )
        # The dispatcher carries on with the next mail.
        after = await _mail(db, "grace")
        await wait_until(lambda: _statuses(db, {after.id: "sent"}), what="a later mail sent")
        assert not dispatcher.crashed
    row = await _row(db, utf8.id)
    assert row["attempts"] == 1
    assert "SMTPUTF8" in row["last_error"] and "non-ASCII local part" in row["last_error"]
    assert await _attempts(db, utf8.id) == [("failed", "mail")]
    # Nothing about it reached the server: no RCPT, no message.
    assert not any("jos" in address for address in smtp_server.handler.rcpt_seen)
    assert smtp_server.message_ids() == {before.message_id: 1, after.message_id: 1}


# --- rows no server could take ------------------------------------------------------------------

UNRENDERABLE = {
    # column changes -> a word the failure must name
    "no @": ({"recipient": "no-at-sign"}, "full address"),
    "sender": ({"sender": "not an address"}, "not a single valid email address"),
    "CRLF subject": ({"subject": "Hi\r\nBcc: x@evil.example"}, "subject"),
    "U+2028 name": ({"recipient_name": "Eve\u2028Bcc: x@evil.example"}, "display name"),
    "=? local part": ({"recipient": "a=?b@example.com"}, "=?"),
    "bad A-label": ({"recipient": "x@xn--zz.de"}, "internationalised"),
    "bad Message-ID": ({"message_id": "<two words@example.org>"}, "Message-ID"),
}


async def _insert_row(pool: asyncpg.Pool, n: int, **changes: str) -> int:
    values = {
        "message_id": f"<raw-{n}@example.org>",
        "sender": "Outbox <hello@example.org>",
        "recipient": f"raw-{n}@example.com",
        "recipient_name": "Raw",
        "subject": "Inserted with SQL",
        "body_text": "text",
        **changes,
    }
    # As migration 0007 fills rows stored before addresses were checked.
    values["recipient_domain"] = values["recipient"].rpartition("@")[2].lower()
    values["recipient_key"] = values["recipient"].lower()
    outbox_id: int = await pool.fetchval(
        f"INSERT INTO outbox ({', '.join(values)}) "
        f"VALUES ({', '.join(f'${i}' for i in range(1, len(values) + 1))}) RETURNING id",
        *values.values(),
    )
    return outbox_id


async def test_rows_that_cannot_be_rendered_fail_at_render_and_the_rest_is_delivered(
    db: asyncpg.Pool, database_url: str, smtp_server: SmtpServer
) -> None:
    bad = {
        await _insert_row(db, n, **changes): (case, reason)
        for n, (case, (changes, reason)) in enumerate(UNRENDERABLE.items())
    }
    [good] = await enqueue_many(db, 1)
    async with running_dispatcher(database_url, smtp_server) as dispatcher:
        await wait_until(
            lambda: _statuses(db, {**dict.fromkeys(bad, "failed"), good.id: "sent"}),
            what="every unrenderable row failed and the good one sent",
        )
        assert not dispatcher.crashed
    for outbox_id, (case, reason) in bad.items():
        row = await _row(db, outbox_id)
        assert row["attempts"] == 1, case
        assert row["last_error"].startswith("cannot render the message: "), (case, row)
        assert reason in row["last_error"], (case, row["last_error"])
        assert await _attempts(db, outbox_id) == [("failed", "render")], case
    # Not one SMTP command was spent on them.
    assert list(smtp_server.handler.rcpt_seen) == ["user-0@example.com"]
    assert smtp_server.message_ids() == {good.message_id: 1}


# --- replies that cannot be read ----------------------------------------------------------------


async def test_a_reply_longer_than_the_client_reads_after_the_data_is_unknown_and_retried(
    db: asyncpg.Pool, database_url: str, smtp_server: SmtpServer
) -> None:
    # The server takes the message but answers with a 9000-byte line, past aiosmtplib's
    # 8192: the client cannot know whether it was accepted, so the attempt is 'unknown'
    # and the mail goes again, byte for byte, with the same Message-ID.
    smtp_server.handler.data_plan = lambda rcpt, seen: (
        Reply(long_reply(250)) if seen == 0 else Reply()
    )
    [queued] = await enqueue_many(db, 1)
    async with running_dispatcher(database_url, smtp_server):
        await wait_until(lambda: _statuses(db, {queued.id: "sent"}), what="the mail to be sent")
    assert await _attempts(db, queued.id) == [("unknown", "end_of_data"), ("sent", "end_of_data")]
    first = await db.fetchval(
        "SELECT error FROM outbox_attempts WHERE outbox_id = $1 ORDER BY id LIMIT 1", queued.id
    )
    assert "too long" in first.lower()
    copies = smtp_server.received
    assert [c.message_id for c in copies] == [queued.message_id] * 2
    assert copies[0].data == copies[1].data


# --- the circuit breaker ------------------------------------------------------------------------

ABANDONED = """
UPDATE outbox
SET status = 'sending', lease_owner = $2, lease_token = gen_random_uuid(),
    leased_at = now() - interval '10 minutes', lease_expires_at = now() - interval '1 minute',
    attempts = $3, abandons = $3
WHERE id = $1
"""


async def test_a_row_abandoned_for_the_fifth_time_is_failed_by_the_claim(db: asyncpg.Pool) -> None:
    poisoned, survivor, pending = await enqueue_many(db, 3)
    await db.execute(ABANDONED, poisoned.id, "gone", 4)
    await db.execute(ABANDONED, survivor.id, "gone", 3)
    claimed = await db.fetch(queries.CLAIM, 10, "next", 30.0, 6.0, 5)
    assert sorted(r["id"] for r in claimed) == [survivor.id, pending.id]

    row = await _row(db, poisoned.id)
    assert (row["status"], row["abandons"], row["attempts"]) == ("failed", 5, 4)
    assert row["last_error"].startswith("abandoned 5 times")
    assert row["lease_token"] is None and row["lease_owner"] is None
    history = await db.fetch("SELECT * FROM outbox_attempts WHERE outbox_id = $1", poisoned.id)
    assert [(a["outcome"], a["attempt"], a["dispatcher"]) for a in history] == [
        ("abandoned", 4, "gone")
    ]
    row = await _row(db, survivor.id)
    assert (row["status"], row["abandons"], row["attempts"]) == ("sending", 4, 4)
    assert row["lease_owner"] == "next"
    # Failed is final: later claims never see it.
    later = await db.fetch(queries.CLAIM, 10, "later", 30.0, 6.0, 5)
    assert poisoned.id not in {r["id"] for r in later}


async def test_a_restarted_dispatcher_fails_its_own_poisoned_rows(db: asyncpg.Pool) -> None:
    poisoned, orphan = await enqueue_many(db, 2)
    await db.execute(ABANDONED, poisoned.id, "me", 4)
    await db.execute(ABANDONED, orphan.id, "me", 0)
    reclaimed = await db.fetch(queries.RECLAIM_PREDECESSOR, "me", 5)
    assert sorted(r["id"] for r in reclaimed) == sorted([poisoned.id, orphan.id])
    row = await _row(db, poisoned.id)
    assert (row["status"], row["abandons"]) == ("failed", 5)
    assert row["last_error"].startswith("abandoned 5 times")
    row = await _row(db, orphan.id)
    assert (row["status"], row["abandons"], row["last_error"]) == ("pending", 1, None)
    outcomes = await db.fetch("SELECT outbox_id, outcome, error FROM outbox_attempts")
    assert {(a["outbox_id"], a["outcome"]) for a in outcomes} == {
        (poisoned.id, "abandoned"),
        (orphan.id, "abandoned"),
    }
    assert all("restarted" in a["error"] for a in outcomes)


async def test_a_running_dispatcher_never_sends_a_poisoned_row(
    db: asyncpg.Pool, database_url: str, smtp_server: SmtpServer
) -> None:
    poisoned, healthy = await enqueue_many(db, 2)
    await db.execute(ABANDONED, poisoned.id, "gone", 4)
    async with running_dispatcher(database_url, smtp_server, max_abandons=5):
        await wait_until(
            lambda: _statuses(db, {poisoned.id: "failed", healthy.id: "sent"}),
            what="the poisoned row failed, the other sent",
        )
    assert smtp_server.message_ids() == {healthy.message_id: 1}


async def test_received_utf8_message_parses_as_a_string(
    db: asyncpg.Pool, database_url: str, smtputf8_server: SmtpServer
) -> None:
    # RFC 6532: the header carries UTF-8 as it is; read as a string, it is one address.
    queued = await _mail(db, "用户", "例え.jp")
    async with running_dispatcher(database_url, smtputf8_server):
        await wait_until(lambda: _statuses(db, {queued.id: "sent"}), what="the mail to be sent")
    [received] = smtputf8_server.received
    assert received.rcpt_tos == ("用户@xn--r8jz45g.jp",)
    parsed = parse(received.data, smtputf8=True)
    [to] = parsed["To"].addresses
    assert (to.username, to.domain, to.display_name) == ("用户", "xn--r8jz45g.jp", "Zoë")
