"""Idempotency keys of ``POST /register``.

``registration_keys`` holds one row per ``Idempotency-Key`` a registration committed
with, written in the same transaction as the user and the welcome mail: the three exist
together or not at all. A repeat of the request with the same key reads the row and gets
the stored answer (``response``, the original 201 body as sent) instead of a 409.

- ``key``: the client's key as sent (printable ASCII, at most 255 characters), primary
  key: two requests with one key serialise on it, so concurrent repeats create one user.
- ``request_hash``: SHA-256 of the validated body; the same key with another body is
  refused (422) rather than answered with someone else's registration.
- ``user_id``: the user it created; deleting the user deletes its key. ``outbox_id``
  has no foreign key: ``outbox prune`` may delete the mail before the key expires.
- ``expires_at``: 24 hours after ``created_at``. A key past it is ignored (its key may be
  used again), and ``outbox prune`` deletes such rows by ``registration_keys_expires_idx``.

Without the registration tables (``outbox migrate --without-registration``) this revision
changes nothing.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24
"""

from collections.abc import Sequence

from alembic import op

from outbox.migrations.history import registration

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if not registration():
        return
    op.execute(
        """
        CREATE TABLE registration_keys (
            key           text PRIMARY KEY
                          CHECK (length(key) BETWEEN 1 AND 255 AND key ~ '^[\\x20-\\x7e]+$'),
            request_hash  bytea NOT NULL CHECK (length(request_hash) = 32),
            user_id       bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
            outbox_id     bigint NOT NULL,
            -- The 201 body as it was sent: a replay answers with exactly these bytes.
            response      json NOT NULL,
            created_at    timestamptz NOT NULL DEFAULT now(),
            expires_at    timestamptz NOT NULL,
            CHECK (expires_at > created_at)
        )
        """
    )
    op.execute("CREATE INDEX registration_keys_expires_idx ON registration_keys (expires_at)")
    # ON DELETE CASCADE looks keys up by user when a user is deleted.
    op.execute("CREATE INDEX registration_keys_user_id_idx ON registration_keys (user_id)")


def downgrade() -> None:
    if registration():
        op.execute("DROP TABLE registration_keys")
