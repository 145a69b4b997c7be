"""Traces across the outbox: ``outbox.trace_context``.

- ``outbox.trace_context``: the W3C ``traceparent`` of the span that enqueued the mail
  (``00-<trace id>-<span id>-<flags>``), written by the enqueue statement when that span
  is recorded by an OpenTelemetry SDK, NULL otherwise (no SDK configured, or the span
  not sampled). The dispatcher's ``outbox.send`` span continues that trace, so one trace
  shows the HTTP request, the commit, the claim and the SMTP reply. The trace id is
  ``split_part(trace_context, '-', 2)``.

  Not checked: a format check would let a tracing detail refuse a registration, and the
  dispatcher treats a value it cannot parse as no trace at all. Nullable without default,
  so it is added without rewriting the table.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-24
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("ALTER TABLE outbox ADD COLUMN trace_context text")


def downgrade() -> None:
    op.execute("ALTER TABLE outbox DROP COLUMN trace_context")
