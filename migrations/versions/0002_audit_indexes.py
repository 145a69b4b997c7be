"""Indexes for audit and operations.

- ``outbox_failed_cancelled_idx`` (partial): ``outbox list --status failed``, ``outbox
  retry --all-failed`` and the per-status counts of ``outbox status`` / ``GET /metrics``
  read only the (normally few) failed and cancelled rows, never the whole history. Sent
  rows, the bulk of the table, never enter it.
- ``outbox_created_at_id_idx`` replaces 0001's ``outbox_created_at_idx (created_at)``:
  ``outbox prune`` walks it in ``(created_at, id)`` order with a keyset cursor, so each
  batch starts exactly where the previous one stopped (no re-reading of the rows it
  deleted or kept, even when thousands of rows share one created_at, as a bulk enqueue in
  one transaction does). It serves every created_at range query the old one did.
- ``outbox_attempts_finished_at_idx``: "failures in the last hour" and the audit queries
  of docs/audit.md ("failures by SMTP code this week") read a time range of the history.

Lists by recipient use 0001's ``outbox_recipient_idx (lower(recipient), id)``.

The indexes are built CONCURRENTLY (outside a transaction), so migrating a large live
outbox never blocks registrations. A run that was interrupted may have left an invalid
index behind; it is dropped and built again.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEXES = {
    "outbox_failed_cancelled_idx": (
        "ON outbox (status, id) WHERE status IN ('failed', 'cancelled')"
    ),
    "outbox_created_at_id_idx": "ON outbox (created_at, id)",
    "outbox_attempts_finished_at_idx": "ON outbox_attempts (finished_at)",
}
REPLACED = {"outbox_created_at_idx": "ON outbox (created_at)"}


def _create(name: str, definition: str) -> None:
    op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
    op.execute(f"CREATE INDEX CONCURRENTLY {name} {definition}")


def upgrade() -> None:
    with op.get_context().autocommit_block():
        for name, definition in INDEXES.items():
            _create(name, definition)
        for name in REPLACED:
            op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")


def downgrade() -> None:
    with op.get_context().autocommit_block():
        for name, definition in REPLACED.items():
            _create(name, definition)
        for name in INDEXES:
            op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
