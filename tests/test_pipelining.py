"""SMTP PIPELINING (RFC 2920): MAIL, RCPT and DATA in one write, every reply checked.

The dispatcher-level tests run against aiosmtpd offering PIPELINING (tests/smtp_server.py,
and without it in test_dispatcher.py). Here a scripted SMTP server on a real TCP socket
does what aiosmtpd cannot be made to do: answer late and in separate packets, answer in
several lines, refuse the envelope and still accept DATA, send garbage or more than it
was asked, or hang up in the middle of a group, and it notes which commands arrived
before the previous one was answered, which is what pipelining is.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace

import pytest

from outbox.dispatcher.message import Rendered, build_message
from outbox.dispatcher.smtp import SendResult, SmtpConfig, SmtpConnection, Verdict
from tests.fake_store import mail

#: What the server does with a command: a reply (CRLF-terminated lines, possibly several),
#: or "hang up" to close the connection instead of answering.
Action = bytes | str


@dataclass
class Script:
    """The scripted server's behaviour (a test changes it between sends)."""

    pipelining: bool = True
    replies: dict[bytes, Action] = field(default_factory=dict)
    end_of_data: Action = b"250 2.0.0 queued\r\n"
    #: Seconds before each reply is written (so replies go out in separate packets).
    gap: float = 0.0
    #: Sent after the replies to the envelope: more than the client asked for.
    extra: bytes = b""


@dataclass
class Seen:
    """What the server saw."""

    #: (command verb, how many earlier commands were still unanswered when it arrived).
    commands: list[tuple[bytes, int]] = field(default_factory=list)
    messages: list[bytes] = field(default_factory=list)
    connections: int = 0
    #: Connections that ended in the middle of a message's data.
    aborted_data: int = 0


_DEFAULTS: dict[bytes, bytes] = {
    b"MAIL": b"250 2.1.0 ok\r\n",
    b"RCPT": b"250 2.1.5 ok\r\n",
    b"DATA": b"354 go ahead\r\n",
    b"RSET": b"250 2.0.0 reset\r\n",
    b"NOOP": b"250 2.0.0 ok\r\n",
    b"QUIT": b"221 bye\r\n",
}


class ScriptedSmtp(asyncio.Protocol):
    def __init__(self, script: Script, seen: Seen) -> None:
        self.script, self.seen = script, seen
        self.buffer = bytearray()
        self.in_data = False
        self.unanswered = 0
        #: Replies are written in order, each after the previous one (and the gap).
        self.replying: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.seen.connections += 1
        transport.write(b"220 scripted ESMTP\r\n")

    def connection_lost(self, exc: Exception | None) -> None:
        if self.in_data:
            self.seen.aborted_data += 1

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if self.in_data:
                end = self.buffer.find(b"\r\n.\r\n")
                if end < 0:
                    return
                self.seen.messages.append(bytes(self.buffer[: end + 2]))
                del self.buffer[: end + 5]
                self.in_data = False
                self.answer(self.script.end_of_data)
                continue
            end = self.buffer.find(b"\r\n")
            if end < 0:
                return
            verb = bytes(self.buffer[:4]).upper()
            del self.buffer[: end + 2]
            self.seen.commands.append((verb, self.unanswered))
            if verb == b"EHLO":
                extensions = b"250-PIPELINING\r\n" if self.script.pipelining else b""
                self.answer(b"250-scripted\r\n" + extensions + b"250 8BITMIME\r\n")
                continue
            action = self.script.replies.get(verb, _DEFAULTS.get(verb, b"500 what\r\n"))
            if verb == b"DATA" and isinstance(action, bytes) and action.startswith(b"354"):
                self.in_data = True
            self.answer(action)
            if verb == b"DATA" and self.script.extra:
                self.answer(self.script.extra)

    def answer(self, action: Action) -> None:
        self.unanswered += 1
        previous = self.replying
        self.replying = asyncio.ensure_future(self._write(previous, action))

    async def _write(self, previous: asyncio.Future[None] | None, action: Action) -> None:
        if previous is not None:
            await previous
        if self.script.gap:
            await asyncio.sleep(self.script.gap)
        self.unanswered -= 1
        if self.transport.is_closing():
            return
        if action == "hang up":
            self.transport.close()
        else:
            assert isinstance(action, bytes)
            self.transport.write(action)


@dataclass
class Scripted:
    script: Script
    seen: Seen
    config: SmtpConfig


@pytest.fixture
async def scripted() -> AsyncIterator[Scripted]:
    script, seen = Script(), Seen()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: ScriptedSmtp(script, seen), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield Scripted(script, seen, SmtpConfig("127.0.0.1", port, timeout=2.0))
    finally:
        server.close()


