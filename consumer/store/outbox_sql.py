"""The statements of the outbox publisher (``consumer/stream/outbox.py``), all run on the lease
connection: each is set-based, over arrays, one round trip."""

from __future__ import annotations

from collections.abc import Sequence
from uuid import UUID

import asyncpg

PUBLISHER_LOCK_KEY = 0x6D696C6570756221  # "milepub!"

TRY_LEASE = "SELECT pg_try_advisory_lock($1)"

# Step 3, one statement ($2 is the topic): pick the oldest pending rows, then among them
# - those the read-back saw on the topic before they had a record (``publisher_unrecorded``:
#   the database was restored, a replay recorded them again) are marked published from there,
#   not sent again, and their entries removed;
# - those of mentors who opted out since they were recorded are suppressed;
# - those an operator set back to pending lose their ``awaiting_resend`` mark now, before the
#   send, so that from here on a copy found by a read-back is this send's;
# the rest is returned, to be sent, each row with the counts of the first two (one row of
# counts alone when nothing is left to send). Only the picked rows are looked at: a round's
# cost does not grow with the number of pending rows. The three updates touch disjoint rows
# (Postgres does not let one statement update a row twice).
SELECT_PENDING = """
WITH picked AS (
    SELECT n.id, n.user_id, n.organization_id, n.year, n.milestone_value, n.session_count,
           n.activity_id, n.reached_at, n.created_at, n.awaiting_resend
    FROM scenario_notifications n
    WHERE n.status = 'pending' AND n.scenario_type = 'milestone'
    ORDER BY n.created_at, n.user_id, n.year, n.milestone_value
    LIMIT $1
), seen AS (
    UPDATE scenario_notifications n
    SET status = 'published', published_at = now(),
        published_partition = u.partition, published_offset = u."offset"
    FROM picked JOIN publisher_unrecorded u ON u.notification_id = picked.id AND u.topic = $2
    WHERE n.id = picked.id AND NOT picked.awaiting_resend
    RETURNING n.id
), forgotten AS (
    DELETE FROM publisher_unrecorded u USING seen WHERE u.notification_id = seen.id
), suppressed AS (
    UPDATE scenario_notifications n
    SET status = 'suppressed', suppressed_reason = 'opted_out_before_send'
    FROM picked, mentor_preferences p
    WHERE n.id = picked.id AND picked.id NOT IN (SELECT id FROM seen)
      AND p.mentor_id = picked.user_id AND NOT p.milestone_notifications
    RETURNING n.id
), resending AS (
    UPDATE scenario_notifications n SET awaiting_resend = false
    FROM picked
    WHERE n.id = picked.id AND picked.awaiting_resend
      AND picked.id NOT IN (SELECT id FROM suppressed)
)
SELECT counts.suppressed, counts.seen, sendable.*
FROM (SELECT (SELECT count(*) FROM suppressed) AS suppressed,
             (SELECT count(*) FROM seen) AS seen) AS counts
LEFT JOIN LATERAL (
    SELECT picked.* FROM picked
    WHERE picked.id NOT IN (SELECT id FROM suppressed)
      AND picked.id NOT IN (SELECT id FROM seen)
) AS sendable ON true
ORDER BY sendable.created_at, sendable.user_id, sendable.year, sendable.milestone_value
"""

# Step 5: the acknowledged rows, with their position; answers how long the oldest row marked
# waited, by the database clock (the metric milestones_notification_latency_seconds): one row
# back, no per-notification work in Python.
MARK_SENT = """
WITH marked AS (
    UPDATE scenario_notifications n
    SET status = 'published', published_at = now(),
        published_partition = s.sent_partition, published_offset = s.sent_offset
    FROM unnest($1::uuid[], $2::int[], $3::bigint[]) AS s(id, sent_partition, sent_offset)
    WHERE n.id = s.id AND n.status = 'pending'
    RETURNING n.created_at
)
SELECT extract(epoch FROM now() - min(created_at))::float8 FROM marked
"""

# Step 2, per chunk of what the read-back read ($4 is the topic): the pending rows found are
# marked published (not one an operator set back to pending and the publisher has not sent
# again since: its copy here is the earlier one), and the notifications without a record are
# kept in ``publisher_unrecorded``. Run in one transaction with SET_POSITIONS.
SETTLE_FOUND = """
WITH found AS (
    SELECT * FROM unnest($1::uuid[], $2::int[], $3::bigint[]) AS s(id, sent_partition, sent_offset)
), marked AS (
    UPDATE scenario_notifications n
    SET status = 'published', published_at = now(),
        published_partition = found.sent_partition, published_offset = found.sent_offset
    FROM found
    WHERE n.id = found.id AND n.status = 'pending' AND NOT n.awaiting_resend
    RETURNING n.id
), unrecorded AS (
    INSERT INTO publisher_unrecorded AS u (notification_id, topic, partition, "offset")
    SELECT found.id, $4, found.sent_partition, found.sent_offset
    FROM found
    WHERE NOT EXISTS (SELECT FROM scenario_notifications n WHERE n.id = found.id)
    ON CONFLICT (notification_id) DO UPDATE
    SET topic = excluded.topic, partition = excluded.partition, "offset" = excluded."offset"
    RETURNING u.notification_id
)
SELECT (SELECT count(*) FROM marked) AS marked, (SELECT count(*) FROM unrecorded) AS unrecorded
"""

READ_POSITIONS = "SELECT partition, next_offset FROM publisher_positions WHERE topic = $1"

# Where the read-back has read each partition to, saved with each chunk: where the next one
# starts, lower than before too (the topic was deleted and created again, or truncated).
SET_POSITIONS = """
INSERT INTO publisher_positions AS p (topic, partition, next_offset)
SELECT $1, * FROM unnest($2::int[], $3::bigint[])
ON CONFLICT (topic, partition) DO UPDATE SET next_offset = excluded.next_offset
"""

ADVANCE_POSITIONS = """
INSERT INTO publisher_positions AS p (topic, partition, next_offset)
SELECT $1, * FROM unnest($2::int[], $3::bigint[])
ON CONFLICT (topic, partition) DO UPDATE
SET next_offset = greatest(p.next_offset, excluded.next_offset)
"""


_STILL_PENDING = """
SELECT count(*)::int FROM scenario_notifications WHERE id = ANY($1::uuid[]) AND status = 'pending'
"""


async def still_pending(pool: asyncpg.Pool, ids: Sequence[UUID]) -> int:
    """How many of ``ids`` are still waiting to be sent."""
    return int(await pool.fetchval(_STILL_PENDING, list(ids)))
