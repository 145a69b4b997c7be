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
# if, and when, the mail commits. $9 is the enqueuing span's W3C traceparent, NULL when
# it is not traced (dispatcher.tracing).
ENQUEUE = """
WITH inserted AS (
    INSERT INTO outbox (message_id, sender, recipient, recipient_name, subject,
                        body_text, body_html, next_attempt_at, trace_context)
    VALUES ($1, $2, $3, $4, $5, $6, $7, coalesce($8, now()), $9)
    RETURNING id, created_at
)
SELECT id, created_at, pg_notify('outbox_mail', '') AS _ FROM inserted  -- NOTIFY_CHANNEL
"""

# ENQUEUE under the idempotency key $9 (parameters $1..$8 as in ENQUEUE, the traceparent
# $10): the key and the mail are stored together, or, when the key was used before,
# nothing is stored and no row comes back (the caller then reads ENQUEUED_UNDER_KEY). The
# primary key of outbox_keys decides: the key row is inserted first and the mail only if
# it was. A concurrent enqueue of the same key waits on the first one's uncommitted key
# row; if that commits, this one stores nothing, if it rolls back, it stores its own mail.
# The mail's id is drawn from outbox's identity sequence up front so that the key row can
# name it in the same statement (a conflict wastes one sequence value, as a rollback does).
ENQUEUE_KEYED = """
WITH fresh AS (
    INSERT INTO outbox_keys (key, outbox_id, message_id)
    VALUES ($9, nextval(pg_get_serial_sequence('outbox', 'id')), $1)
    ON CONFLICT (key) DO NOTHING
    RETURNING outbox_id
),
inserted AS (
    INSERT INTO outbox (id, message_id, sender, recipient, recipient_name, subject,
                        body_text, body_html, next_attempt_at, idempotency_key, trace_context)
    OVERRIDING SYSTEM VALUE
    SELECT fresh.outbox_id, $1, $2, $3, $4, $5, $6, $7, coalesce($8::timestamptz, now()), $9,
           $10::text
    FROM fresh
    RETURNING id, created_at
)
SELECT id, created_at, pg_notify('outbox_mail', '') AS _ FROM inserted  -- NOTIFY_CHANNEL
"""

# The mail key $1 made, after ENQUEUE_KEYED found the key taken. A separate statement: in
# READ COMMITTED it sees a key that a concurrent transaction committed while ENQUEUE_KEYED
# waited for it, which that statement's own snapshot cannot. The mail itself may have
# been pruned since; its key, id and Message-ID are kept.
ENQUEUED_UNDER_KEY = "SELECT outbox_id, message_id, created_at FROM outbox_keys WHERE key = $1"

# ENQUEUE fused with the business write it belongs to: one statement, so one round trip
# and atomic without an explicit transaction. A template (see outbox.enqueue_with): {write}
# is the caller's own constant single-row ``INSERT ... RETURNING ...`` with parameters
# $1..$n, never user input; {m1}..{m9} become $n+1..$n+9, the mail's parameters in
# ENQUEUE's order. The mail is inserted once per row the write returns: a write that
# stores nothing (ON CONFLICT DO NOTHING) queues nothing, and one that stores two rows
# fails on the unique message_id, so a mail exists exactly when its row does.
ENQUEUE_WITH = """
WITH written AS (
    {write}
),
inserted AS (
    INSERT INTO outbox (message_id, sender, recipient, recipient_name, subject,
                        body_text, body_html, next_attempt_at, trace_context)
    SELECT ${m1}::text, ${m2}::text, ${m3}::text, ${m4}::text, ${m5}::text,
           ${m6}::text, ${m7}::text, coalesce(${m8}::timestamptz, now()), ${m9}::text
    FROM written
    RETURNING id, created_at
)
SELECT written.*, inserted.id AS outbox_id, inserted.created_at AS outbox_created_at,
       pg_notify('outbox_mail', '') AS outbox_notified  -- NOTIFY_CHANNEL
FROM written, inserted
"""

