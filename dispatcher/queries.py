"""Every SQL statement of the queue, in one place.

The outbox is a queue with leases. A row moves
``pending -> sending -> sent | pending (retry) | failed``; ``cancelled`` is set by operators.
Only a claim moves a row into ``sending``, and every later change of a ``sending`` row is
guarded by the lease token the claim issued, so a dispatcher that lost its lease (it was
frozen, partitioned or presumed dead) can never overwrite what the new owner recorded.

All statements are parameterised ($1, $2, ...); none is built from user input. Some are
assembled at import from constant parts that several statements share.
"""

from outbox.dispatcher.policy import (
    HALVING_INTERVAL,
    MIN_THROTTLE_RATE,
    OBSERVED_SECONDS,
    RAMP_SECONDS,
    RECOVERY_SECONDS,
)

#: Channel the enqueueing transaction notifies; delivered to listeners at commit.
NOTIFY_CHANNEL = "outbox_mail"

# Insert one mail and wake the dispatchers in the same statement (one round trip).
# pg_notify runs inside the caller's transaction, so the wake-up is delivered only
# if, and when, the mail commits; its payload is the mail's priority (a dispatcher claims
# at once for mail more urgent than the default). $1..$11 are the mail (see
# outbox._mail_params): $9 its priority, $10 and $11 the recipient's domain (A-label,
# lower case: the scope its limits are set for) and mailbox key (what the suppression
# list is keyed by), computed in Python because IDNA and Unicode case folding are not
# SQL's. $12 is the enqueuing span's
# W3C traceparent, NULL when it is not traced (dispatcher.tracing).
ENQUEUE = """
WITH inserted AS (
    INSERT INTO outbox (message_id, sender, recipient, recipient_name, subject,
                        body_text, body_html, next_attempt_at, priority, recipient_domain,
                        recipient_key, trace_context)
    VALUES ($1, $2, $3, $4, $5, $6, $7, coalesce($8, now()), $9, $10, $11, $12)
    RETURNING id, created_at, priority
)
SELECT id, created_at, pg_notify('outbox_mail', priority::text) AS _  -- NOTIFY_CHANNEL
FROM inserted
"""

# ENQUEUE under the idempotency key $12 (parameters $1..$11 as in ENQUEUE, the
# traceparent $13): the key and the mail are stored together, or, when the key was used
# before, nothing is stored and no row comes back (the caller then reads
# ENQUEUED_UNDER_KEY). The primary key of outbox_keys decides: the key row is inserted
# first and the mail only if it was. A concurrent enqueue of the same key waits on the
# first one's uncommitted key row; if that commits, this one stores nothing, if it rolls
# back, it stores its own mail. The mail's id is drawn from outbox's identity sequence up
# front so that the key row can name it in the same statement (a conflict wastes one
# sequence value, as a rollback does).
ENQUEUE_KEYED = """
WITH fresh AS (
    INSERT INTO outbox_keys (key, outbox_id, message_id)
    VALUES ($12, nextval(pg_get_serial_sequence('outbox', 'id')), $1)
    ON CONFLICT (key) DO NOTHING
    RETURNING outbox_id
),
inserted AS (
    INSERT INTO outbox (id, message_id, sender, recipient, recipient_name, subject,
                        body_text, body_html, next_attempt_at, priority, recipient_domain,
                        recipient_key, idempotency_key, trace_context)
    OVERRIDING SYSTEM VALUE
    SELECT fresh.outbox_id, $1, $2, $3, $4, $5, $6, $7, coalesce($8::timestamptz, now()),
           $9::smallint, $10::text, $11::text, $12, $13::text
    FROM fresh
    RETURNING id, created_at, priority
)
SELECT id, created_at, pg_notify('outbox_mail', priority::text) AS _  -- NOTIFY_CHANNEL
FROM inserted
"""