def message(number: int = 1) -> Rendered:
    return build_message(mail(number))


def arrived_unanswered(seen: Seen, verb: bytes) -> list[int]:
    return [waiting for command, waiting in seen.commands if command == verb]


async def send(scripted: Scripted, *messages: Rendered) -> list[SendResult]:
    connection = SmtpConnection(scripted.config)
    try:
        return [await connection.send(m) for m in messages]
    finally:
        await connection.quit()


async def test_offered_pipelining_sends_the_envelope_in_one_go(scripted: Scripted) -> None:
    first, second = message(1), message(2)
    results = await send(scripted, first, second)
    assert [r.verdict for r in results] == [Verdict.SENT, Verdict.SENT]
    assert results[0].smtp_reply == "2.0.0 queued" and results[0].stage == "end_of_data"
    assert scripted.seen.messages == [first.data(), second.data()]
    # RCPT came before MAIL was answered, DATA before both were: one round trip.
    assert arrived_unanswered(scripted.seen, b"RCPT") == [1, 1]
    assert arrived_unanswered(scripted.seen, b"DATA") == [2, 2]
    assert scripted.seen.connections == 1


async def test_the_content_goes_out_as_the_354_arrives_with_its_own_timeout(
    scripted: Scripted,
) -> None:
    # Replies 1 s apart with SMTP_TIMEOUT 3.5 s: the group is answered after 3 s, the
    # content 1 s later, 4 s after the envelope went out. The wait for the reply to the
    # content is counted from when the content went, as a wait for a reply is. (Half a
    # second of slack either way, for a loaded machine.)
    scripted.script.gap = 1.0
    sent = message(1)
    connection = SmtpConnection(replace(scripted.config, timeout=3.5))
    try:
        result = await connection.send(sent)
    finally:
        await connection.quit()
    assert (result.verdict, result.stage) == (Verdict.SENT, "end_of_data")
    assert scripted.seen.messages == [sent.data()]


async def test_more_than_the_reply_to_the_content_is_an_unknown_outcome(
    scripted: Scripted,
) -> None:
    # The server accepted the message, and said more: the connection is out of step, and
    # whether the mail is accepted cannot be trusted either.
    scripted.script.end_of_data = b"250 2.0.0 queued\r\n250 2.0.0 and more\r\n"
    connection = SmtpConnection(scripted.config)
    result = await connection.send(message(1))
    assert (result.verdict, result.stage, result.connection_problem) == (
        Verdict.UNKNOWN,
        "end_of_data",
        True,
    )
    assert "Unexpected data" in (result.error or "")
    scripted.script.end_of_data = b"250 2.0.0 queued\r\n"
    again = await connection.send(message(2))
    await connection.quit()
    assert again.verdict == Verdict.SENT and scripted.seen.connections == 2


async def test_without_the_extension_each_command_waits_for_its_reply(
    scripted: Scripted,
) -> None:
    scripted.script.pipelining = False
    results = await send(scripted, message(1), message(2))
    assert [r.verdict for r in results] == [Verdict.SENT, Verdict.SENT]
    assert {waiting for _, waiting in scripted.seen.commands} == {0}


async def test_replies_in_separate_packets_and_several_lines_are_all_read(
    scripted: Scripted,
) -> None:
    # Each reply a while after the last: the client sees them one packet at a time.
    scripted.script.gap = 0.02
    scripted.script.replies[b"MAIL"] = b"250-sender\r\n250-looks\r\n250 fine\r\n"
    scripted.script.replies[b"RCPT"] = b"251 2.1.5 will forward\r\n"
    results = await send(scripted, message(1), message(2), message(3))
    assert [r.verdict for r in results] == [Verdict.SENT] * 3
    assert len(scripted.seen.messages) == 3 and scripted.seen.connections == 1


