"""Permanent idempotency keys for enqueue: ``outbox_keys`` and ``outbox.idempotency_key``.

- ``outbox_keys``: one row per key ever given to ``enqueue(..., key=...)``, with the mail
  it made (``outbox_id``, ``message_id``, ``created_at``). Its primary key is the one
  authority on "this key was used": enqueue inserts the key and the mail in one
  statement, and a repeat (in any transaction, at any later time) finds the key and
  returns that mail instead. There is no foreign key to ``outbox``, on purpose: the key
  outlives its mail. ``outbox prune`` deletes mail after its window but keeps the keys,
  which go only with ``--keys-older-than`` (a longer window), and only once their mail is
  gone. Because keys never move between tables, a prune running next to an enqueue of
  the same key cannot open a gap in which the key exists nowhere.
- ``outbox_keys_created_at_idx (created_at, outbox_id)``: the key prune walks it with a
  keyset cursor, as the mail prune walks ``outbox_created_at_id_idx``.
- ``outbox.idempotency_key``: the key on the mail itself, for ``outbox show``, the admin
  API and queries by hand. Not indexed (lookups by key go through ``outbox_keys``) and
  not checked here (``outbox_keys`` checks the same value, written by the same
  statement); a nullable column without default is added without rewriting the table.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: Longest key, in characters (dispatcher.outbox.MAX_KEY_LENGTH).
MAX_KEY_LENGTH = 200


def upgrade() -> None:
    op.execute(
        f"""
        CREATE TABLE outbox_keys (
            key         text PRIMARY KEY CHECK (length(key) BETWEEN 1 AND {MAX_KEY_LENGTH}),
            -- The mail the key made; it may have been pruned since (hence no foreign key).
            outbox_id   bigint NOT NULL,
            message_id  text NOT NULL,
            created_at  timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute("CREATE INDEX outbox_keys_created_at_idx ON outbox_keys (created_at, outbox_id)")
    op.execute("ALTER TABLE outbox ADD COLUMN idempotency_key text")


def downgrade() -> None:
    op.execute("ALTER TABLE outbox DROP COLUMN idempotency_key")
    op.execute("DROP TABLE outbox_keys")