# The mail key $1 made, after ENQUEUE_KEYED found the key taken. A separate statement: in
# READ COMMITTED it sees a key that a concurrent transaction committed while ENQUEUE_KEYED
# waited for it, which that statement's own snapshot cannot. The mail itself may have
# been pruned since; its key, id and Message-ID are kept.
ENQUEUED_UNDER_KEY = "SELECT outbox_id, message_id, created_at FROM outbox_keys WHERE key = $1"

# ENQUEUE fused with the business write it belongs to: one statement, so one round trip
# and atomic without an explicit transaction. A template (see outbox.enqueue_with): {write}
# is the caller's own constant single-row ``INSERT ... RETURNING ...`` with parameters
# $1..$n, never user input; {m1}..{m12} become $n+1..$n+12, the mail's parameters in
# ENQUEUE's order. The mail is inserted once per row the write returns: a write that
# stores nothing (ON CONFLICT DO NOTHING) queues nothing, and one that stores two rows
# fails on the unique message_id, so a mail exists exactly when its row does.
ENQUEUE_WITH = """
WITH written AS (
    {write}
),
inserted AS (
    INSERT INTO outbox (message_id, sender, recipient, recipient_name, subject,
                        body_text, body_html, next_attempt_at, priority, recipient_domain,
                        recipient_key, trace_context)
    SELECT ${m1}::text, ${m2}::text, ${m3}::text, ${m4}::text, ${m5}::text,
           ${m6}::text, ${m7}::text, coalesce(${m8}::timestamptz, now()), ${m9}::smallint,
           ${m10}::text, ${m11}::text, ${m12}::text
    FROM written
    RETURNING id, created_at, priority
)
SELECT written.*, inserted.id AS outbox_id, inserted.created_at AS outbox_created_at,
       pg_notify('outbox_mail', inserted.priority::text) AS outbox_notified  -- NOTIFY_CHANNEL
FROM written, inserted
"""

# --- Claim ------------------------------------------------------------------------------
# Take up to $1 due rows for dispatcher $2 and lease them for $3 seconds, most urgent
# first: in (priority, next_attempt_at) order, so a priority-0 mail enqueued behind any
# backlog of priority-5 mail is the next one claimed.
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
# trace_context comes back so that the dispatcher's spans continue the mail's trace;
# priority and recipient_domain for logs and for the throttle (dispatcher.limits), and
# suppressed when the recipient is on the suppression list: such a mail is recorded
# 'suppressed' without being sent.
#
# The statement is assembled from the parts below, which POLICED_CLAIM shares.

# The condition "o is due" (see above).
_DUE = """o.status IN ('pending', 'sending')
      AND o.next_attempt_at <= now()
      AND (
            o.status = 'pending'
         OR o.lease_expires_at <= now()
         OR NOT EXISTS (
                SELECT 1 FROM dispatchers d
                WHERE d.name = o.lease_owner
                  AND d.last_beat_at > now() - make_interval(secs => $4)
            )
      )"""

# What the lease step needs of each due row (priority and next_attempt_at: the order).
_DUE_COLUMNS = """o.id, o.status AS previous_status, o.lease_owner AS previous_owner,
    o.leased_at AS previous_leased_at, o.attempts AS previous_attempt,
    o.status = 'sending' AND o.abandons + 1 >= $5 AS poisoned,
    o.priority, o.next_attempt_at"""

# Everything after choosing the rows of the CTE ``due``: the abandoned attempts, the
# circuit breaker, the lease.
_LEASE_DUE = """
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
          o.lease_expires_at, o.trace_context, o.priority, o.recipient_domain,
          EXISTS (SELECT 1 FROM outbox_suppressions s
                  WHERE s.address_key = o.recipient_key) AS suppressed
"""


def _claim(condition: str = "") -> str:
    return f"""
WITH due AS (
    SELECT {_DUE_COLUMNS}
    FROM outbox o
    WHERE {_DUE}{condition}
    ORDER BY o.priority, o.next_attempt_at
    LIMIT $1
    FOR UPDATE OF o SKIP LOCKED
),{_LEASE_DUE}"""


CLAIM = _claim()

