"""Traces across the outbox with OpenTelemetry: from the request that queued a mail to its
SMTP reply, in one trace.

Only the OpenTelemetry *API* is used: every span is a no-op until the operator configures
an SDK (``opentelemetry-instrument``, or a ``TracerProvider`` set in code). Enqueue stores
the W3C ``traceparent`` of the current span with the mail (``outbox.trace_context``) when
that span is recorded, and NULL otherwise, at the cost of one context look-up. The
dispatcher parents its spans for the mail on it:

* ``outbox.claim``  - the claim statement that leased the mail (one per mail of a batch);
* ``outbox.send``   - the attempt: queue wait, message, SMTP dialogue, its reply;
* ``outbox.record`` - the transaction that wrote the outcome (a child of ``outbox.send``).

The stored format is always W3C trace context (``00-<trace id>-<span id>-<flags>``),
whatever propagator the process is configured with: it is a column, read by hand and by
every dispatcher, not a header.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, SpanKind, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = [
    "SEND_SPAN",
    "claimed",
    "current_trace_context",
    "may_record",
    "parent_context",
    "recorded",
    "send_finished",
    "send_span",
    "tracer",
]

#: The span a dispatcher makes for each attempt.
SEND_SPAN: Final = "outbox.send"
#: A header value longer than this is not a W3C traceparent (the propagator says the same).
_MAX_LENGTH: Final = 512

_W3C: Final = TraceContextTextMapPropagator()
_NO_PARENT: Final = Context()


def tracer(name: str, provider: trace.TracerProvider | None = None) -> Tracer:
    """A tracer of ``provider``, or of the global provider (late-bound: an SDK configured
    after this call is used from then on)."""
    return trace.get_tracer(name, tracer_provider=provider)


def may_record(tracer: Tracer) -> bool:
    """False when ``tracer`` can only make no-op spans: it is the global provider's and no
    SDK has been configured (yet). Cheaper than starting a no-op span, for hot paths."""
    return not (
        isinstance(tracer, trace.ProxyTracer)
        and isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    )


def current_trace_context() -> str | None:
    """The ``traceparent`` of the current span if it is recorded, else None (no work)."""
    span = trace.get_current_span()
    if not span.is_recording():
        return None
    carrier: dict[str, str] = {}
    _W3C.inject(carrier)
    return carrier.get("traceparent")


def parent_context(carrier: Mapping[str, str] | str | None) -> Context:
    """The context to start a span in: the trace in ``carrier`` (a stored ``traceparent``,
    or request headers), else a new trace. A value that does not parse starts a new trace."""
    if carrier is None:
        return _NO_PARENT
    if isinstance(carrier, str):
        if len(carrier) > _MAX_LENGTH:
            return _NO_PARENT
        carrier = {"traceparent": carrier}
    return _W3C.extract(carrier, _NO_PARENT)


# --- The dispatcher's spans -----------------------------------------------------------------


def claimed(
    tracer: Tracer,
    traceparent: str | None,
    *,
    outbox_id: int,
    dispatcher: str,
    batch: int,
    started_ns: int,
    finished_ns: int,
) -> None:
    """An ``outbox.claim`` span for one mail of a claim, over the claim statement's time."""
    span = tracer.start_span(
        "outbox.claim",
        context=parent_context(traceparent),
        start_time=started_ns,
        attributes={
            "outbox.id": outbox_id,
            "outbox.dispatcher": dispatcher,
            "outbox.claim.batch_size": batch,
        },
    )
    span.end(end_time=finished_ns)


def send_span(
    tracer: Tracer,
    traceparent: str | None,
    *,
    outbox_id: int,
    message_id: str,
    attempt: int,
    dispatcher: str,
) -> trace.Span:
    """Start the ``outbox.send`` span of one attempt, in the trace the mail was queued in."""
    return tracer.start_span(
        SEND_SPAN,
        context=parent_context(traceparent),
        kind=SpanKind.CONSUMER,
        attributes={
            "outbox.id": outbox_id,
            "outbox.message_id": message_id,
            "outbox.attempt": attempt,
            "outbox.dispatcher": dispatcher,
        },
    )


def send_finished(
    span: Span,
    outcome: str,
    *,
    stage: str | None = None,
    code: int | None = None,
    error: str | None = None,
) -> SpanContext | None:
    """Describe how the attempt ended (``released`` if it never started); the span's
    context when it is recorded, to parent ``outbox.record`` on."""
    if not span.is_recording():
        return None
    span.set_attribute("outbox.outcome", outcome)
    if stage is not None:
        span.set_attribute("smtp.stage", stage)
    if code is not None:
        span.set_attribute("smtp.code", code)
    if error is not None:
        span.set_attribute("outbox.error", error[:500])
    if outcome in ("failed", "deferred", "unknown"):
        span.set_status(StatusCode.ERROR, f"{outcome}: {error or code}"[:500])
    return span.get_span_context()


def recorded(
    tracer: Tracer,
    send: SpanContext,
    *,
    outbox_id: int,
    outcome: str,
    lease_lost: bool,
    batch: int,
    started_ns: int,
    finished_ns: int,
) -> None:
    """An ``outbox.record`` span under the attempt's ``outbox.send``, over the write."""
    span = tracer.start_span(
        "outbox.record",
        context=trace.set_span_in_context(NonRecordingSpan(send)),
        start_time=started_ns,
        attributes={
            "outbox.id": outbox_id,
            "outbox.outcome": "lease_lost" if lease_lost else outcome,
            "outbox.record.batch_size": batch,
        },
    )
    span.end(end_time=finished_ns)
