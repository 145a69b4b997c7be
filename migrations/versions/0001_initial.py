"""Initial schema: users, outbox, outbox_attempts, dispatchers.

``users`` is the registration service's table: a run without the registration tables
(``outbox migrate --without-registration``) leaves it out, and records that choice as the
comment of the version table, for every later migration (``outbox.migrations.history``).

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from collections.abc import Sequence

from alembic import op

from outbox.migrations.history import VERSION_TABLE, record_without_registration, registration

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _users() -> None:
    op.execute(
        """
        CREATE TABLE users (
            id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            email       text NOT NULL CHECK (length(email) <= 320),
            name        text NOT NULL CHECK (length(name) <= 200),
            created_at  timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    # Uniqueness is case-insensitive: Alice@x.org and alice@x.org are one account.
    # The API maps a violation of this index to 409, so no racy pre-check is needed.
    op.execute("CREATE UNIQUE INDEX users_email_lower_key ON users (lower(email))")


def upgrade() -> None:
    if registration():
        _users()
    else:
        op.execute(record_without_registration())

    op.execute(
        """
        CREATE TABLE outbox (
            id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            -- Stable across retries, so a duplicate delivery is recognisable as one.
            message_id       text NOT NULL UNIQUE,
            sender           text NOT NULL,
            recipient        text NOT NULL,
            recipient_name   text NOT NULL DEFAULT '',
            subject          text NOT NULL,
            -- The rendered content. The MIME message is built from these columns
            -- deterministically (Date = created_at, boundary from message_id), so
            -- what the row says is what was sent.
            body_text        text NOT NULL,
            body_html        text,
            status           text NOT NULL DEFAULT 'pending'
                             CHECK (status IN ('pending', 'sending', 'sent', 'failed', 'cancelled')),
            attempts         integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
            next_attempt_at  timestamptz NOT NULL DEFAULT now(),
            -- The lease: set by a claim, cleared by every outcome.
            lease_owner      text,
            lease_token      uuid,
            leased_at        timestamptz,
            lease_expires_at timestamptz,
            last_error       text,
            last_smtp_code   smallint,
            created_at       timestamptz NOT NULL DEFAULT now(),
            updated_at       timestamptz NOT NULL DEFAULT now(),
            sent_at          timestamptz,
            CONSTRAINT outbox_lease_iff_sending CHECK (
                (status = 'sending') = (lease_token IS NOT NULL AND lease_expires_at IS NOT NULL)
            ),
            CONSTRAINT outbox_sent_at_iff_sent CHECK ((status = 'sent') = (sent_at IS NOT NULL))
        )
        """
    )
    # The claim query's index. Partial, so the ever-growing history of sent, failed
    # and cancelled rows never enters it: it stays as small as the live queue.
    # A 'sending' row keeps the next_attempt_at it was claimed at (always in the
    # past), so one range scan on next_attempt_at <= now() finds both due pending
    # rows and the few in-flight rows whose lease may have expired.
    op.execute(
        """
        CREATE INDEX outbox_claim_idx ON outbox (next_attempt_at)
        WHERE status IN ('pending', 'sending')
        """
    )
    op.execute("CREATE INDEX outbox_recipient_idx ON outbox (lower(recipient), id)")
    op.execute("CREATE INDEX outbox_created_at_idx ON outbox (created_at)")
    # Every row is updated two or three times (claim, outcome) and the hot part of
    # the table is tiny, so the default trigger (20 % of the table dead) would let
    # dead tuples pile up in the claim index for hours on a large table. Vacuum
    # after 1 % (or 1,000 rows), analyse after 2 %, and don't throttle the vacuum.
    op.execute(
        """
        ALTER TABLE outbox SET (
            autovacuum_vacuum_scale_factor = 0.01,
            autovacuum_vacuum_threshold = 1000,
            autovacuum_vacuum_insert_scale_factor = 0.05,
            autovacuum_analyze_scale_factor = 0.02,
            autovacuum_vacuum_cost_delay = 0
        )
        """
    )

    op.execute(
        """
        CREATE TABLE outbox_attempts (
            id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            outbox_id    bigint NOT NULL REFERENCES outbox (id) ON DELETE CASCADE,
            attempt      integer NOT NULL,
            dispatcher   text NOT NULL,
            started_at   timestamptz NOT NULL,
            finished_at  timestamptz NOT NULL,
            -- sent: 2xx; deferred: transient failure, will retry; failed: permanent;
            -- abandoned: the dispatcher vanished mid-attempt and its lease was reclaimed.
            outcome      text NOT NULL CHECK (outcome IN ('sent', 'deferred', 'failed', 'abandoned')),
            smtp_code    smallint,
            smtp_reply   text,
            error        text,
            -- True when the dispatcher had lost its lease by the time it recorded this:
            -- the row's state was not changed by it.
            lease_lost   boolean NOT NULL DEFAULT false
        )
        """
    )
    op.execute("CREATE INDEX outbox_attempts_outbox_id_idx ON outbox_attempts (outbox_id, attempt)")

    op.execute(
        """
        CREATE TABLE dispatchers (
            name          text PRIMARY KEY,
            hostname      text NOT NULL,
            pid           integer NOT NULL,
            started_at    timestamptz NOT NULL DEFAULT now(),
            last_beat_at  timestamptz NOT NULL DEFAULT now()
        )
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE dispatchers")
    op.execute("DROP TABLE outbox_attempts")
    op.execute("DROP TABLE outbox")
    if registration():
        op.execute("DROP TABLE users")
    op.execute(f"COMMENT ON TABLE {VERSION_TABLE} IS NULL")  # installed with or without