# CLAIM as dispatcher.limits.claim tries it first: the same, but nothing at all while any
# sending policy exists (then the policed claim decides). So a claim without policies is
# still one statement, one round trip. (An uncorrelated condition: evaluated once, before
# the scan, which it skips when false.)
CLAIM_UNLESS_POLICED = _claim("\n      AND NOT EXISTS (SELECT 1 FROM outbox_policies)")

# Seconds until the earliest pending mail is due (negative if one already is, NULL if
# none is pending): lets an idle dispatcher wake for a scheduled retry on time. Served by
# outbox_claim_idx ('pending' implies its predicate).
NEXT_DUE_IN = """
SELECT extract(epoch FROM min(next_attempt_at) - now()) FROM outbox WHERE status = 'pending'
"""

# --- Sending policy ---------------------------------------------------------------------
# Fleet-wide limits (see migration 0007 and dispatcher.limits): rate windows and the
# adaptive throttle are token buckets whose content is stored as of a time and refilled
# on reading, always with the database's clock, which every dispatcher shares (theirs may
# disagree). The expressions below are those buckets' arithmetic (dispatcher.policy has
# the same in Python); {clock} is the time to compute them for.


def _window_tokens(clock: str) -> str:
    """SQL: the tokens in rate window ``r`` at ``clock``, refilled since refreshed_at."""
    return f"""least(r.burst, r.tokens
                  + greatest(0, extract(epoch FROM {clock} - r.refreshed_at)::float8)
                    * r.max_count / r.per_seconds::float8)"""


def _throttle_rate(clock: str) -> str:
    """SQL: the effective rate of policy row ``p``'s throttle at ``clock`` (policy.
    effective_rate): throttle_rate growing by itself every RAMP_SECONDS; NULL once over."""
    return f"""(CASE WHEN p.throttled_at > {clock} - interval '{RECOVERY_SECONDS:g} seconds'
          THEN p.throttle_rate
               * (1 + greatest(0, extract(epoch FROM {clock} - p.throttled_at)::float8)
                      / {RAMP_SECONDS:g})
     END)"""


def _throttle_tokens(clock: str, rate: str) -> str:
    """SQL: the tokens in policy row ``p``'s throttle bucket at ``clock``, given its
    effective ``rate`` then (NULL when it is not throttled): refilled at that rate, holding
    one second's worth, at least one (policy.bucket_capacity). Refilling at the rate of the
    end of the interval gives a little more than the ramp's integral; claims come often,
    and the bucket's cap bounds the rest."""
    return f"""(CASE WHEN {rate} IS NOT NULL THEN least(
         greatest(1, {rate}),
         coalesce(p.throttle_tokens, 0)
         + greatest(0, extract(epoch FROM {clock}
                               - coalesce(p.throttle_refreshed_at, p.throttled_at))::float8)
           * {rate})
     END)"""


# Whether any scope has a policy (when CLAIM_UNLESS_POLICED found nothing): only then does
# dispatcher.limits.claim take the policed way. A cheap read of a tiny table.
POLICIES_EXIST = "SELECT EXISTS (SELECT 1 FROM outbox_policies)"

# Step (a) of a policed claim: lock every policy row, in one global order (no deadlocks
# between claimers). This serialises the policed claims of all dispatchers, so each one
# reads the buckets and the mail in flight as the previous one left them, and limits are
# exact fleet-wide. A statement of its own, before POLICY_STATE: in READ COMMITTED a
# statement reads the snapshot it started with, so one that waited here for the lock
# would still see the tokens and the 'sending' rows from before the previous claim.
LOCK_POLICIES = "SELECT domain FROM outbox_policies ORDER BY domain FOR UPDATE"

# The condition "o is in flight": 'sending' under a lease that is still honoured, the
# opposite of CLAIM's test, so that a dead dispatcher's rows, which the claim may take
# back, do not count (else they could hold a concurrency limit forever). $2 is the
# stale-after seconds.
_HONOURED_LEASE = """o.lease_expires_at > now()
          AND EXISTS (SELECT 1 FROM dispatchers d
                      WHERE d.name = o.lease_owner
                        AND d.last_beat_at > now() - make_interval(secs => $2))"""

