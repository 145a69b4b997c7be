"""Why hasn't this gone? ``operations.explain``, ``outbox explain`` and ``GET /outbox/{id}``'s
``why``, for every state a mail can be in, against a real database."""

from __future__ import annotations

import json
import re
from datetime import timedelta

import asyncpg
import httpx
import pytest

from outbox.dispatcher import operations as ops
from outbox.dispatcher import policies
from outbox.dispatcher.policy import Rate
from tests.asgi import AUTH
from tests.audit_seed import add_attempt, add_mail, live_dispatcher, set_status
from tests.test_audit_cli import outbox

MINUTE = timedelta(minutes=1)
DAY = timedelta(days=1)


async def explain(db: asyncpg.Pool, outbox_id: int, **limits: float) -> ops.Explanation:
    async with db.acquire() as conn:
        why = await ops.explain(conn, outbox_id, **limits)  # type: ignore[arg-type]
    assert why is not None
    # Every line is plain words: one line each, no stray whitespace.
    for text in (why.summary, *why.reasons):
        assert text == text.strip() and "\n" not in text and text.endswith("."), text
    return why


def text(why: ops.Explanation) -> str:
    return "\n".join((why.summary, *why.reasons))


async def defer(db: asyncpg.Pool, outbox_id: int, attempts: int, due_in: timedelta) -> None:
    """Leave the row as a dispatcher leaves a deferred mail: attempts made, due later."""
    await db.execute(
        "UPDATE outbox SET attempts = $2, next_attempt_at = now() + $3::interval, "
        "last_smtp_code = 451, last_error = '4.7.1 try later' WHERE id = $1",
        outbox_id,
        attempts,
        due_in,
    )


async def silence(db: asyncpg.Pool, name: str, for_: timedelta) -> None:
    await db.execute(
        "UPDATE dispatchers SET last_beat_at = now() - $2::interval WHERE name = $1", name, for_
    )


# --- pending ----------------------------------------------------------------------------------


async def test_due_mail_and_no_dispatcher(db: asyncpg.Pool) -> None:
    mail = await add_mail(db, age=3 * MINUTE)
    why = await explain(db, mail)
    assert why.status == "pending"
    assert why.summary == f"Mail {mail} is due, but no dispatcher is running to send it."
    assert why.reasons[0] == "Pending: due now for 3 minutes."
    assert "No dispatcher is running" in text(why) and "outbox dispatcher" in text(why)
    assert "Attempts: none yet, of at most 15;" in text(why)
    assert why.next_attempt_at is not None
    assert why.lease_owner is None and why.owner_alive is None and why.last_reply is None


async def test_due_mail_waits_behind_older_due_mail(db: asyncpg.Pool) -> None:
    await add_mail(db, age=5 * MINUTE)
    await add_mail(db, age=4 * MINUTE)
    await add_mail(db, status="sent", age=6 * MINUTE)  # not in the queue
    mail = await add_mail(db, age=MINUTE)
    await live_dispatcher(db, "d-1")
    why = await explain(db, mail)
    assert why.summary == f"Mail {mail} is due now and goes with the next claim of a dispatcher."
    assert "2 due mails are ahead of it in the queue." in why.reasons
    assert "1 dispatcher is running." in why.reasons


async def test_deferred_mail_with_its_last_reply_and_attempts_left(db: asyncpg.Pool) -> None:
    mail = await add_mail(db)
    await add_attempt(db, mail, 1, "deferred", smtp_code=421, reply="4.3.0 busy", stage="connect")
    await add_attempt(
        db, mail, 2, "deferred", smtp_code=451, reply="4.7.1 try later", stage="rcpt", ago=MINUTE
    )
    await defer(db, mail, 2, 5 * MINUTE)
    await live_dispatcher(db, "d-1")
    why = await explain(db, mail)
    assert why.summary == (
        f"Mail {mail} has not gone yet: 2 attempts failed for now, and the next one is in "
        "5 minutes."
    )
    assert why.reasons[0].startswith("Pending: next attempt in 5 minutes, at ")
    assert why.last_reply == "451 4.7.1 try later (at RCPT TO)"
    assert (
        "Last reply (attempt 2, 1 minute ago, dispatcher worker-1): "
        "451 4.7.1 try later (at RCPT TO)."
    ) in why.reasons
    assert any(
        r.startswith("Attempts: 2 of at most 15 used; it fails for good after 13 more failed")
        for r in why.reasons
    )
    assert "(3 days after it was queued)" in text(why)


