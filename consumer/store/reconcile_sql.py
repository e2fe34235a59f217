"""The statements of ``milestones reconcile``: the COUNT fallback, its repair, the rebuild.

Lock order, as every writer: ``activity_ledger`` by ``activity_id``, then ``annual_summary``
by ``(user_id, year)``. Both repairs are safe beside a live ``run``:

- the fix locks a chunk's summary rows first (FOR UPDATE, key order) and only then counts, in
  a new statement: every batch that touched those rows has committed (its ledger rows are
  visible to the count), and every batch still to touch them waits and then adds its delta to
  the repaired value. A batch never waits for the fix while holding a summary row it needs.
- the rebuild moves counts by deltas (-1 under the old mentor-year, +1 under the new one) in
  the same transaction as the ledger rows it changes, so the summary stays consistent with the
  ledger at every commit, as the batch transaction keeps it.
"""

from __future__ import annotations

# $1 one year or NULL for all, $2 the closed-years watermark or NULL. A closed year's ledger rows
# are gone (prune), so it cannot be recounted and is left out.
DRIFT = """
SELECT coalesce(s.user_id, l.mentor_id) AS mentor_id, coalesce(s.year, l.year) AS year,
       coalesce(s.session_count, 0) AS summary_count, coalesce(l.sessions, 0) AS ledger_count
FROM (SELECT user_id, year, session_count FROM annual_summary
      WHERE ($1::int IS NULL OR year = $1) AND ($2::int IS NULL OR year > $2)) s
FULL JOIN (SELECT mentor_id, year, count(*)::int AS sessions FROM activity_ledger
           WHERE counted AND ($1::int IS NULL OR year = $1) AND ($2::int IS NULL OR year > $2)
           GROUP BY mentor_id, year) l
       ON l.mentor_id = s.user_id AND l.year = s.year
WHERE coalesce(s.session_count, 0) <> coalesce(l.sessions, 0)
ORDER BY 1, 2
"""

# The fix of one chunk of (mentor, year) keys, sorted: three statements in one transaction.
FIX_CREATE_MISSING = """
INSERT INTO annual_summary (user_id, year, session_count)
SELECT * FROM unnest($1::uuid[], $2::int[], array_fill(0, ARRAY[cardinality($1::uuid[])]))
ORDER BY 1, 2
ON CONFLICT (user_id, year) DO NOTHING
"""

FIX_LOCK = """
SELECT 1 FROM annual_summary s
JOIN unnest($1::uuid[], $2::int[]) AS k(user_id, year) USING (user_id, year)
ORDER BY s.user_id, s.year
FOR UPDATE OF s
"""

# The organization of a repaired row stays; a row that had none takes the one of its most
# recently recorded counted session (the nearest the ledger has to "processing order").
FIX_SET = """
WITH k AS (SELECT * FROM unnest($1::uuid[], $2::int[]) AS k(user_id, year)),
counted AS (
    SELECT k.user_id, k.year, count(l.activity_id)::int AS sessions,
           (array_agg(l.organization_id ORDER BY l.recorded_at DESC, l.activity_id DESC)
               FILTER (WHERE l.activity_id IS NOT NULL))[1] AS organization_id
    FROM k LEFT JOIN activity_ledger l
           ON l.mentor_id = k.user_id AND l.year = k.year AND l.counted
    GROUP BY k.user_id, k.year
)
UPDATE annual_summary s
SET session_count = c.sessions,
    organization_id = coalesce(s.organization_id, c.organization_id),
    updated_at = now()
FROM counted c
WHERE s.user_id = c.user_id AND s.year = c.year AND s.session_count <> c.sessions
RETURNING s.user_id, s.year, s.session_count
"""

# One chunk of the rebuild, keyset by activity_id ({op} is >= for the first chunk, then >).
# $1 after, $2 chunk size, $3 time zone name, $4 counted types (NULL: all), $5 watermark.
# A row of a closed year is left alone; a row that moves into a closed year stops counting.
REBUILD_CHUNK = """
WITH chunk AS (
    SELECT activity_id, mentor_id, organization_id, year AS old_year, counted AS old_counted,
           deleted_at, activity_type, occurred_at, recorded_at
    FROM activity_ledger
    WHERE activity_id {op} $1
    ORDER BY activity_id
    LIMIT $2
    FOR UPDATE
), target AS (
    SELECT c.*, y.new_year,
           (c.deleted_at IS NULL
            AND ($4::text[] IS NULL OR c.activity_type = ANY($4::text[]))
            AND ($5::int IS NULL OR y.new_year > $5)) AS new_counted
    FROM chunk c
    CROSS JOIN LATERAL (
        SELECT extract(year FROM c.occurred_at AT TIME ZONE $3)::int AS new_year) y
    WHERE c.mentor_id IS NOT NULL AND ($5::int IS NULL OR c.old_year > $5)
), changed AS (
    UPDATE activity_ledger l
    SET year = t.new_year, counted = t.new_counted
    FROM target t
    WHERE l.activity_id = t.activity_id
      AND (t.old_year, t.old_counted) IS DISTINCT FROM (t.new_year, t.new_counted)
    RETURNING t.mentor_id, t.organization_id, t.recorded_at, t.activity_id,
              t.old_year, t.old_counted, t.new_year, t.new_counted
), deltas AS (
    SELECT mentor_id, year, sum(delta)::int AS delta,
           (array_agg(organization_id ORDER BY recorded_at DESC, activity_id DESC)
               FILTER (WHERE delta > 0))[1] AS organization_id
    FROM (SELECT mentor_id, old_year AS year, -1 AS delta, organization_id, recorded_at,
                 activity_id
          FROM changed WHERE old_counted
          UNION ALL
          SELECT mentor_id, new_year, 1, organization_id, recorded_at, activity_id
          FROM changed WHERE new_counted) moves
    GROUP BY mentor_id, year
    HAVING sum(delta) <> 0
), summed AS (
    INSERT INTO annual_summary AS s (user_id, year, session_count, organization_id)
    SELECT mentor_id, year, delta, organization_id FROM deltas
    ORDER BY mentor_id, year
    ON CONFLICT (user_id, year) DO UPDATE
    SET session_count = s.session_count + excluded.session_count,
        organization_id = coalesce(s.organization_id, excluded.organization_id),
        updated_at = now()
    RETURNING 1
)
SELECT (SELECT activity_id FROM chunk ORDER BY activity_id DESC LIMIT 1) AS last_id,
       (SELECT count(*) FROM chunk)::int AS scanned,
       (SELECT count(*) FROM changed)::int AS changed,
       (SELECT count(*) FROM summed)::int AS summaries
"""