# Step (b): the state of the locked scopes $1 (text[]), $2 stale-after seconds: for
# dispatcher.policy.allowance. One row per scope: paused, concurrency and the mail in
# flight (read only under a concurrency limit; all of it counted in one pass through
# outbox_in_flight_idx), the tokens of each rate window and the throttle's rate and
# tokens, refilled to ``clock`` (the statement's time, after the lock was granted: the
# previous claim's updates are in the past of it). throttle_expired: the throttle has
# run its course and is to be cleared (EXPIRE_THROTTLES).
POLICY_STATE = f"""
WITH clock AS (SELECT statement_timestamp() AS now),
in_flight AS (
    -- One pass over the mail being sent (a few hundred rows at most), not one per scope.
    SELECT o.recipient_domain AS domain, count(*) AS n
    FROM outbox o
    WHERE o.status = 'sending' AND {_HONOURED_LEASE}
    GROUP BY o.recipient_domain
),
windows AS (
    SELECT r.domain, array_agg({_window_tokens("clock.now")} ORDER BY r.per_seconds) AS tokens
    FROM clock CROSS JOIN outbox_rate_limits r
    WHERE r.domain = ANY($1::text[])
    GROUP BY r.domain
)
SELECT p.domain, p.paused, p.concurrency, clock.now AS clock,
       coalesce(w.tokens, '{{}}') AS window_tokens,
       t.rate AS throttle_rate,
       {_throttle_tokens("clock.now", "t.rate")} AS throttle_tokens,
       p.throttled_at IS NOT NULL AND t.rate IS NULL AS throttle_expired,
       CASE WHEN p.concurrency IS NULL THEN 0
            WHEN p.domain = '' THEN (SELECT coalesce(sum(n), 0) FROM in_flight)
            ELSE coalesce(f.n, 0)
       END AS in_flight
FROM clock
CROSS JOIN outbox_policies p
CROSS JOIN LATERAL (SELECT {_throttle_rate("clock.now")} AS rate) t
LEFT JOIN windows w ON w.domain = p.domain
LEFT JOIN in_flight f ON f.domain = p.domain
WHERE p.domain = ANY($1::text[])
ORDER BY p.domain
"""

# Clear the throttles of scopes $1 (text[]) that ran their course by $2 (POLICY_STATE's
# clock), under the claim's lock; a policy row that held nothing else is deleted, so that
# claims go back to plain CLAIM when no policy is left. (Two disjoint sets: one statement
# must not both update and delete a row.)
EXPIRE_THROTTLES = f"""
WITH expired AS (
    SELECT p.domain,
           NOT p.paused AND p.concurrency IS NULL
           AND NOT EXISTS (SELECT 1 FROM outbox_rate_limits r WHERE r.domain = p.domain)
               AS empty
    FROM outbox_policies p
    WHERE p.domain = ANY($1::text[])
      AND p.throttled_at <= $2::timestamptz - interval '{RECOVERY_SECONDS:g} seconds'
),
cleared AS (
    UPDATE outbox_policies p
    SET throttle_rate = NULL, throttle_base = NULL, throttled_at = NULL,
        throttle_tokens = NULL, throttle_refreshed_at = NULL, updated_at = now()
    FROM expired
    WHERE p.domain = expired.domain AND NOT expired.empty
)
DELETE FROM outbox_policies p
USING expired
WHERE p.domain = expired.domain AND expired.empty
"""