@pytest.mark.parametrize(
    ("verb", "reply", "verdict", "stage"),
    [
        (b"MAIL", b"550 5.7.1 sender refused\r\n", Verdict.PERMANENT, "mail"),
        (b"MAIL", b"451 4.3.0 later\r\n", Verdict.TRANSIENT, "mail"),
        (b"RCPT", b"550 5.1.1 no such user\r\n", Verdict.PERMANENT, "rcpt"),
        (b"RCPT", b"450 4.2.1 mailbox busy\r\n", Verdict.TRANSIENT, "rcpt"),
        (b"RCPT", b"552 5.5.3 too many recipients\r\n", Verdict.TRANSIENT, "rcpt"),
        (b"DATA", b"554 5.5.1 no valid recipients\r\n", Verdict.PERMANENT, "data"),
    ],
)
async def test_a_refusal_in_the_group_is_the_result_and_the_connection_goes_on(
    scripted: Scripted, verb: bytes, reply: bytes, verdict: Verdict, stage: str
) -> None:
    scripted.script.replies[verb] = reply
    if verb != b"DATA":  # what a server answers to the commands after a refused one
        scripted.script.replies[b"DATA"] = b"503 5.5.1 no valid recipients\r\n"
    refused = message(1)
    connection = SmtpConnection(scripted.config)
    result = await connection.send(refused)
    assert (result.verdict, result.stage) == (verdict, stage)
    assert result.smtp_code == int(reply[:3]) and result.smtp_reply == reply[4:].decode().strip()
    assert not result.connection_problem
    assert scripted.seen.messages == []
    # The envelope is reset and the same connection carries the next mail.
    scripted.script.replies.clear()
    accepted = await connection.send(message(2))
    await connection.quit()
    assert accepted.verdict is Verdict.SENT
    assert b"RSET" in [command for command, _ in scripted.seen.commands]
    assert scripted.seen.messages == [message(2).data()] and scripted.seen.connections == 1


async def test_data_accepted_after_a_refused_recipient_aborts_without_a_message(
    scripted: Scripted,
) -> None:
    # RFC 2920: the client must check DATA's reply too. Sending the message now would
    # hand the server data for a transaction without a recipient; hanging up aborts it.
    scripted.script.replies[b"RCPT"] = b"550 5.1.1 no such user\r\n"
    result = (await send(scripted, message(1)))[0]
    assert (result.verdict, result.stage, result.smtp_code) == (Verdict.PERMANENT, "rcpt", 550)
    await _wait(lambda: scripted.seen.aborted_data == 1, "the server to see the hang-up")
    assert scripted.seen.messages == []


async def test_421_in_the_group_drops_the_connection(scripted: Scripted) -> None:
    scripted.script.replies[b"RCPT"] = b"421 4.7.0 too busy, closing\r\n"
    scripted.script.replies[b"DATA"] = b"503 5.5.1 no\r\n"
    connection = SmtpConnection(scripted.config)
    busy = await connection.send(message(1))
    assert (busy.verdict, busy.stage, busy.connection_problem) == (Verdict.TRANSIENT, "rcpt", True)
    scripted.script.replies.clear()
    accepted = await connection.send(message(2))
    await connection.quit()
    assert accepted.verdict is Verdict.SENT and scripted.seen.connections == 2


@pytest.mark.parametrize(
    ("fault", "stage"),
    [
        ({b"MAIL": "hang up"}, "mail"),
        ({b"RCPT": "hang up"}, "rcpt"),
        ({b"DATA": "hang up"}, "data"),
        ({b"RCPT": b"2x0 not a code\r\n"}, "rcpt"),
        ({b"RCPT": b"250 " + b"x" * 9000 + b"\r\n"}, "rcpt"),
    ],
    ids=["hang-up-at-mail", "hang-up-at-rcpt", "hang-up-at-data", "garbage", "too-long"],
)
async def test_a_broken_group_is_a_transient_connection_problem_at_its_stage(
    scripted: Scripted, fault: dict[bytes, Action], stage: str
) -> None:
    scripted.script.replies.update(fault)
    connection = SmtpConnection(scripted.config)
    broken = await connection.send(message(1))
    assert (broken.verdict, broken.stage, broken.connection_problem) == (
        Verdict.TRANSIENT,
        stage,
        True,
    )
    assert broken.error
    # Nothing went out for it, and the next mail gets a fresh connection.
    scripted.script.replies.clear()
    accepted = await connection.send(message(2))
    await connection.quit()
    assert accepted.verdict is Verdict.SENT
    assert scripted.seen.messages == [message(2).data()] and scripted.seen.connections == 2


async def test_more_replies_than_commands_is_a_connection_out_of_step(
    scripted: Scripted,
) -> None:
    scripted.script.extra = b"250 2.0.0 and another thing\r\n"
    result = (await send(scripted, message(1)))[0]
    assert (result.verdict, result.stage, result.connection_problem) == (
        Verdict.TRANSIENT,
        "data",
        True,
    )
    assert scripted.seen.messages == []


