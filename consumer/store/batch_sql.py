"""The batch transaction's statements. Each takes arrays (one element per row, sorted by key).

Row-lock order, kept by every writer (batch, sweep, publisher): mentor_preferences by mentor_id,
activity_ledger by activity_id, annual_summary by (user_id, year), scenario_notifications by
(user_id, scenario_type, year, milestone_value).
"""

# Latest changed_at wins; on a tie, opted out wins. Older changes are ignored by the WHERE.
UPSERT_PREFERENCES = """
INSERT INTO mentor_preferences AS p (mentor_id, milestone_notifications, changed_at)
SELECT * FROM unnest($1::uuid[], $2::boolean[], $3::timestamptz[])
ON CONFLICT (mentor_id) DO UPDATE
SET milestone_notifications = excluded.milestone_notifications,
    changed_at = excluded.changed_at,
    updated_at = now()
WHERE excluded.changed_at > p.changed_at
   OR (excluded.changed_at = p.changed_at
       AND p.milestone_notifications AND NOT excluded.milestone_notifications)
"""

# First write wins. A tombstone (mentor_id null) is filled in but stays uncounted.
# Returns the exceptions only, a few rows per batch: each input that was not written, or was
# planned as counted and did not enter the count, with whether it was planned as counted and
# its outcome: `duplicate` (an earlier log of the id with the same fields), `conflict` (other
# mentor, organization, time or type), `not_counted` (it filled a tombstone: deleted before
# its log), `closed_year` (neither written nor on the ledger as a log: the closed-years trigger
# skipped it). Every other input was written as planned: counted, or not counted by plan.
# Returning the exceptions instead of every counted id spares the engine a UUID to decode per
# event. The outer SELECT sees the rows as they were before this statement, so it compares
# against earlier logs only; only the exceptions are probed a second time (about 1 % of a
# batch; every row in a replay over a filled ledger, which is what a replay is), each by one
# lookup in the primary key: a scalar subquery, because as a join the planner, misjudging how
# many exceptions the anti-join leaves (thousands instead of tens), hashes the whole ledger
# once per batch (measured: 68 of 116 ms at 56,000 ledger rows, growing with the ledger).
INSERT_LOGS = """
WITH input AS (
    SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::int[], $5::timestamptz[],
                         $6::text[], $7::boolean[], $8::timestamptz[])
        AS t(activity_id, mentor_id, organization_id, year, occurred_at, activity_type,
             counted, deleted_at)
), written AS (
    INSERT INTO activity_ledger AS l
        (activity_id, mentor_id, organization_id, year, occurred_at, activity_type, counted,
         deleted_at, delete_uncounted)
    SELECT activity_id, mentor_id, organization_id, year, occurred_at, activity_type, counted,
           deleted_at, CASE WHEN deleted_at IS NOT NULL THEN false END
    FROM input
    ON CONFLICT (activity_id) DO UPDATE
    SET mentor_id = excluded.mentor_id,
        organization_id = excluded.organization_id,
        year = excluded.year,
        occurred_at = excluded.occurred_at,
        activity_type = excluded.activity_type,
        counted = false,
        delete_uncounted = coalesce(l.delete_uncounted, false)
    WHERE l.mentor_id IS NULL
    RETURNING l.activity_id, l.counted
), missed AS MATERIALIZED (
    SELECT i.*, w.activity_id IS NOT NULL AS filled
    FROM input i LEFT JOIN written w USING (activity_id)
    WHERE w.activity_id IS NULL OR (i.counted AND NOT w.counted)
)
SELECT m.activity_id, m.counted AS planned,
       CASE WHEN m.filled THEN 'not_counted'
            ELSE coalesce(
                (SELECT CASE WHEN (l.mentor_id, l.organization_id, l.occurred_at, l.activity_type)
                                  IS DISTINCT FROM
                                  (m.mentor_id, m.organization_id, m.occurred_at, m.activity_type)
                             THEN 'conflict' ELSE 'duplicate' END
                 FROM activity_ledger l
                 WHERE l.activity_id = m.activity_id AND l.mentor_id IS NOT NULL),
                'closed_year') END AS outcome
FROM missed m
"""

# The ledger's log of ids whose first log in the batch conflicted with it, when the batch
# logged them again (rare): the repeats are judged against the log that won.
LEDGER_LOGS = """
SELECT activity_id, mentor_id, organization_id, occurred_at, activity_type
FROM activity_ledger WHERE activity_id = ANY($1::uuid[]) AND mentor_id IS NOT NULL
"""