# Step (d): CLAIM under limits. $1..$5 as in CLAIM, $1 already cut to what all mail may
# take; $6 (text[]) every domain with a limit, $7/$8 (text[], integer[]) those that may
# take mail now and how much each. Candidates come two ways:
# - mail to domains without limits, through outbox_claim_idx in (priority,
#   next_attempt_at) order, skipping the limited domains' rows (a filter, not a wall:
#   a paused or saturated domain with any number of rows ahead costs a scan of them,
#   never a missed claim);
# - for each limited domain that may take mail, up to its allowance of its own due mail
#   through outbox_domain_claim_idx (a LATERAL index scan per domain).
# Only the $1 most urgent candidates are then locked (FOR UPDATE SKIP LOCKED, the due
# condition checked again on the locked row): locking every candidate would cost a row
# lock per limited domain for mail that is not taken. Policed claims take turns under
# the policy lock, so no other claim picks the same candidates meanwhile; a row someone
# else holds (an operator's cancel) is skipped.
# A paused or saturated domain is in $6 but not in $7: none of its rows is claimed, so
# none uses an attempt (nor is a dead dispatcher's row of it reclaimed until it resumes).
# Everything else is CLAIM's: reclaim, abandons, circuit breaker, lease, the same columns.
POLICED_CLAIM = f"""
WITH candidates AS (
    (SELECT o.id, o.priority, o.next_attempt_at
     FROM outbox o
     WHERE {_DUE}
       AND NOT (o.recipient_domain = ANY($6::text[]))
     ORDER BY o.priority, o.next_attempt_at
     LIMIT $1)
    UNION ALL
    SELECT picked.*
    FROM unnest($7::text[], $8::integer[]) AS p(domain, allowance)
    CROSS JOIN LATERAL (
        SELECT o.id, o.priority, o.next_attempt_at
        FROM outbox o
        WHERE o.recipient_domain = p.domain
          AND {_DUE}
        ORDER BY o.priority, o.next_attempt_at
        LIMIT least(p.allowance, $1)
    ) picked
),
chosen AS (
    SELECT id FROM candidates ORDER BY priority, next_attempt_at LIMIT $1
),
due AS (
    SELECT {_DUE_COLUMNS}
    FROM outbox o
    WHERE o.id IN (SELECT id FROM chosen)
      AND {_DUE}
    FOR UPDATE OF o SKIP LOCKED
),{_LEASE_DUE}"""

# Step (e): take $2[i] tokens from every rate window and from the throttle bucket of
# scope $1[i] (text[], integer[]: one per claimed mail to be sent, from its domain and
# from ''), refilled to $3, POLICY_STATE's clock, first. Under the claim's lock, so no
# other claim read these buckets in between.
_TAKEN_AT_RATE = _throttle_rate("$3::timestamptz")
TAKE_TOKENS = f"""
WITH taken AS (
    SELECT * FROM unnest($1::text[], $2::integer[]) AS t(domain, n)
),
windows AS (
    UPDATE outbox_rate_limits r
    SET tokens = {_window_tokens("$3::timestamptz")} - taken.n,
        refreshed_at = greatest(r.refreshed_at, $3::timestamptz)
    FROM taken
    WHERE r.domain = taken.domain
)
UPDATE outbox_policies p
SET throttle_tokens = {_throttle_tokens("$3::timestamptz", _TAKEN_AT_RATE)} - taken.n,
    throttle_refreshed_at = $3::timestamptz
FROM taken
WHERE p.domain = taken.domain
  AND p.throttled_at > $3::timestamptz - interval '{RECOVERY_SECONDS:g} seconds'
"""

