"""Hostile and odd data: one key per mailbox, how far each attempt got, poison rows.

- ``users.email_key``: the mailbox's identity (``dispatcher.addresses.email_key``: Unicode
  caseless matching of the local part, the domain as an A-label), computed by the
  application and unique. It replaces the unique index on ``lower(email)``, whose idea of
  letter case depends on the database's collation and ends at ASCII under ``C``
  (``äda@`` and ``ÄDA@`` were two users). Existing rows are keyed here; two existing
  users that turn out to share a mailbox stop the migration with both ids named.
- ``outbox_attempts.smtp_stage``: the last step of the SMTP dialogue the attempt began
  (``render``, ``connect``, ``mail``, ``rcpt``, ``data``, ``end_of_data``). A failure at
  ``end_of_data`` means the server had the whole message and may have accepted it.
- ``outbox_attempts.outcome`` gains ``unknown``: the reply to the end of data never came
  (or could not be read), so the mail may have been delivered; it is retried with the
  same Message-ID.
- ``outbox.abandons``: how many times a dispatcher took this row and vanished without an
  outcome. A row that keeps taking dispatchers down with it is failed after a few
  (the dispatcher's ``DISPATCHER_MAX_ABANDONS``) instead of being handed on forever.
- ``dispatchers.smtp_error`` and ``smtp_unreachable_since``: a dispatcher that cannot
  reach its SMTP server (connect, TLS, AUTH) pauses sending; its heartbeat says so, for
  ``outbox status``.

Without the registration tables (``outbox migrate --without-registration``) the ``users``
part is left out.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from outbox.dispatcher.addresses import email_key
from outbox.migrations.history import registration

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OUTCOMES_BEFORE = "('sent', 'deferred', 'failed', 'abandoned')"
OUTCOMES_AFTER = "('sent', 'deferred', 'failed', 'abandoned', 'unknown')"
STAGES = "('render', 'connect', 'mail', 'rcpt', 'data', 'end_of_data')"


def _key_existing_users() -> None:
    bind = op.get_bind()
    keys: dict[str, int] = {}
    rows = bind.execute(sa.text("SELECT id, email FROM users ORDER BY id")).all()
    for user_id, email in rows:
        try:
            key = email_key(email)
        except ValueError:
            key = email.lower()  # stored before addresses were checked: keep it reachable
        if key in keys:
            raise RuntimeError(
                f"users {keys[key]} and {user_id} have the same mailbox ({key}); "
                "merge or delete one of them, then migrate again"
            )
        keys[key] = user_id
        bind.execute(
            sa.text("UPDATE users SET email_key = :key WHERE id = :id"), {"key": key, "id": user_id}
        )


def upgrade() -> None:
    if registration():
        op.execute("ALTER TABLE users ADD COLUMN email_key text")
        _key_existing_users()
        op.execute("ALTER TABLE users ALTER COLUMN email_key SET NOT NULL")
        # The API maps a violation of this index, and only this one, to 409.
        op.execute("CREATE UNIQUE INDEX users_email_key_key ON users (email_key)")
        op.execute("DROP INDEX users_email_lower_key")

    op.execute(
        f"ALTER TABLE outbox_attempts ADD COLUMN smtp_stage text CHECK (smtp_stage IN {STAGES})"
    )
    op.execute("ALTER TABLE outbox_attempts DROP CONSTRAINT outbox_attempts_outcome_check")
    op.execute(
        "ALTER TABLE outbox_attempts ADD CONSTRAINT outbox_attempts_outcome_check "
        f"CHECK (outcome IN {OUTCOMES_AFTER})"
    )
    op.execute(
        "ALTER TABLE outbox ADD COLUMN abandons integer NOT NULL DEFAULT 0 CHECK (abandons >= 0)"
    )
    op.execute(
        "ALTER TABLE dispatchers ADD COLUMN smtp_error text, "
        "ADD COLUMN smtp_unreachable_since timestamptz"
    )


def downgrade() -> None:
    op.execute("ALTER TABLE dispatchers DROP COLUMN smtp_error, DROP COLUMN smtp_unreachable_since")
    op.execute("ALTER TABLE outbox DROP COLUMN abandons")
    op.execute("UPDATE outbox_attempts SET outcome = 'deferred' WHERE outcome = 'unknown'")
    op.execute("ALTER TABLE outbox_attempts DROP CONSTRAINT outbox_attempts_outcome_check")
    op.execute(
        "ALTER TABLE outbox_attempts ADD CONSTRAINT outbox_attempts_outcome_check "
        f"CHECK (outcome IN {OUTCOMES_BEFORE})"
    )
    op.execute("ALTER TABLE outbox_attempts DROP COLUMN smtp_stage")
    if registration():
        op.execute("CREATE UNIQUE INDEX users_email_lower_key ON users (lower(email))")
        op.execute("DROP INDEX users_email_key_key")
        op.execute("ALTER TABLE users DROP COLUMN email_key")