# The first delete of an id wins. SET sees the old row, so delete_uncounted keeps whether this
# delete took a counted session out; only those rows come back to be decremented (removed
# true), with the repeats of a delete of an earlier batch (removed false): the inputs not
# applied, except where this batch's own log (recorded_at = now(), the transaction's start)
# already carries the delete that came before it in the batch.
APPLY_DELETES = """
WITH input AS (
    SELECT * FROM unnest($1::uuid[], $2::timestamptz[]) AS t(activity_id, deleted_at)
), applied AS (
    INSERT INTO activity_ledger AS l (activity_id, deleted_at)
    SELECT activity_id, deleted_at FROM input
    ON CONFLICT (activity_id) DO UPDATE
    SET deleted_at = excluded.deleted_at,
        delete_uncounted = l.counted,
        counted = false
    WHERE l.deleted_at IS NULL
    RETURNING l.activity_id, l.mentor_id, l.year, l.delete_uncounted
)
SELECT activity_id, mentor_id, year, true AS removed FROM applied WHERE delete_uncounted
UNION ALL
SELECT i.activity_id, NULL, NULL, false FROM input i JOIN activity_ledger l USING (activity_id)
WHERE NOT EXISTS (SELECT 1 FROM applied a WHERE a.activity_id = i.activity_id)
  AND l.recorded_at <> now()
"""

# Adds each mentor-year's net change and returns what the evaluator needs, read in the same
# statement: the organization's thresholds (NULL: no row, use the default), the opt-out, the
# milestones already on record for that year, and the database clock for the grace rule.
# Only the rows where a record may be due come back: a default threshold at or below the count
# and not on record, an organization with its own thresholds row (it may also be unusable,
# which the engine reports), or a mentor-year the engine names ($5, $6: a delete, or a change
# of organization, in the batch: the count peaked or was judged elsewhere). Every other row
# would make the evaluator record nothing; returning it cost the engine about 1.5 us per event
# to decode (most mentor-years of a batch are between two thresholds).
UPSERT_SUMMARY = """
WITH input AS (
    SELECT * FROM unnest($1::uuid[], $2::int[], $3::int[], $4::uuid[])
        AS t(user_id, year, delta, organization_id)
), counted AS (
    INSERT INTO annual_summary AS s (user_id, year, session_count, organization_id)
    SELECT user_id, year, delta, organization_id FROM input
    ON CONFLICT (user_id, year) DO UPDATE
    SET session_count = s.session_count + excluded.session_count,
        organization_id = coalesce(excluded.organization_id, s.organization_id),
        updated_at = now()
    RETURNING s.user_id, s.year, s.session_count, s.organization_id
)
SELECT c.user_id, c.year, c.session_count, c.organization_id, t.thresholds,
       coalesce(NOT p.milestone_notifications, false) AS opted_out,
       ARRAY(SELECT n.milestone_value FROM scenario_notifications n
             WHERE n.user_id = c.user_id AND n.scenario_type = 'milestone'
               AND n.year = c.year) AS recorded,
       now() AS db_now
FROM counted c
LEFT JOIN milestone_thresholds t ON t.organization_id = c.organization_id
LEFT JOIN mentor_preferences p ON p.mentor_id = c.user_id
WHERE t.organization_id IS NOT NULL
   OR (c.user_id, c.year) IN (SELECT * FROM unnest($5::uuid[], $6::int[]))
   OR EXISTS (SELECT 1 FROM unnest($7::int[]) AS d(value)
              WHERE d.value <= c.session_count
                AND NOT EXISTS (SELECT 1 FROM scenario_notifications n
                                WHERE n.user_id = c.user_id AND n.scenario_type = 'milestone'
                                  AND n.year = c.year AND n.milestone_value = d.value))
"""

# ON CONFLICT DO NOTHING: the unique key, not this process, decides what was recorded first.
# A NULL reached_at means "reached before this batch": it takes the record's created_at.
INSERT_MILESTONES = """
INSERT INTO scenario_notifications
    (id, user_id, organization_id, scenario_type, year, milestone_value, session_count, status,
     activity_id, reached_at, suppressed_reason)
SELECT id, user_id, organization_id, 'milestone', year, milestone_value, session_count, status,
       activity_id, coalesce(reached_at, now()), suppressed_reason
FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::int[], $5::int[], $6::int[], $7::text[],
            $8::uuid[], $9::timestamptz[], $10::text[])
    AS t(id, user_id, organization_id, year, milestone_value, session_count, status,
         activity_id, reached_at, suppressed_reason)
ON CONFLICT DO NOTHING
RETURNING id, status
"""
