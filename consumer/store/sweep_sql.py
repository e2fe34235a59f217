"""The sweep's statements: evaluate a chunk of mentor-years against the thresholds in SQL.

One chunk is one transaction of three statements, in the engine's lock order:
  1. lock the chunk's ``annual_summary`` rows FOR SHARE, in key order (keyset by ``user_id``),
     so their counts cannot move while the chunk is evaluated; a batch that wants one of them
     waits for this chunk (milliseconds), and the sweep never holds the whole table;
  2. the candidates: every threshold ``<= session_count`` (so evaluation "stops at the first
     threshold not reached" by construction) that has no record for that mentor and year, with
     its status: ``suppressed`` when the mentor has opted out or the year is past its grace
     deadline on the database clock (the reason is recorded), else ``pending``;
  3. insert them (ids computed in Python: UUIDv5 needs SHA-1, which stock Postgres lacks),
     ON CONFLICT DO NOTHING, in key order: the unique key, not this process, decides which of
     two sweeps or the live consumer records a milestone.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from uuid import UUID

import asyncpg

from consumer.domain.milestones import notification_id

NIL = UUID(int=0)

_LOCK_CHUNK = """
SELECT user_id FROM annual_summary
WHERE year = $1 AND user_id {op} $2 AND ($3::uuid IS NULL OR organization_id = $3)
ORDER BY user_id
LIMIT $4
FOR SHARE
"""

# $1 year, $2 the chunk's mentors, $3 default thresholds, $4 time zone name, $5 grace days.
# The deadline is calendar.notify_deadline in SQL: local 1 January 00:00 of the next year, plus
# grace_days x 24 h in absolute time.
CANDIDATES = """
WITH clock AS (
    SELECT now() >= (make_timestamp($1 + 1, 1, 1, 0, 0, 0) AT TIME ZONE $4)
                    + make_interval(hours => 24 * $5) AS late
)
SELECT s.user_id, s.organization_id, s.session_count, m.value AS milestone_value,
       CASE WHEN coalesce(NOT p.milestone_notifications, false) THEN 'opted_out'
            WHEN clock.late THEN 'grace_period_over' END AS suppressed_reason
FROM annual_summary s
CROSS JOIN clock
LEFT JOIN milestone_thresholds t ON t.organization_id = s.organization_id
CROSS JOIN LATERAL (
    SELECT DISTINCT unnest(coalesce(t.thresholds, $3::int[])) AS value
    -- A row with a NULL element or nested arrays (past the CHECK of migration 0003) is not
    -- used: that organization's milestones wait, as in the batch (stored_thresholds).
    WHERE CASE WHEN coalesce(array_ndims(t.thresholds), 1) = 1
               THEN array_position(t.thresholds, NULL) IS NULL ELSE false END
) m
LEFT JOIN mentor_preferences p ON p.mentor_id = s.user_id
WHERE s.year = $1 AND s.user_id = ANY($2::uuid[])
  AND s.organization_id IS NOT NULL
  AND m.value <= s.session_count
  AND NOT EXISTS (
      SELECT 1 FROM scenario_notifications n
      WHERE n.user_id = s.user_id AND n.scenario_type = 'milestone'
        AND n.year = s.year AND n.milestone_value = m.value)
ORDER BY s.user_id, m.value
"""

# Reached before the evaluating event: activity_id NULL, reached_at = created_at (both now()).
_INSERT = """
INSERT INTO scenario_notifications
    (id, user_id, organization_id, scenario_type, year, milestone_value, session_count, status,
     activity_id, reached_at, suppressed_reason)
SELECT id, user_id, organization_id, 'milestone', $1, milestone_value, session_count,
       CASE WHEN suppressed_reason IS NULL THEN 'pending' ELSE 'suppressed' END,
       NULL, now(), suppressed_reason
FROM unnest($2::uuid[], $3::uuid[], $4::uuid[], $5::int[], $6::int[], $7::text[])
    AS t(id, user_id, organization_id, milestone_value, session_count, suppressed_reason)
ORDER BY user_id, milestone_value
ON CONFLICT DO NOTHING
RETURNING id, milestone_value, status
"""


@dataclass(frozen=True, slots=True)
class SweepRules:
    year: int
    default_thresholds: tuple[int, ...]
    timezone: str
    grace_days: int
    organization_id: UUID | None = None


@dataclass(slots=True)
class SweepResult:
    mentors: int = 0
    chunks: int = 0
    pending_ids: list[UUID] = field(default_factory=list)
    by_status: Counter[str] = field(default_factory=Counter)
    by_milestone: Counter[int] = field(default_factory=Counter)
    lost_races: int = 0  # candidates another writer recorded first

    @property
    def recorded(self) -> int:
        return sum(self.by_status.values())


async def sweep_chunk(
    connection: asyncpg.Connection, rules: SweepRules, after: UUID | None, chunk_mentors: int
) -> tuple[UUID | None, SweepResult]:
    """Sweep the mentors after ``after`` (``None``: from the first); return the last one seen.

    The returned key is ``None`` once the year is exhausted.
    """
    result = SweepResult(chunks=1)
    async with connection.transaction():
        op, start = (">=", NIL) if after is None else (">", after)
        locked = await connection.fetch(
            _LOCK_CHUNK.format(op=op), rules.year, start, rules.organization_id, chunk_mentors
        )
        mentors = [row["user_id"] for row in locked]
        result.mentors = len(mentors)
        if not mentors:
            return None, result
        candidates = await connection.fetch(
            CANDIDATES, rules.year, mentors, list(rules.default_thresholds), rules.timezone,
            rules.grace_days,
        )
        if candidates:
            await _insert(connection, rules.year, candidates, result)
    last = mentors[-1] if len(mentors) == chunk_mentors else None
    return last, result


async def _insert(
    connection: asyncpg.Connection, year: int, candidates: Sequence[asyncpg.Record],
    result: SweepResult,
) -> None:
    columns: list[list[object]] = [[], [], [], [], [], []]
    for row in candidates:
        values = (
            notification_id(row["user_id"], year, row["milestone_value"]), row["user_id"],
            row["organization_id"], row["milestone_value"], row["session_count"],
            row["suppressed_reason"],
        )
        for column, value in zip(columns, values, strict=True):
            column.append(value)
    written = await connection.fetch(_INSERT, year, *columns)
    result.lost_races = len(candidates) - len(written)
    for row in written:
        result.by_status[row["status"]] += 1
        result.by_milestone[row["milestone_value"]] += 1
        if row["status"] == "pending":
            result.pending_ids.append(row["id"])


async def sweep_year(
    pool: asyncpg.Pool, rules: SweepRules, *, chunk_mentors: int = 1_000,
    on_chunk: Callable[[int], None] | None = None,
) -> SweepResult:
    """Every mentor-year of ``rules.year`` (of one organization, if given), chunk by chunk;
    ``on_chunk`` hears the mentor-years of each chunk done (the command's progress)."""
    total = SweepResult(chunks=0)
    after: UUID | None = None
    while True:
        async with pool.acquire() as connection:
            after, chunk = await sweep_chunk(connection, rules, after, chunk_mentors)
        total.mentors += chunk.mentors
        total.chunks += chunk.chunks
        total.pending_ids.extend(chunk.pending_ids)
        total.by_status.update(chunk.by_status)
        total.by_milestone.update(chunk.by_milestone)
        total.lost_races += chunk.lost_races
        if on_chunk is not None:
            on_chunk(chunk.mentors)
        if after is None:
            return total