# Adaptive throttling: the scopes $1 (text[], in order: the row locks are taken in it,
# so concurrent recorders cannot deadlock) got a "slow down" reply (policy.throttle_scope).
# Each one's rate is halved (policy.halved): the current effective rate if the scope is
# throttled already, else its slowest configured rate, else the rate it was observed to
# send at (policy.throttle_start); throttle_base keeps the rate it was halved from. At
# most once per HALVING_INTERVAL per scope: the check is in ON CONFLICT's WHERE, which
# sees the latest row under its lock, so concurrent recorders halve a scope once between
# them. The throttle's bucket starts empty. The
# observed rate counts attempts through outbox_attempts_finished_at_idx, and only for a
# scope that is neither throttled nor configured (COALESCE evaluates lazily).
# Returns the scopes halved now, with their new rate.
THROTTLE = f"""
WITH clock AS (SELECT statement_timestamp() AS now),
scope AS (
    SELECT s.domain, {_throttle_rate("clock.now")} AS current
    FROM clock
    CROSS JOIN unnest($1::text[]) AS s(domain)
    LEFT JOIN outbox_policies p ON p.domain = s.domain
    WHERE p.throttled_at IS NULL
       OR p.throttled_at <= clock.now - interval '{HALVING_INTERVAL:g} seconds'
),
start AS (
    SELECT scope.domain,
           coalesce(
               scope.current,
               (SELECT min(r.max_count / r.per_seconds::float8) FROM outbox_rate_limits r
                WHERE r.domain = scope.domain),
               greatest(1, (CASE WHEN scope.domain = '' THEN (
                                SELECT count(*) FROM outbox_attempts a
                                WHERE a.finished_at
                                      > clock.now - interval '{OBSERVED_SECONDS:g} seconds')
                            ELSE (
                                SELECT count(*) FROM outbox_attempts a
                                JOIN outbox o ON o.id = a.outbox_id
                                WHERE a.finished_at
                                      > clock.now - interval '{OBSERVED_SECONDS:g} seconds'
                                  AND o.recipient_domain = scope.domain)
                            END) / {OBSERVED_SECONDS:g}::float8)
           ) AS rate
    FROM clock, scope
)
INSERT INTO outbox_policies AS p (domain, throttle_rate, throttle_base, throttled_at,
                                  throttle_tokens, throttle_refreshed_at, updated_at)
SELECT start.domain, greatest({MIN_THROTTLE_RATE!r}::float8, start.rate / 2), start.rate,
       clock.now, 0, clock.now, clock.now
FROM clock, start
ORDER BY start.domain
ON CONFLICT (domain) DO UPDATE
SET throttle_rate = greatest({MIN_THROTTLE_RATE!r}::float8,
                             coalesce({_throttle_rate("excluded.throttled_at")},
                                      excluded.throttle_base) / 2),
    throttle_base = coalesce({_throttle_rate("excluded.throttled_at")}, excluded.throttle_base),
    throttled_at = excluded.throttled_at,
    throttle_tokens = 0,
    throttle_refreshed_at = excluded.throttled_at,
    updated_at = excluded.updated_at
WHERE p.throttled_at IS NULL
   OR p.throttled_at <= excluded.throttled_at - interval '{HALVING_INTERVAL:g} seconds'
RETURNING p.domain, p.throttle_rate
"""

# Every scope's policy as configured and as it stands, for `outbox limit list` and the
# admin page: paused, concurrency and the mail in flight ('sending'), the rate windows
# (per_seconds, max_count, burst and the tokens they hold now, in per_seconds order),
# the throttle's columns and the database's ``now``. The throttle's effective rate is
# policy.effective_rate(throttle_rate, throttled_at, now) (None when it has
# recovered), and the rate the scope may send at policy.limiting_rate(...).
LIST_POLICIES = f"""
SELECT p.domain, p.paused, p.concurrency,
       CASE WHEN p.domain = '' THEN (SELECT count(*) FROM outbox WHERE status = 'sending')
            ELSE (SELECT count(*) FROM outbox o
                  WHERE o.status = 'sending' AND o.recipient_domain = p.domain)
       END AS in_flight,
       coalesce(w.per_seconds, '{{}}') AS per_seconds,
       coalesce(w.max_counts, '{{}}') AS max_counts,
       coalesce(w.bursts, '{{}}') AS bursts,
       coalesce(w.tokens, '{{}}') AS tokens,
       p.throttle_rate, p.throttle_base, p.throttled_at, now() AS now
FROM outbox_policies p
LEFT JOIN LATERAL (
    SELECT array_agg(r.per_seconds ORDER BY r.per_seconds) AS per_seconds,
           array_agg(r.max_count ORDER BY r.per_seconds) AS max_counts,
           array_agg(r.burst ORDER BY r.per_seconds) AS bursts,
           array_agg({_window_tokens("now()")} ORDER BY r.per_seconds) AS tokens
    FROM outbox_rate_limits r
    WHERE r.domain = p.domain
) w ON true
ORDER BY p.domain
"""

