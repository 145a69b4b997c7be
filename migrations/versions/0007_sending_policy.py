"""Sending policy: priorities, fleet-wide limits, pause, adaptive throttling, suppression.

- ``outbox.priority``: 0 (most urgent) to 9, default 5. Claims take due mail in
  ``(priority, next_attempt_at)`` order, so ``outbox_claim_idx`` is rebuilt on those two
  columns.
- ``outbox.recipient_domain``: the recipient's domain as the limits name it (A-label,
  lower case: ``bücher.de`` and ``XN--BCHER-KVA.de`` are one domain), and
  ``outbox.recipient_key``: the mailbox's identity (``dispatcher.addresses.email_key``),
  which the suppression list is keyed by. Both are computed by the application at
  enqueue; existing rows are filled here (ASCII addresses in SQL, the rest in Python).
  ``outbox_domain_claim_idx`` serves a claim for one limited domain, and
  ``outbox_in_flight_idx`` counts the mail being sent, per domain, for concurrency limits.
- ``outbox_policies``: one row per scope that has any policy, ``''`` being all mail (the
  SMTP relay as a whole) and anything else a recipient domain: paused or not, a limit on
  mail in flight, and the adaptive throttle (the rate a 421/450/451/454 reply slowed the
  scope to, the rate it recovers towards, and when). A claim locks these rows, so claims
  that involve a limit are serialised across all dispatchers; mail to other domains is
  claimed as before.
- ``outbox_rate_limits``: the rate windows of a scope (``40/s`` is 40 per 1 second), each
  a token bucket refilled at ``max_count / per_seconds`` per second and holding at most
  ``burst`` tokens; a claim takes one token per mail from every window of the mail's
  domain and of ``''``.
- ``outbox_suppressions``: addresses no mail goes to (a permanent refusal at RCPT, or an
  operator's ``outbox suppress``). Mail to them ends ``suppressed`` without a send.
- Statuses gain ``suppressed`` (counted through ``outbox_suppressed_idx``); attempt
  outcomes gain ``suppressed``.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from outbox.dispatcher.addresses import ascii_domain, email_key

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATUSES_BEFORE = "('pending', 'sending', 'sent', 'failed', 'cancelled')"
STATUSES_AFTER = "('pending', 'sending', 'sent', 'failed', 'cancelled', 'suppressed')"
OUTCOMES_BEFORE = "('sent', 'deferred', 'failed', 'abandoned', 'unknown')"
OUTCOMES_AFTER = "('sent', 'deferred', 'failed', 'abandoned', 'unknown', 'suppressed')"


def _fill_addresses() -> None:
    """recipient_domain and recipient_key of the rows that exist already."""
    # ASCII addresses: the key is the address in lower case, the domain its last part.
    op.execute(
        r"""
        UPDATE outbox
        SET recipient_key = lower(recipient),
            recipient_domain = lower(substring(recipient from '@([^@]*)$'))
        WHERE recipient ~ '^[\x01-\x7f]*$'
        """
    )
    bind = op.get_bind()
    rows = bind.execute(
        sa.text("SELECT id, recipient FROM outbox WHERE recipient_key IS NULL")
    ).all()
    for row_id, recipient in rows:
        domain = recipient.rpartition("@")[2]
        try:
            key, domain = email_key(recipient), ascii_domain(domain)
        except ValueError:  # stored before addresses were checked: keep it reachable
            key, domain = recipient.lower(), domain.lower()
        bind.execute(
            sa.text("UPDATE outbox SET recipient_key = :k, recipient_domain = :d WHERE id = :id"),
            {"k": key, "d": domain, "id": row_id},
        )


def upgrade() -> None:
    op.execute(
        "ALTER TABLE outbox ADD COLUMN priority smallint NOT NULL DEFAULT 5 "
        "CHECK (priority BETWEEN 0 AND 9)"
    )
    op.execute("ALTER TABLE outbox ADD COLUMN recipient_domain text")
    op.execute("ALTER TABLE outbox ADD COLUMN recipient_key text")
    _fill_addresses()
    op.execute("ALTER TABLE outbox ALTER COLUMN recipient_domain SET NOT NULL")
    op.execute("ALTER TABLE outbox ALTER COLUMN recipient_key SET NOT NULL")

    op.execute("ALTER TABLE outbox DROP CONSTRAINT outbox_status_check")
    op.execute(
        f"ALTER TABLE outbox ADD CONSTRAINT outbox_status_check CHECK (status IN {STATUSES_AFTER})"
    )
    op.execute("ALTER TABLE outbox_attempts DROP CONSTRAINT outbox_attempts_outcome_check")
    op.execute(
        "ALTER TABLE outbox_attempts ADD CONSTRAINT outbox_attempts_outcome_check "
        f"CHECK (outcome IN {OUTCOMES_AFTER})"
    )

    # The claim's index, now in priority order. Still partial: only the live queue.
    op.execute("DROP INDEX outbox_claim_idx")
    op.execute(
        "CREATE INDEX outbox_claim_idx ON outbox (priority, next_attempt_at) "
        "WHERE status IN ('pending', 'sending')"
    )
    op.execute(
        "CREATE INDEX outbox_domain_claim_idx ON outbox (recipient_domain, priority, "
        "next_attempt_at) WHERE status IN ('pending', 'sending')"
    )
    op.execute(
        "CREATE INDEX outbox_in_flight_idx ON outbox (recipient_domain) WHERE status = 'sending'"
    )
    # Counted by `outbox status` and every /metrics scrape: never a scan of the history.
    op.execute("CREATE INDEX outbox_suppressed_idx ON outbox (id) WHERE status = 'suppressed'")

    op.execute(
        """
        CREATE TABLE outbox_policies (
            -- '' is all mail (the SMTP relay as a whole); anything else a recipient
            -- domain, A-label, lower case.
            domain         text PRIMARY KEY CHECK (domain = lower(domain)),
            paused         boolean NOT NULL DEFAULT false,
            -- At most this many mails of the scope being sent at once, fleet-wide.
            concurrency    integer CHECK (concurrency > 0),
            -- Adaptive throttle: a 421/450/451/454 reply halved the scope's rate to
            -- throttle_rate (mails per second) at throttled_at; it recovers linearly
            -- towards throttle_base. The throttle's own token bucket: throttle_tokens
            -- as of throttle_refreshed_at.
            throttle_rate          float8 CHECK (throttle_rate > 0),
            throttle_base          float8 CHECK (throttle_base > 0),
            throttled_at           timestamptz,
            throttle_tokens        float8,
            throttle_refreshed_at  timestamptz,
            updated_at     timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT outbox_policies_throttle_complete CHECK (
                (throttle_rate IS NULL) = (throttle_base IS NULL)
                AND (throttle_rate IS NULL) = (throttled_at IS NULL)
            )
        )
        """
    )
    op.execute(
        """
        CREATE TABLE outbox_rate_limits (
            domain        text NOT NULL REFERENCES outbox_policies (domain) ON DELETE CASCADE,
            per_seconds   integer NOT NULL CHECK (per_seconds > 0),
            max_count     integer NOT NULL CHECK (max_count > 0),
            -- The token bucket: at most burst tokens, refilled at max_count/per_seconds
            -- per second; tokens is the content as of refreshed_at.
            burst         float8 NOT NULL CHECK (burst >= 1),
            tokens        float8 NOT NULL,
            refreshed_at  timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (domain, per_seconds)
        )
        """
    )
    op.execute(
        """
        CREATE TABLE outbox_suppressions (
            -- dispatcher.addresses.email_key of the address: one row per mailbox.
            address_key  text PRIMARY KEY,
            address      text NOT NULL,
            -- 'smtp': the server refused the recipient permanently; 'operator'.
            source       text NOT NULL CHECK (source IN ('smtp', 'operator')),
            reason       text NOT NULL,
            -- The mail whose refusal suppressed it (NULL for an operator's entry).
            outbox_id    bigint,
            created_at   timestamptz NOT NULL DEFAULT now()
        )
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE outbox_suppressions")
    op.execute("DROP TABLE outbox_rate_limits")
    op.execute("DROP TABLE outbox_policies")
    op.execute("UPDATE outbox SET status = 'failed' WHERE status = 'suppressed'")
    op.execute("UPDATE outbox_attempts SET outcome = 'failed' WHERE outcome = 'suppressed'")
    op.execute("ALTER TABLE outbox_attempts DROP CONSTRAINT outbox_attempts_outcome_check")
    op.execute(
        "ALTER TABLE outbox_attempts ADD CONSTRAINT outbox_attempts_outcome_check "
        f"CHECK (outcome IN {OUTCOMES_BEFORE})"
    )
    op.execute("ALTER TABLE outbox DROP CONSTRAINT outbox_status_check")
    op.execute(
        f"ALTER TABLE outbox ADD CONSTRAINT outbox_status_check CHECK (status IN {STATUSES_BEFORE})"
    )
    op.execute("DROP INDEX outbox_in_flight_idx")
    op.execute("DROP INDEX outbox_suppressed_idx")
    op.execute("DROP INDEX outbox_domain_claim_idx")
    op.execute("DROP INDEX outbox_claim_idx")
    op.execute(
        "CREATE INDEX outbox_claim_idx ON outbox (next_attempt_at) "
        "WHERE status IN ('pending', 'sending')"
    )
    op.execute("ALTER TABLE outbox DROP COLUMN recipient_key")
    op.execute("ALTER TABLE outbox DROP COLUMN recipient_domain")
    op.execute("ALTER TABLE outbox DROP COLUMN priority")