# --- Claim ------------------------------------------------------------------------------
# Take up to $1 due rows for dispatcher $2 and lease them for $3 seconds.
#
# Due means: 'pending' with next_attempt_at in the past, or 'sending' whose lease is no
# longer honoured (it expired, or its owner has not heartbeated for $4 seconds: it was
# killed, frozen or cut off). A 'sending' row keeps the next_attempt_at it was claimed at,
# which is in the past, so both kinds come from one range scan of outbox_claim_idx.
#
# The row lock is taken in a CTE with LIMIT so the planner cannot lock (or update) more
# rows than asked, and SKIP LOCKED lets any number of dispatchers claim concurrently,
# each getting different rows, without waiting on one another.
#
# A reclaimed 'sending' row gets an 'abandoned' attempt in its history, so the audit
# trail shows the attempt that never reported back, and its ``abandons`` count goes up.
# The circuit breaker: a row abandoned for the $5th time is 'failed' instead of claimed.
# Something about it takes down every dispatcher that tries it (no mail should, but a
# poison row must not go round the fleet forever, holding up a slot each time).
#
# trace_context comes back so that the dispatcher's spans continue the mail's trace.
CLAIM = """
WITH due AS (
    SELECT o.id, o.status AS previous_status, o.lease_owner AS previous_owner,
           o.leased_at AS previous_leased_at, o.attempts AS previous_attempt,
           o.status = 'sending' AND o.abandons + 1 >= $5 AS poisoned
    FROM outbox o
    WHERE o.status IN ('pending', 'sending')
      AND o.next_attempt_at <= now()
      AND (
            o.status = 'pending'
         OR o.lease_expires_at <= now()
         OR NOT EXISTS (
                SELECT 1 FROM dispatchers d
                WHERE d.name = o.lease_owner
                  AND d.last_beat_at > now() - make_interval(secs => $4)
            )
      )
    ORDER BY o.next_attempt_at
    LIMIT $1
    FOR UPDATE OF o SKIP LOCKED
),
abandoned AS (
    INSERT INTO outbox_attempts (outbox_id, attempt, dispatcher, started_at, finished_at,
                                 outcome, error)
    SELECT id, previous_attempt, previous_owner, previous_leased_at, now(), 'abandoned',
           'no outcome recorded: the lease expired or the dispatcher stopped heartbeating'
    FROM due
    WHERE previous_status = 'sending'
),
poisoned AS (
    UPDATE outbox o
    SET status = 'failed', abandons = o.abandons + 1,
        lease_owner = NULL, lease_token = NULL, leased_at = NULL, lease_expires_at = NULL,
        last_error = format('abandoned %s times: every dispatcher that took it stopped '
                            'before recording an outcome', o.abandons + 1),
        updated_at = now()
    FROM due
    WHERE o.id = due.id AND due.poisoned
)
UPDATE outbox o
SET status = 'sending',
    lease_owner = $2,
    lease_token = gen_random_uuid(),
    leased_at = now(),
    lease_expires_at = now() + make_interval(secs => $3),
    attempts = o.attempts + 1,
    abandons = o.abandons + (due.previous_status = 'sending')::integer,
    updated_at = now()
FROM due
WHERE o.id = due.id AND NOT due.poisoned
RETURNING o.id, o.message_id, o.sender, o.recipient, o.recipient_name, o.subject,
          o.body_text, o.body_html, o.created_at, o.attempts, o.lease_token,
          o.lease_expires_at, o.trace_context
"""

# Seconds until the earliest pending mail is due (negative if one already is, NULL if
# none is pending): lets an idle dispatcher wake for a scheduled retry on time. Served by
# outbox_claim_idx ('pending' implies its predicate).
NEXT_DUE_IN = """
SELECT extract(epoch FROM min(next_attempt_at) - now()) FROM outbox WHERE status = 'pending'
"""

# --- Record outcomes ----------------------------------------------------------------------
# Record a batch of send outcomes in one statement (arrays, one element per mail).
# Each row changes only if it is still 'sending' under the lease token we were given: a
# dispatcher whose lease was taken over changes nothing. Its attempt is still written to
# the history, flagged lease_lost, because the SMTP server may really have accepted it.
#
# outcome: 'sent' | 'failed' | 'deferred' or 'unknown' (back to pending after retry_in
# seconds; 'unknown' when the server had the whole message but its reply never came).
# smtp_stage: the last SMTP step the attempt began (see dispatcher.smtp.Stage).
RECORD = """
WITH outcome AS (
    SELECT *
    FROM unnest($1::bigint[], $2::uuid[], $3::integer[], $4::text[], $5::smallint[],
                $6::text[], $7::text[], $8::timestamptz[], $9::timestamptz[], $10::float8[],
                $12::text[])
         AS t(id, token, attempt, outcome, smtp_code, smtp_reply, error, started_at,
              finished_at, retry_in, smtp_stage)
),
updated AS (
    UPDATE outbox o
    SET status = CASE WHEN outcome.outcome IN ('deferred', 'unknown') THEN 'pending'
                      ELSE outcome.outcome END,
        sent_at = CASE WHEN outcome.outcome = 'sent' THEN outcome.finished_at END,
        next_attempt_at = CASE WHEN outcome.outcome IN ('deferred', 'unknown')
                               THEN now() + make_interval(secs => outcome.retry_in)
                               ELSE o.next_attempt_at END,
        lease_owner = NULL, lease_token = NULL, leased_at = NULL, lease_expires_at = NULL,
        last_smtp_code = outcome.smtp_code,
        last_error = CASE WHEN outcome.outcome = 'sent' THEN NULL
                          ELSE coalesce(outcome.error, outcome.smtp_reply) END,
        updated_at = now()
    FROM outcome
    WHERE o.id = outcome.id AND o.lease_token = outcome.token AND o.status = 'sending'
    RETURNING o.id
)
INSERT INTO outbox_attempts (outbox_id, attempt, dispatcher, started_at, finished_at,
                             outcome, smtp_code, smtp_reply, error, lease_lost, smtp_stage)
SELECT outcome.id, outcome.attempt, $11, outcome.started_at, outcome.finished_at,
       outcome.outcome, outcome.smtp_code, outcome.smtp_reply, outcome.error,
       updated.id IS NULL, outcome.smtp_stage
FROM outcome LEFT JOIN updated ON updated.id = outcome.id
-- Idempotent: if a commit's acknowledgement was lost and the batch is recorded again,
-- the attempts already written are not written twice.
WHERE NOT EXISTS (
    SELECT 1 FROM outbox_attempts a
    WHERE a.outbox_id = outcome.id AND a.attempt = outcome.attempt
      AND a.dispatcher = $11 AND a.started_at = outcome.started_at
)
RETURNING outbox_id, lease_lost
"""