async def test_limits_are_the_ones_given(db: asyncpg.Pool) -> None:
    mail = await add_mail(db)
    await defer(db, mail, 2, MINUTE)
    why = await explain(db, mail, max_attempts=3, max_age=3600)
    assert "Attempts: 2 of at most 3 used; the next attempt is the last" in text(why)
    why = await explain(db, mail, max_attempts=4, max_age=3600)
    assert "after 2 more failed attempts, or at " in text(why)
    assert "(1 hour after it was queued)" in text(why)
    old = await add_mail(db, age=2 * DAY)
    why = await explain(db, old, max_attempts=3, max_age=DAY.total_seconds())
    assert "older than the age limit" in text(why)


async def test_scheduled_mail(db: asyncpg.Pool) -> None:
    mail = await add_mail(db)
    await db.execute(
        "UPDATE outbox SET next_attempt_at = now() + interval '3 days 1 minute' WHERE id = $1",
        mail,
    )
    why = await explain(db, mail)
    assert why.summary == f"Mail {mail} is scheduled: its first attempt is in 3 days."
    assert why.reasons[0].startswith("Pending: scheduled for its first attempt at ")


async def test_unknown_last_outcome_may_have_been_delivered(db: asyncpg.Pool) -> None:
    mail = await add_mail(db)
    await add_attempt(
        db, mail, 1, "unknown", error="connection lost after the data", stage="end_of_data"
    )
    await defer(db, mail, 1, 2 * MINUTE)
    why = await explain(db, mail)
    assert "may have been delivered" in why.summary
    assert "same Message-ID" in why.summary and "in 2 minutes" in why.summary
    assert "ended without a reply" in text(why) and "outcome is unknown" in text(why)
    assert why.last_reply == "connection lost after the data (at the end of the message)"


async def test_sending_paused_when_every_live_dispatcher_cannot_reach_smtp(
    db: asyncpg.Pool,
) -> None:
    mail = await add_mail(db)
    for name in ("d-1", "d-2"):
        await live_dispatcher(db, name)
    await db.execute(
        "UPDATE dispatchers SET smtp_error = 'connection refused', "
        "smtp_unreachable_since = now() - interval '2 minutes'"
    )
    why = await explain(db, mail)
    assert "sending is paused: the SMTP server cannot be reached" in why.summary
    assert (
        "Sending is paused: every running dispatcher reports the SMTP server unreachable."
    ) in why.reasons
    assert any(r.startswith("Dispatcher d-2: SMTP server unreachable since ") for r in why.reasons)

    await db.execute("UPDATE dispatchers SET smtp_error = NULL WHERE name = 'd-2'")
    why = await explain(db, mail)
    assert "goes with the next claim" in why.summary
    assert (
        "1 of 2 running dispatchers report the SMTP server unreachable; the others send."
    ) in why.reasons


