"""One row per attempt outcome: a unique key on the attempt history.

``outbox_attempts_key_idx`` is unique on ``(outbox_id, attempt, dispatcher, started_at,
outcome)``: what identifies one outcome of one attempt. Recording a batch again (its
commit's acknowledgement was lost) now skips the outcomes already written with
``ON CONFLICT DO NOTHING`` instead of a ``NOT EXISTS`` probe per outcome, which cost the
recording statement more than half of its time and could not see an identical insert
still in progress. The index replaces 0001's ``outbox_attempts_outbox_id_idx (outbox_id,
attempt)``, whose queries it serves as well.

Such a duplicate could exist from before (a batch recorded again while its first commit
was still in progress): every copy but the first is deleted, then the index is built
CONCURRENTLY (outside a transaction), so migrating a large history never blocks the
dispatchers. A run that was interrupted may have left an invalid index behind; it is
dropped and built again.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-25
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        DELETE FROM outbox_attempts a
        USING outbox_attempts first
        WHERE a.outbox_id = first.outbox_id AND a.attempt = first.attempt
          AND a.dispatcher = first.dispatcher AND a.started_at = first.started_at
          AND a.outcome = first.outcome AND a.id > first.id
        """
    )
    with op.get_context().autocommit_block():
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS outbox_attempts_key_idx")
        op.execute(
            "CREATE UNIQUE INDEX CONCURRENTLY outbox_attempts_key_idx "
            "ON outbox_attempts (outbox_id, attempt, dispatcher, started_at, outcome)"
        )
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS outbox_attempts_outbox_id_idx")


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS outbox_attempts_outbox_id_idx")
        op.execute(
            "CREATE INDEX CONCURRENTLY outbox_attempts_outbox_id_idx "
            "ON outbox_attempts (outbox_id, attempt)"
        )
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS outbox_attempts_key_idx")
