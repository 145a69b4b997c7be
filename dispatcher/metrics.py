"""Prometheus metrics of the dispatcher (served with ``outbox dispatcher --metrics-port``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

MAILS = Counter(
    "outbox_mails_total",
    "Send attempts by outcome (sent, deferred, unknown, failed, lease_lost).",
    ["outcome"],
)
SEND_SECONDS = Histogram(
    "outbox_send_seconds",
    "Time from starting an SMTP transaction to the server's final reply.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
CLAIM_BATCH = Histogram(
    "outbox_claim_batch_size",
    "Rows taken by each claim that found work.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
ATTEMPT_NUMBER = Histogram(
    "outbox_attempt_number",
    "Attempt number of each recorded outcome (1 = first try).",
    buckets=(1, 2, 3, 4, 5, 6, 8, 10, 15, 20),
)
SMTP_UNREACHABLE = Gauge(
    "outbox_smtp_unreachable",
    "1 while the SMTP server cannot be reached (connect, TLS, AUTH) and sending is paused.",
)
