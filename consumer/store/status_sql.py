"""What ``milestones status`` and the service's probes read: one round trip for the counts,
one for the outbox; the pending gauge and the reachability ping of ``/readyz``."""

from __future__ import annotations

COUNTS = """
SELECT (SELECT count(*) FROM annual_summary WHERE year = $1 AND session_count > 0)::int
           AS mentors,
       (SELECT coalesce(sum(session_count), 0) FROM annual_summary WHERE year = $1)::bigint
           AS sessions,
       (SELECT count(*) FROM activity_ledger)::bigint AS ledger_rows,
       (SELECT closed_through_year FROM engine_state) AS closed_through_year
"""

NOTIFICATIONS = """
SELECT status, count(*)::int AS total, count(*) FILTER (WHERE year = $1)::int AS this_year,
       min(created_at) AS oldest
FROM scenario_notifications
WHERE scenario_type = 'milestone'
GROUP BY status
ORDER BY status
"""

OLDEST_PENDING = """
SELECT id, user_id, year, milestone_value, created_at, now() - created_at AS age
FROM scenario_notifications
WHERE status = 'pending'
ORDER BY created_at, id
LIMIT $1
"""


# The pending-notifications gauge: index-only on the partial index
# scenario_notifications_pending, cheap at any table size.
PENDING_GAUGE = """
SELECT count(*)::bigint AS pending,
       coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS oldest_age_s
FROM scenario_notifications
WHERE status = 'pending'
"""

# Is the database there (the service's probe for /readyz)?
PING = "SELECT 1"