# Lock the rows a recording transaction is about to change, in id order. Two dispatchers
# may record outcomes for the same rows (one of them after losing its lease); taking the
# row locks in one global order means they queue behind each other instead of deadlocking.
LOCK_FOR_RECORD = "SELECT id FROM outbox WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE"

# Hand claimed rows back unsent (shutdown, or a lease we no longer trust): pending again,
# due now, and the attempt the claim counted is given back because none was made.
RELEASE = """
UPDATE outbox o
SET status = 'pending', attempts = o.attempts - 1,
    lease_owner = NULL, lease_token = NULL, leased_at = NULL, lease_expires_at = NULL,
    next_attempt_at = now(), updated_at = now()
FROM unnest($1::bigint[], $2::uuid[]) AS t(id, token)
WHERE o.id = t.id AND o.lease_token = t.token AND o.status = 'sending'
RETURNING o.id
"""

# Release rows leased to dispatcher $1 other than the ids $2 it knows it holds: they come
# from a claim that committed while its connection died, so nobody is sending them.
RELEASE_UNKNOWN = """
UPDATE outbox
SET status = 'pending', attempts = attempts - 1,
    lease_owner = NULL, lease_token = NULL, leased_at = NULL, lease_expires_at = NULL,
    next_attempt_at = now(), updated_at = now()
WHERE status = 'sending' AND lease_owner = $1 AND NOT (id = ANY($2::bigint[]))
RETURNING id
"""

# --- Dispatcher liveness -------------------------------------------------------------------
# Register dispatcher $1 (host $2, pid $3), or take the name over from an instance that
# stopped beating $5 seconds ago. Returns no row when a live dispatcher holds the name.
REGISTER = """
INSERT INTO dispatchers AS d (name, hostname, pid, started_at, last_beat_at)
VALUES ($1, $2, $3, now(), now())
ON CONFLICT (name) DO UPDATE
SET hostname = excluded.hostname, pid = excluded.pid, started_at = now(), last_beat_at = now()
WHERE d.last_beat_at <= now() - make_interval(secs => $5)
   OR $4::boolean  -- force: the caller saw the holder's process is gone
RETURNING name
"""

# Who holds the name $1 now (for the error message when REGISTER returned nothing).
NAME_HOLDER = "SELECT hostname, pid, last_beat_at FROM dispatchers WHERE name = $1"

# On start-up: rows still leased under our name belong to a previous run of this name,
# which is dead (names are unique among live dispatchers). Take them back right away
# instead of waiting for their leases to expire.
RECLAIM_PREDECESSOR = """
WITH orphans AS (
    SELECT id, attempts, leased_at, abandons + 1 >= $2 AS poisoned FROM outbox
    WHERE status = 'sending' AND lease_owner = $1
    ORDER BY id
    FOR UPDATE
),
history AS (
    INSERT INTO outbox_attempts (outbox_id, attempt, dispatcher, started_at, finished_at,
                                 outcome, error)
    SELECT id, attempts, $1, leased_at, now(), 'abandoned',
           'no outcome recorded: the dispatcher restarted'
    FROM orphans
)
UPDATE outbox o
SET status = CASE WHEN orphans.poisoned THEN 'failed' ELSE 'pending' END,
    abandons = o.abandons + 1,
    last_error = CASE WHEN orphans.poisoned
                      THEN format('abandoned %s times: every dispatcher that took it '
                                  'stopped before recording an outcome', o.abandons + 1)
                      ELSE o.last_error END,
    lease_owner = NULL, lease_token = NULL, leased_at = NULL,
    lease_expires_at = NULL, next_attempt_at = now(), updated_at = now()
FROM orphans WHERE o.id = orphans.id
RETURNING o.id
"""

# Heartbeat of dispatcher $1, with its SMTP health: $2 is the error that keeps it from
# reaching its SMTP server (NULL when it can), shown by `outbox status`.
HEARTBEAT = """
UPDATE dispatchers
SET last_beat_at = now(),
    smtp_error = $2,
    smtp_unreachable_since = CASE WHEN $2::text IS NULL THEN NULL
                                  ELSE coalesce(smtp_unreachable_since, now()) END
WHERE name = $1
RETURNING name
"""

DEREGISTER = "DELETE FROM dispatchers WHERE name = $1"

# Forget dispatchers that have not been seen for a day (kept that long for `outbox status`).
FORGET_GONE_DISPATCHERS = "DELETE FROM dispatchers WHERE last_beat_at < now() - interval '1 day'"
