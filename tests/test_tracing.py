"""Traces: one trace from POST /register to the SMTP reply, and nothing without an SDK.

The app and the dispatcher run in this process with their own SDK ``TracerProvider`` (an
in-memory exporter), so the global provider stays unset: the tests without an SDK see the
product exactly as an operator who configured none does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from email.headerregistry import Address

import asyncpg
import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from outbox.api.app import create_app
from outbox.dispatcher import tracing
from outbox.dispatcher.outbox import Mail, enqueue
from outbox.dispatcher.settings import Settings
from tests.asgi import app_client
from tests.dispatching import running_dispatcher, wait_until
from tests.smtp_server import Reply, SmtpServer

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    yield exporter
    exporter.shutdown()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


@asynccontextmanager
async def client(
    database_url: str, provider: TracerProvider | None
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(database_url=database_url), tracer_provider=provider)
    async with app_client(app) as http:
        yield http


async def register(http: httpx.AsyncClient, email: str, **headers: str) -> int:
    response = await http.post("/register", json={"email": email, "name": "Ada"}, headers=headers)
    assert response.status_code == 201, response.text
    outbox_id: int = response.json()["outbox_id"]
    return outbox_id


async def trace_context(db: asyncpg.Pool, outbox_id: int) -> str | None:
    value: str | None = await db.fetchval(
        "SELECT trace_context FROM outbox WHERE id = $1", outbox_id
    )
    return value


async def until_sent(db: asyncpg.Pool, *ids: int) -> None:
    async def sent() -> bool:
        n = await db.fetchval(
            "SELECT count(*) FROM outbox WHERE id = ANY($1::bigint[]) AND status = 'sent'",
            list(ids),
        )
        return bool(n == len(ids))

    await wait_until(sent, what="the mail to be sent")


def traceparent(span: ReadableSpan) -> str:
    context = span.get_span_context()
    assert context is not None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


def one(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    found = [span for span in spans if span.name == name]
    assert len(found) == 1, [span.name for span in spans]
    return found[0]


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def span_id(span: ReadableSpan) -> int:
    context = span.get_span_context()
    assert context is not None
    return context.span_id


def trace_id(span: ReadableSpan) -> int:
    context = span.get_span_context()
    assert context is not None
    return context.trace_id


# --- With an SDK --------------------------------------------------------------------------


async def test_one_trace_from_the_request_to_the_smtp_reply(
    database_url: str,
    db: asyncpg.Pool,
    smtp_server: SmtpServer,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    async with client(database_url, provider) as http:
        outbox_id = await register(http, "ada@example.com")
    request = one(list(exporter.get_finished_spans()), "POST /register")
    assert request.kind is SpanKind.SERVER and request.parent is None
    assert request.attributes is not None
    assert request.attributes["http.route"] == "/register"
    assert request.attributes["http.response.status_code"] == 201
    assert [event.name for event in request.events] == ["outbox.enqueued"]
    # The row carries the request span's context: the commit is part of the request's trace.
    assert await trace_context(db, outbox_id) == traceparent(request)

    async with running_dispatcher(database_url, smtp_server, tracer_provider=provider):
        await until_sent(db, outbox_id)
    spans = list(exporter.get_finished_spans())
    claim, send, record = (
        one(spans, name) for name in ("outbox.claim", "outbox.send", "outbox.record")
    )

    # One trace: request -> claim, request -> send -> record.
    for span in (claim, send, record):
        assert trace_id(span) == trace_id(request)
    assert parent_id(send) == span_id(request)
    assert parent_id(claim) == span_id(request)
    assert parent_id(record) == span_id(send)
    assert send.parent is not None and send.parent.is_remote  # it came through the row
    # In order: the request committed, then the claim, the SMTP reply, the record.
    assert request.end_time is not None and claim.start_time is not None
    assert request.end_time <= claim.start_time
    assert claim.end_time is not None and send.end_time is not None
    assert record.start_time is not None
    assert claim.end_time <= send.end_time <= record.start_time + 1

    assert send.kind is SpanKind.CONSUMER
    assert send.attributes is not None
    assert dict(send.attributes) == {
        "outbox.id": outbox_id,
        "outbox.message_id": smtp_server.received[0].message_id,
        "outbox.attempt": 1,
        "outbox.dispatcher": "test",
        "outbox.outcome": "sent",
        "smtp.stage": "end_of_data",
        "smtp.code": 250,
    }
    assert send.status.status_code is StatusCode.UNSET
    assert record.attributes is not None and record.attributes["outbox.outcome"] == "sent"
    assert claim.attributes is not None and claim.attributes["outbox.id"] == outbox_id


async def test_a_deferred_attempt_is_an_error_span_and_the_retry_joins_the_trace(
    database_url: str,
    db: asyncpg.Pool,
    smtp_server: SmtpServer,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    smtp_server.handler.rcpt_plan = lambda rcpt, seen: Reply(
        "451 4.7.1 greylisted" if seen == 0 else "250 OK"
    )
    async with client(database_url, provider) as http:
        outbox_id = await register(http, "bob@example.com")
    async with running_dispatcher(database_url, smtp_server, tracer_provider=provider):
        await until_sent(db, outbox_id)
    spans = list(exporter.get_finished_spans())
    request = one(spans, "POST /register")
    sends = sorted(
        (s for s in spans if s.name == "outbox.send"),
        key=lambda s: (s.attributes or {})["outbox.attempt"],
    )
    assert [(s.attributes or {})["outbox.outcome"] for s in sends] == ["deferred", "sent"]
    assert all(parent_id(s) == span_id(request) for s in sends)
    deferred = sends[0]
    assert deferred.status.status_code is StatusCode.ERROR
    assert (deferred.attributes or {})["smtp.code"] == 451
    assert (deferred.attributes or {})["smtp.stage"] == "rcpt"


async def test_the_clients_traceparent_is_continued(
    database_url: str, db: asyncpg.Pool, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    async with client(database_url, provider) as http:
        outbox_id = await register(
            http, "carol@example.com", traceparent=f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
        )
        # A client whose trace is not sampled: not recorded, so nothing is stored.
        unsampled = await register(
            http, "dave@example.com", traceparent=f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00"
        )
    request = one(list(exporter.get_finished_spans()), "POST /register")
    assert f"{trace_id(request):032x}" == CLIENT_TRACE
    assert f"{parent_id(request):016x}" == CLIENT_SPAN
    assert await trace_context(db, outbox_id) == traceparent(request)
    assert await trace_context(db, unsampled) is None


async def test_enqueue_stores_the_callers_recorded_span(
    db: asyncpg.Pool, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    tracer = provider.get_tracer("the-app")
    mail = Mail(Address("Ada", "ada", "example.com"), "Hi", "Hello\n")
    async with db.acquire() as conn:
        with tracer.start_as_current_span("signup"):
            async with conn.transaction():
                plain = await enqueue(conn, mail)
                keyed = await enqueue(conn, mail, key="welcome:1")
        untraced = await enqueue(conn, mail, key="welcome:2")
    signup = one(list(exporter.get_finished_spans()), "signup")
    assert await trace_context(db, plain.id) == traceparent(signup)
    assert await trace_context(db, keyed.id) == traceparent(signup)
    assert await trace_context(db, untraced.id) is None


async def test_a_trace_context_that_does_not_parse_starts_a_new_trace(
    database_url: str,
    db: asyncpg.Pool,
    smtp_server: SmtpServer,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    async with db.acquire() as conn:
        queued = await enqueue(conn, Mail("ada@example.com", "Hi", "Hello\n"))
    await db.execute(
        "UPDATE outbox SET trace_context = 'not-a-traceparent' || repeat('x', 600) WHERE id = $1",
        queued.id,
    )
    async with running_dispatcher(database_url, smtp_server, tracer_provider=provider):
        await until_sent(db, queued.id)
    send = one(list(exporter.get_finished_spans()), "outbox.send")
    assert send.parent is None and (send.attributes or {})["outbox.outcome"] == "sent"


# --- Without an SDK -------------------------------------------------------------------------


async def test_without_an_sdk_nothing_is_stored_and_mail_goes(
    database_url: str, db: asyncpg.Pool, smtp_server: SmtpServer
) -> None:
    # Nobody configured an SDK in this process: the global provider is the API's proxy.
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    async with client(database_url, None) as http:
        registered = await register(http, "erin@example.com")
        with_header = await register(
            http, "frank@example.com", traceparent=f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
        )
    async with db.acquire() as conn:
        queued = await enqueue(conn, Mail("grace@example.com", "Hi", "Hello\n"))
    ids = (registered, with_header, queued.id)
    async with running_dispatcher(database_url, smtp_server):
        await until_sent(db, *ids)
    assert [await trace_context(db, i) for i in ids] == [None, None, None]
    assert len(smtp_server.received) == 3


def test_only_a_tracer_that_may_record_costs_a_span(provider: TracerProvider) -> None:
    assert tracing.may_record(provider.get_tracer("x"))
    global_tracer = tracing.tracer("x")  # the global provider's, late-bound
    assert not tracing.may_record(global_tracer)