# --- Record outcomes ----------------------------------------------------------------------
# Record a batch of send outcomes in one statement (arrays, one element per mail).
# Each row changes only if it is still 'sending' under the lease token we were given: a
# dispatcher whose lease was taken over changes nothing. Its attempt is still written to
# the history, flagged lease_lost, because the SMTP server may really have accepted it.
#
# outcome: 'sent' | 'failed' | 'suppressed' (the recipient is on the suppression list:
# not sent; the status says so, the error why) | 'deferred' or 'unknown' (back to pending
# after retry_in seconds; 'unknown' when the server had the whole message but its reply
# never came). smtp_stage: the last SMTP step the attempt began (see dispatcher.smtp.Stage).
#
# A permanent refusal of the recipient (a 5xx reply to RCPT; 552 there counts as 452, a
# 'deferred') puts the address on the suppression list in the same statement, so no later
# mail goes to a mailbox that does not exist. Only when the lease held: the new owner of a
# row taken over records its own verdict. DISTINCT ON: two refused mails to one address
# in one batch make one entry (ON CONFLICT DO NOTHING keeps an older one, an operator's).
RECORD = """
WITH outcome AS (
    SELECT *
    FROM unnest($1::bigint[], $2::uuid[], $3::integer[], $4::text[], $5::smallint[],
                $6::text[], $7::text[], $8::timestamptz[], $9::timestamptz[], $10::float8[],
                $12::text[])
         AS t(id, token, attempt, outcome, smtp_code, smtp_reply, error, started_at,
              finished_at, retry_in, smtp_stage)
),
-- The rows' locks, taken in id order (LOCK_FOR_RECORD's order): two dispatchers that
-- record outcomes for the same rows (one of them after losing its lease) queue behind
-- each other instead of deadlocking. The update below changes only rows it gets from
-- here, so it never takes a row's lock out of that order.
locked AS (
    SELECT o.id FROM outbox o WHERE o.id = ANY($1::bigint[]) ORDER BY o.id FOR UPDATE
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
    FROM outcome JOIN locked ON locked.id = outcome.id
    WHERE o.id = outcome.id AND o.lease_token = outcome.token AND o.status = 'sending'
    RETURNING o.id, o.recipient, o.recipient_key
),
refused AS (
    INSERT INTO outbox_suppressions (address_key, address, source, reason, outbox_id)
    SELECT DISTINCT ON (updated.recipient_key)
           updated.recipient_key, updated.recipient, 'smtp',
           concat_ws(' ', outcome.smtp_code, outcome.smtp_reply), outcome.id
    FROM outcome JOIN updated ON updated.id = outcome.id
    WHERE outcome.outcome = 'failed' AND outcome.smtp_stage = 'rcpt'
      AND outcome.smtp_code BETWEEN 500 AND 599
    ORDER BY updated.recipient_key, outcome.id
    ON CONFLICT (address_key) DO NOTHING
)
INSERT INTO outbox_attempts (outbox_id, attempt, dispatcher, started_at, finished_at,
                             outcome, smtp_code, smtp_reply, error, lease_lost, smtp_stage)
SELECT outcome.id, outcome.attempt, $11, outcome.started_at, outcome.finished_at,
       outcome.outcome, outcome.smtp_code, outcome.smtp_reply, outcome.error,
       updated.id IS NULL, outcome.smtp_stage
FROM outcome LEFT JOIN updated ON updated.id = outcome.id
-- Idempotent: if a commit's acknowledgement was lost and the batch is recorded again, the
-- attempts already written are not written twice (outbox_attempts_key_idx, migration 0008).
ON CONFLICT (outbox_id, attempt, dispatcher, started_at, outcome) DO NOTHING
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

# Probe of the LISTEN connection: a connection that says nothing may be dead.
PROBE = "SELECT 1"

# Forget dispatchers that have not been seen for a day (kept that long for `outbox status`).
FORGET_GONE_DISPATCHERS = "DELETE FROM dispatchers WHERE last_beat_at < now() - interval '1 day'"
