"""Every SQL statement of the queue, in one place.

The outbox is a queue with leases. A row moves
``pending -> sending -> sent | pending (retry) | failed``; ``cancelled`` is set by operators.
Only a claim moves a row into ``sending``, and every later change of a ``sending`` row is
guarded by the lease token the claim issued, so a dispatcher that lost its lease (it was
frozen, partitioned or presumed dead) can never overwrite what the new owner recorded.

All statements are parameterised ($1, $2, ...); none is built from user input.
"""

#: Channel the enqueueing transaction notifies; delivered to listeners at commit.
NOTIFY_CHANNEL = "outbox_mail"

# Insert one mail and wake the dispatchers in the same statement (one round trip).
# pg_notify runs inside the caller's transaction, so the wake-up is delivered only
# if, and when, the mail commits.
ENQUEUE = """
WITH inserted AS (
    INSERT INTO outbox (message_id, sender, recipient, recipient_name, subject,
                        body_text, body_html, next_attempt_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, coalesce($8, now()))
    RETURNING id, created_at
)
SELECT id, created_at, pg_notify('outbox_mail', '') AS _ FROM inserted  -- NOTIFY_CHANNEL
"""
