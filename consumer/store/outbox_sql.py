"""The statements of the outbox publisher (``consumer/stream/outbox.py``), all run on the lease
connection: each is set-based, over arrays, one round trip."""

from __future__ import annotations

PUBLISHER_LOCK_KEY = 0x6D696C6570756221  # "milepub!"

TRY_LEASE = "SELECT pg_try_advisory_lock($1)"

# Step 3: the oldest pending rows are picked, and those of mentors who opted out since they
# were recorded are suppressed instead of returned. Only the picked rows are checked: the
# round's cost does not grow with the number of pending rows.
SELECT_PENDING = """
WITH picked AS (
    SELECT n.id, n.user_id, n.organization_id, n.year, n.milestone_value, n.session_count,
           n.activity_id, n.reached_at, n.created_at
    FROM scenario_notifications n
    WHERE n.status = 'pending' AND n.scenario_type = 'milestone'
    ORDER BY n.created_at, n.user_id, n.year, n.milestone_value
    LIMIT $1
), suppressed AS (
    UPDATE scenario_notifications n
    SET status = 'suppressed', suppressed_reason = 'opted_out_before_send'
    FROM picked, mentor_preferences p
    WHERE n.id = picked.id AND n.status = 'pending'
      AND p.mentor_id = picked.user_id AND NOT p.milestone_notifications
    RETURNING n.id
)
SELECT picked.*, (SELECT count(*) FROM suppressed) AS suppressed
FROM picked
WHERE picked.id NOT IN (SELECT id FROM suppressed)
ORDER BY picked.created_at, picked.user_id, picked.year, picked.milestone_value
"""

# Step 5, and the read-back: the rows found on the topic (or acknowledged) with their position.
_MARK = """
UPDATE scenario_notifications n
SET status = 'published', published_at = now(),
    published_partition = s.sent_partition, published_offset = s.sent_offset
FROM unnest($1::uuid[], $2::int[], $3::bigint[]) AS s(id, sent_partition, sent_offset)
WHERE n.id = s.id AND n.status = 'pending'
"""
MARK_PUBLISHED = _MARK + "RETURNING n.id"

# Step 5 of a round: marks, and answers how long the oldest row marked waited, by the
# database clock (the metric milestones_notification_latency_seconds): one row back, no
# per-notification work in Python.
MARK_SENT = f"""
WITH marked AS ({_MARK} RETURNING n.created_at)
SELECT extract(epoch FROM now() - min(created_at))::float8 FROM marked
"""

RECORDED_AMONG = "SELECT id FROM scenario_notifications WHERE id = ANY($1::uuid[])"

READ_POSITIONS = "SELECT partition, next_offset FROM publisher_positions WHERE topic = $1"

# The read-back has read each partition to its high watermark: that is where the next one
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