async def test_held_back_by_the_operators_controls(
    db: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    mail = await add_mail(db)
    later = await add_mail(db)
    await defer(db, later, 1, MINUTE)
    seen: list[int] = []

    async def paused(conn: object, row: ops.MailRow) -> tuple[str, ...]:
        seen.append(row.id)
        return ("Sending to example.com is paused (outbox resume --domain example.com)",)

    monkeypatch.setattr(ops, "hold_reasons", paused)
    why = await explain(db, mail)
    assert why.summary == (
        f"Mail {mail} is due but held back: Sending to example.com is paused "
        "(outbox resume --domain example.com)."
    )
    assert why.reasons[0].startswith("Sending to example.com is paused")
    assert "held back" not in (await explain(db, later)).summary  # not due: not held yet
    assert seen == [mail, later]


async def test_held_back_by_a_pause(db: asyncpg.Pool) -> None:
    mail = await add_mail(db, "ada@bücher.de", age=MINUTE)
    await live_dispatcher(db, "d-1")
    async with db.acquire() as conn:
        await policies.pause(conn, "BÜCHER.de")
    why = await explain(db, mail)
    assert why.summary == (
        f"Mail {mail} is due but held back: Mail to xn--bcher-kva.de is paused by an "
        "operator (outbox resume --domain xn--bcher-kva.de releases it)."
    )
    async with db.acquire() as conn:
        await policies.pause(conn, None)
    why = await explain(db, mail)
    assert why.reasons[:2] == (
        "All mail is paused by an operator (outbox resume releases it).",
        "Mail to xn--bcher-kva.de is paused by an operator (outbox resume --domain "
        "xn--bcher-kva.de releases it).",
    )
    assert why.reasons[2] == "Pending: due now for 1 minute."
    other = await add_mail(db, "bob@example.com")
    async with db.acquire() as conn:
        await policies.resume(conn, None)
    assert "goes with the next claim" in (await explain(db, other)).summary


async def test_held_back_by_the_suppression_list(db: asyncpg.Pool) -> None:
    mail = await add_mail(db, "Ada@Example.com")
    async with db.acquire() as conn:
        await policies.suppress(conn, "ada@EXAMPLE.com", "asked us to stop")
    why = await explain(db, mail)
    assert why.summary.startswith(
        f"Mail {mail} is due but held back: Its recipient is on the suppression list since "
    )
    assert why.summary.endswith(
        "(added by an operator: asked us to stop), so a dispatcher marks it suppressed "
        "instead of sending it."
    )


async def test_held_back_by_the_limits(db: asyncpg.Pool) -> None:
    await live_dispatcher(db, "worker-1")
    await add_mail(db, "bob@example.com", status="sending")
    mail = await add_mail(db, "ada@example.com")
    async with db.acquire() as conn:
        await policies.set_limits(conn, "example.com", rates=[Rate(2, 60)], concurrency=1)
        await policies.set_limits(conn, None, rates=[Rate(100, 1)])
    await db.execute("UPDATE outbox_rate_limits SET tokens = 0.5 WHERE domain = 'example.com'")
    await db.execute(
        "UPDATE outbox_policies SET throttle_rate = 2, throttle_base = 4, "
        "throttled_at = now() - interval '15 seconds' WHERE domain = ''"
    )
    why = await explain(db, mail)
    holds = [r for r in why.reasons if not r.startswith(("Pending", "Attempts", "1 "))]
    assert holds[0] == (
        "Mail to example.com is at its concurrency limit (1 being sent, at most 1 at once)."
    )
    assert holds[1].startswith("Mail to example.com has used up its rate of 2/m (the next mail")
    assert holds[2].startswith("All mail is slowed down by the adaptive throttle since ")
    # 15 seconds after 4/s was halved to 2/s: 2/s more every 10 s, about 5/s.
    assert re.search(
        r"after temporary refusals of the SMTP server \(now 5(\.[0-4]\d*)?/s, halved from "
        r"4/s\)\.$",
        holds[2],
    ), holds[2]
    assert why.summary == f"Mail {mail} is due but held back: {holds[0]}"
    # Limits with room to spare hold nothing back.
    async with db.acquire() as conn:
        await policies.set_limits(conn, "example.com", rates=[Rate(1000, 1)], concurrency=5)
    await db.execute(
        "UPDATE outbox_policies SET throttle_rate = NULL, throttle_base = NULL, throttled_at = NULL"
    )
    assert "goes with the next claim" in (await explain(db, mail)).summary


async def test_a_suppressed_mail(db: asyncpg.Pool) -> None:
    mail = await add_mail(db, "eve@example.com")
    await db.execute("UPDATE outbox SET status = 'suppressed' WHERE id = $1", mail)
    await db.execute(
        "INSERT INTO outbox_suppressions (address_key, address, source, reason, outbox_id) "
        "VALUES ('eve@example.com', 'Eve@example.com', 'smtp', '550 5.1.1 no such user', 7)"
    )
    why = await explain(db, mail)
    assert why.status == "suppressed"
    assert why.summary == (
        f"Mail {mail} was suppressed just now and will not be sent: its recipient is on the "
        "suppression list."
    )
    assert why.reasons[1].startswith("Eve@example.com is on the list since ")
    assert why.reasons[1].endswith(
        ": the SMTP server refused it permanently (mail 7): 550 5.1.1 no such user."
    )
    assert why.reasons[2] == (
        f"To send it anyway: outbox unsuppress Eve@example.com, then outbox retry {mail}."
    )
    async with db.acquire() as conn:
        assert await policies.unsuppress(conn, "eve@example.com")
        why = await explain(db, mail)
        assert why.reasons[1] == (
            f"Its recipient is no longer on the suppression list: outbox retry {mail} sends it."
        )
        # Retried by id, it is queued again.
        assert (await ops.retry(conn, [mail])).changed == (mail,)


# --- sending ----------------------------------------------------------------------------------


async def test_sending_by_a_live_dispatcher(db: asyncpg.Pool) -> None:
    await live_dispatcher(db, "worker-1")
    mail = await add_mail(db, status="sending")
    why = await explain(db, mail)
    assert why.summary == f"Mail {mail} is being sent right now by dispatcher worker-1 (attempt 1)."
    assert why.lease_owner == "worker-1" and why.owner_alive is True
    assert why.next_attempt_at is None
    assert "Dispatcher worker-1 is alive: its last heartbeat was just now." in why.reasons
    assert any(r.startswith("Its lease runs out in 2 minutes, at ") for r in why.reasons)


async def test_sending_by_a_gone_dispatcher(db: asyncpg.Pool) -> None:
    await live_dispatcher(db, "worker-1")
    await live_dispatcher(db, "worker-2")
    mail = await add_mail(db, status="sending")
    await silence(db, "worker-1", 5 * MINUTE)
    why = await explain(db, mail)
    assert why.owner_alive is False
    assert why.summary == (
        f"Mail {mail} is stuck: dispatcher worker-1 is gone; the next claim will take it over."
    )
    assert "Dispatcher worker-1 is gone: its last heartbeat was 5 minutes ago." in why.reasons
    assert f"can be cancelled: outbox cancel {mail}" in text(why)
    assert "taken over by the next claim" in text(why)

    # Gone altogether (deregistered), and nobody else is running.
    await db.execute("DELETE FROM dispatchers")
    why = await explain(db, mail)
    assert why.owner_alive is False
    assert "Dispatcher worker-1 is gone: it is no longer registered." in why.reasons
    assert why.summary == (
        f"Mail {mail} is stuck: dispatcher worker-1 is gone, and no dispatcher is running to "
        "take it over."
    )


async def test_sending_with_an_expired_lease(db: asyncpg.Pool) -> None:
    await live_dispatcher(db, "worker-1")
    mail = await add_mail(db, status="sending")
    await db.execute(
        "UPDATE outbox SET lease_expires_at = now() - interval '30 seconds' WHERE id = $1", mail
    )
    why = await explain(db, mail)
    assert why.owner_alive is True
    assert (
        why.summary == f"Mail {mail} is stuck: its lease expired; the next claim will take it over."
    )
    assert any(r.startswith("Its lease expired 30 seconds ago") for r in why.reasons)


# --- final states ---------------------------------------------------------------------------


async def test_sent(db: asyncpg.Pool) -> None:
    mail = await add_mail(db)
    await add_attempt(db, mail, 1, "unknown", error="timed out", stage="end_of_data", ago=MINUTE)
    await add_attempt(db, mail, 2, "sent", smtp_code=250, reply="2.0.0 OK", stage="end_of_data")
    await set_status(db, mail, "sent")
    await db.execute("UPDATE outbox SET attempts = 2 WHERE id = $1", mail)
    why = await explain(db, mail)
    assert why.summary == f"Mail {mail} was sent just now, on attempt 2."
    assert why.last_reply == "250 2.0.0 OK (at the end of the message)"
    assert why.reasons[0].startswith("Sent: the SMTP server accepted it at ")
    assert why.reasons[0].endswith("(just now): 250 2.0.0 OK (at the end of the message).")
    assert "the recipient may have more than one copy" in text(why)
    assert why.next_attempt_at is None and why.lease_owner is None


async def test_failed_permanently(db: asyncpg.Pool) -> None:
    mail = await add_mail(db, status="failed")
    await db.execute("UPDATE outbox SET last_error = '5.1.1 no such user' WHERE id = $1", mail)
    await add_attempt(
        db, mail, 3, "failed", smtp_code=550, reply="5.1.1 no such user", stage="rcpt"
    )
    why = await explain(db, mail)
    assert why.summary == f"Mail {mail} failed for good just now: 550 5.1.1 no such user."
    assert "the SMTP server refused it permanently: 550 5.1.1 no such user." in why.reasons[0]
    assert why.last_reply == "550 5.1.1 no such user (at RCPT TO)"
    assert f"outbox retry {mail}" in why.reasons[-1]


async def test_failed_when_the_retry_limits_ran_out(db: asyncpg.Pool) -> None:
    mail = await add_mail(db, status="failed")
    await db.execute(
        "UPDATE outbox SET last_smtp_code = 451, last_error = 'gave up after 15 attempts "
        "over 259200s: 451 4.7.1 try later' WHERE id = $1",
        mail,
    )
    why = await explain(db, mail)
    assert "the retry limits ran out: gave up after 15 attempts" in why.reasons[0]
    assert why.last_reply == "gave up after 15 attempts over 259200s: 451 4.7.1 try later"


async def test_cancelled(db: asyncpg.Pool) -> None:
    mail = await add_mail(db, status="cancelled")
    why = await explain(db, mail)
    assert why.summary == f"Mail {mail} was cancelled just now and will not be sent."
    assert f"outbox retry {mail}" in why.reasons[-1]


async def test_missing_mail_and_an_open_transaction(db: asyncpg.Pool) -> None:
    async with db.acquire() as conn:
        assert await ops.explain(conn, 999) is None
        assert await ops.explain(conn, 0) is None
        assert await ops.explain(conn, 2**63) is None
        mail = await add_mail(db)
        async with conn.transaction():  # the caller's transaction is used as it is
            why = await ops.explain(conn, mail)
            assert why is not None and why.status == "pending"


# --- outbox explain ---------------------------------------------------------------------------


async def test_cli(database_url: str, db: asyncpg.Pool) -> None:
    mail = await add_mail(db, status="failed")
    await add_attempt(db, mail, 3, "failed", smtp_code=550, reply="5.1.1 no\x1b[31m user")
    await db.execute("UPDATE outbox SET last_error = '5.1.1 no such user' WHERE id = $1", mail)

    plain = await outbox("explain", str(mail), database_url=database_url)
    assert plain.code == 0, plain.err
    lines = plain.out.splitlines()
    assert lines[0] == f"Mail {mail} failed for good just now: 550 5.1.1 no such user."
    assert all(line.startswith("  ") for line in lines[1:])
    assert "\x1b" not in plain.out  # server text is made safe for a terminal

    as_json = json.loads(
        (await outbox("explain", str(mail), "--json", database_url=database_url)).out
    )
    assert as_json["outbox_id"] == mail and as_json["status"] == "failed"
    # The same words (a second later, "just now" may have become "1 second ago").
    assert as_json["summary"].endswith(": 550 5.1.1 no such user.")
    assert len(as_json["reasons"]) == len(lines) - 1
    assert as_json["reasons"][0] == lines[1][2:]
    assert set(as_json) == {
        "outbox_id",
        "status",
        "summary",
        "reasons",
        "next_attempt_at",
        "lease_owner",
        "owner_alive",
        "last_reply",
    }

    await db.execute("UPDATE outbox SET status = 'suppressed' WHERE id = $1", mail)
    suppressed = await outbox("explain", str(mail), database_url=database_url)
    assert suppressed.out.startswith(f"Mail {mail} was suppressed ")

    missing = await outbox("explain", "999", database_url=database_url)
    assert missing.code == 1
    assert missing.err.strip() == "outbox explain: no mail with id 999"
    bad = await outbox("explain", "x", database_url=database_url)
    assert bad.code == 2 and "ID" in bad.err


async def test_cli_uses_the_limits_set_here(
    database_url: str, db: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    mail = await add_mail(db)
    await defer(db, mail, 1, MINUTE)
    result = await outbox("explain", str(mail), database_url=database_url)
    assert "Attempts: 1 of at most 15 used" in result.out
    monkeypatch.setenv("DISPATCHER_MAX_ATTEMPTS", "4")  # as the dispatchers have it
    result = await outbox("explain", str(mail), database_url=database_url)
    assert "Attempts: 1 of at most 4 used; it fails for good after 3 more" in result.out


# --- GET /outbox/{id} -------------------------------------------------------------------------


async def test_api_detail_says_why(admin: httpx.AsyncClient, db: asyncpg.Pool) -> None:
    await live_dispatcher(db, "worker-1")
    mail = await add_mail(db, status="sending")
    await silence(db, "worker-1", 5 * MINUTE)
    response = await admin.get(f"/outbox/{mail}", headers=AUTH)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == mail and body["status"] == "sending"  # the row's fields stay
    assert "history" in body and "headers" in body
    why = body["why"]
    assert set(why) == {
        "summary",
        "reasons",
        "next_attempt_at",
        "lease_owner",
        "owner_alive",
        "last_reply",
    }
    assert why["summary"].startswith(f"Mail {mail} is stuck: dispatcher worker-1 is gone")
    assert why["lease_owner"] == "worker-1" and why["owner_alive"] is False
    async with db.acquire() as conn:
        expected = await ops.explain(conn, mail)
    assert expected is not None and why["reasons"] == list(expected.reasons)

    schema = (await admin.get("/openapi.json")).json()["components"]["schemas"]
    assert "why" in schema["MailDetail"]["properties"] and "Why" in schema

    held = await add_mail(db, "ada@example.com")
    async with db.acquire() as conn:
        await policies.pause(conn, "example.com")
    body = (await admin.get(f"/outbox/{held}", headers=AUTH)).json()
    assert body["why"]["summary"].startswith(f"Mail {held} is due but held back: Mail to ")
    await db.execute("UPDATE outbox SET status = 'suppressed' WHERE id = $1", held)
    suppressed = await admin.get(f"/outbox/{held}", headers=AUTH)
    assert suppressed.status_code == 200 and suppressed.json()["status"] == "suppressed"
    listed = await admin.get("/outbox", params={"status": "suppressed"}, headers=AUTH)
    assert [item["id"] for item in listed.json()["items"]] == [held]