async def test_a_group_that_gets_no_answer_times_out_at_the_step_it_reached(
    scripted: Scripted,
) -> None:
    scripted.script.replies[b"DATA"] = b""  # MAIL and RCPT answered, DATA never
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = (await send(scripted, message(1)))[0]
    assert (result.verdict, result.stage, result.connection_problem) == (
        Verdict.TRANSIENT,
        "data",
        True,
    )
    assert "Timed out" in (result.error or "")
    assert 1.5 < loop.time() - started < 10  # SMTP_TIMEOUT (2 s here), not forever
    assert scripted.seen.messages == []


async def test_a_send_past_its_deadline_is_cut_off_at_the_step_it_reached(
    scripted: Scripted,
) -> None:
    # The lease allows 0.3 s; SMTP_TIMEOUT (2 s here) would wait longer for the reply to
    # the data: the deadline cuts the send off first, and the server had the message.
    scripted.script.end_of_data = b""
    connection = SmtpConnection(scripted.config)
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await connection.send(message(1), deadline=started + 0.3)
    assert (result.verdict, result.stage, result.connection_problem) == (
        Verdict.UNKNOWN,
        "end_of_data",
        True,
    )
    assert "within its lease" in (result.error or "")
    assert 0.3 <= loop.time() - started < 1.5
    # The next send starts afresh on a new connection, under its own deadline.
    scripted.script.end_of_data = b"250 2.0.0 queued\r\n"
    again = await connection.send(message(2), deadline=loop.time() + 5)
    await connection.quit()
    assert again.verdict == Verdict.SENT
    assert scripted.seen.connections == 2


async def test_a_deadline_cuts_off_an_unanswered_envelope_too(scripted: Scripted) -> None:
    scripted.script.replies[b"DATA"] = b""  # MAIL and RCPT answered, DATA never
    connection = SmtpConnection(scripted.config)
    loop = asyncio.get_running_loop()
    result = await connection.send(message(1), deadline=loop.time() + 0.3)
    assert (result.verdict, result.stage) == (Verdict.TRANSIENT, "data")
    assert "within its lease" in (result.error or "")
    assert scripted.seen.messages == []


async def test_a_server_that_never_greets_times_out_as_smtp_not_as_the_lease() -> None:
    # SMTP_TIMEOUT (0.3 s) runs out long before the lease (30 s): the error says so, and
    # is not taken for the lease's end.
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never a word, until the client hangs up

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    connection = SmtpConnection(SmtpConfig("127.0.0.1", port, timeout=0.3))
    loop = asyncio.get_running_loop()
    try:
        result = await connection.send(message(1), deadline=loop.time() + 30)
    finally:
        server.close()
    assert (result.verdict, result.stage, result.connection_problem) == (
        Verdict.TRANSIENT,
        "connect",
        True,
    )
    assert "within its lease" not in (result.error or "")
    assert "Timed out" in (result.error or ""), result.error


async def test_a_deadline_already_past_sends_nothing(scripted: Scripted) -> None:
    connection = SmtpConnection(scripted.config)
    loop = asyncio.get_running_loop()
    result = await connection.send(message(1), deadline=loop.time() - 1)
    assert (result.verdict, result.stage, result.connection_problem) == (
        Verdict.TRANSIENT,
        "connect",
        True,
    )
    assert "within its lease" in (result.error or "")
    assert scripted.seen.messages == []


async def test_replies_in_time_set_no_timer_per_reply(scripted: Scripted) -> None:
    # Waiting for a reply within SMTP_TIMEOUT and the send's deadline used to cost a
    # timer per reply, and one per send: a tenth of the dispatcher's CPU in a drain.
    connection = SmtpConnection(scripted.config)
    loop = asyncio.get_running_loop()
    await connection.send(message(1), deadline=loop.time() + 60)  # connects
    scheduled = []
    call_at = loop.call_at

    def counting(when: float, callback: Callable[..., object], *args: object) -> object:
        scheduled.append(callback)
        return call_at(when, callback, *args)

    loop.call_at = counting  # type: ignore[method-assign, assignment]
    try:
        results = [
            await connection.send(message(n), deadline=loop.time() + 60) for n in range(2, 52)
        ]
    finally:
        del loop.call_at  # type: ignore[method-assign]
        await connection.quit()
    assert {r.verdict for r in results} == {Verdict.SENT}
    assert scheduled == []


async def _wait(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def test_a_reply_of_endless_lines_is_refused(scripted: Scripted) -> None:
    scripted.script.replies[b"RCPT"] = b"250-more\r\n" * 10_000 + b"250 done\r\n"
    result = (await send(scripted, message(1)))[0]
    assert (result.verdict, result.stage, result.connection_problem) == (
        Verdict.TRANSIENT,
        "rcpt",
        True,
    )
    assert "too long" in (result.error or "")
    assert scripted.seen.messages == []
