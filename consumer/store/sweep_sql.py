"""The sweep's statements: evaluate chunks of mentor-years against the thresholds in SQL.

One chunk is one transaction of two statements, in the engine's lock order:
  1. lock the chunk's ``annual_summary`` rows FOR SHARE, in key order (keyset by ``user_id``),
     so their counts cannot move while the chunk is evaluated, and in the same statement the
     candidates: every threshold ``<= session_count`` (so evaluation "stops at the first
     threshold not reached" by construction) that has no record for that mentor and year,
     with why it is suppressed (opted out, or the year past its grace deadline on the database
     clock), if it is. A batch that wants one of the rows waits for this chunk (tens of
     milliseconds); the sweep never holds the whole table;
  2. insert them (ids computed in Python: UUIDv5 needs SHA-1, which stock Postgres lacks), in
     key order: the unique key, not this process, decides which of two sweeps or the live
     consumer records a milestone. A plain INSERT: ON CONFLICT's speculative insertion costs a
     third of the insert's CPU (1.6 s against 1.1 s of Postgres CPU for 160,000 records), and a
     conflict is rare, since the FOR SHARE locks keep ``run`` from recording for the chunk's
     mentors meanwhile (only another sweep, or a batch that committed between the chunk's
     snapshot and its lock, can). A conflict rolls the chunk back, and the chunk runs again
     with ON CONFLICT DO NOTHING.

The year's mentors are split into :data:`SWEEP_WORKERS` ranges of ``user_id`` walked at once on
their own connections: the Python of one chunk (the ids) overlaps the inserts of another, and
Postgres gets a core per worker. Ranges are disjoint, so two workers never wait for each other.

A dry run walks the same chunks with the same statement, without the lock and the insert.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from uuid import UUID

import asyncpg

from consumer.domain.milestones import notification_id
from consumer.store.keyset import NIL

SWEEP_WORKERS = 2

# $1 year, $2 after this user_id ({op}: >= for the first chunk of a range, then >), $3 below
# this user_id (NULL: no bound), $4 organization (NULL: all), $5 chunk size, $6 default
# thresholds, $7 time zone name, $8 grace days. {lock}: FOR SHARE, or nothing for a dry run.
# The deadline is calendar.notify_deadline in SQL: local 1 January 00:00 of the next year, plus
# grace_days x 24 h in absolute time. The records already there are read per mentor through the
# unique index (ARRAY subquery): a join may be planned as a scan of all records, once a chunk.
# One row: the chunk's size and last key, and the candidates as arrays (NULL when none), in
# key order, as the insert takes them.
CHUNK = """
WITH chunk AS MATERIALIZED (
    SELECT user_id, organization_id, session_count FROM annual_summary
    WHERE year = $1 AND user_id {op} $2 AND ($3::uuid IS NULL OR user_id < $3)
      AND ($4::uuid IS NULL OR organization_id = $4)
    ORDER BY user_id
    LIMIT $5
    {lock}
), clock AS (
    SELECT now() >= (make_timestamp($1 + 1, 1, 1, 0, 0, 0) AT TIME ZONE $7)
                    + make_interval(hours => 24 * $8) AS late
), candidates AS (
    SELECT c.user_id, c.organization_id, c.session_count, m.value AS milestone_value,
           CASE WHEN coalesce(NOT p.milestone_notifications, false) THEN 'opted_out'
                WHEN clock.late THEN 'grace_period_over' END AS suppressed_reason
    FROM chunk c
    CROSS JOIN clock
    LEFT JOIN milestone_thresholds t ON t.organization_id = c.organization_id
    CROSS JOIN LATERAL (
        SELECT DISTINCT unnest(coalesce(t.thresholds, $6::int[])) AS value
        -- A row with a NULL element or nested arrays (past the CHECK of migration 0003) is not
        -- used: that organization's milestones wait, as in the batch (stored_thresholds).
        WHERE CASE WHEN coalesce(array_ndims(t.thresholds), 1) = 1
                   THEN array_position(t.thresholds, NULL) IS NULL ELSE false END
    ) m
    LEFT JOIN mentor_preferences p ON p.mentor_id = c.user_id
    WHERE c.organization_id IS NOT NULL
      AND m.value <= c.session_count
      AND m.value <> ALL (ARRAY(
          SELECT n.milestone_value FROM scenario_notifications n
          WHERE n.user_id = c.user_id AND n.scenario_type = 'milestone' AND n.year = $1))
)
SELECT (SELECT count(*) FROM chunk)::int AS mentors,
       (SELECT user_id FROM chunk ORDER BY user_id DESC LIMIT 1) AS last_id,
       array_agg(user_id ORDER BY user_id, milestone_value) AS user_ids,
       array_agg(organization_id ORDER BY user_id, milestone_value) AS organization_ids,
       array_agg(session_count ORDER BY user_id, milestone_value) AS session_counts,
       array_agg(milestone_value ORDER BY user_id, milestone_value) AS milestone_values,
       array_agg(suppressed_reason ORDER BY user_id, milestone_value) AS suppressed_reasons
FROM candidates
"""

# How many mentor-years a sweep walks through (the progress total).
_MENTOR_YEARS = """
SELECT count(*)::int FROM annual_summary
WHERE year = $1 AND ($2::uuid IS NULL OR organization_id = $2)
"""

# The boundaries of the workers' ranges: quantiles of the year's mentors ($3: the fractions).
_SPLIT = """
SELECT percentile_disc($3::float8[]) WITHIN GROUP (ORDER BY user_id) AS bounds
FROM annual_summary
WHERE year = $1 AND ($2::uuid IS NULL OR organization_id = $2)
"""

# Reached before the evaluating event: activity_id NULL, reached_at = created_at (both now()).
# What was written comes back summed by milestone and status, with the ids left to send.
_INSERT = """
WITH written AS (
    INSERT INTO scenario_notifications
        (id, user_id, organization_id, scenario_type, year, milestone_value, session_count,
         status, activity_id, reached_at, suppressed_reason)
    SELECT id, user_id, organization_id, 'milestone', $1, milestone_value, session_count,
           CASE WHEN suppressed_reason IS NULL THEN 'pending' ELSE 'suppressed' END,
           NULL, now(), suppressed_reason
    FROM unnest($2::uuid[], $3::uuid[], $4::uuid[], $5::int[], $6::int[], $7::text[])
        AS t(id, user_id, organization_id, milestone_value, session_count, suppressed_reason)
    ORDER BY user_id, milestone_value
    {conflict}
    RETURNING id, milestone_value, status
)
SELECT milestone_value, status, count(*)::int AS records,
       array_agg(id) FILTER (WHERE status = 'pending') AS pending_ids
FROM written
GROUP BY milestone_value, status
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
    # A dry run's candidates by (organization, milestone, status); nothing is recorded.
    planned: Counter[tuple[UUID, int, str]] = field(default_factory=Counter)

    @property
    def recorded(self) -> int:
        return sum(self.by_status.values())

    def add(self, other: SweepResult) -> None:
        self.mentors += other.mentors
        self.chunks += other.chunks
        self.pending_ids.extend(other.pending_ids)
        self.by_status.update(other.by_status)
        self.by_milestone.update(other.by_milestone)
        self.lost_races += other.lost_races
        self.planned.update(other.planned)


async def sweep_chunk(
    connection: asyncpg.Connection, rules: SweepRules, start: UUID, chunk_mentors: int,
    *, inclusive: bool = False, below: UUID | None = None, dry_run: bool = False,
    racing: bool = False,
) -> tuple[UUID | None, SweepResult]:
    """Sweep the next ``chunk_mentors`` mentors after ``start`` (or from it, ``inclusive``) and
    below ``below`` (``None``: no bound); return the last one seen, ``None`` once the range is
    exhausted. ``asyncpg.UniqueViolationError`` when another writer recorded one of the
    chunk's milestones first: run it again with ``racing``, which skips such records."""
    result = SweepResult(chunks=1)
    op = ">=" if inclusive else ">"
    statement = CHUNK.format(op=op, lock="" if dry_run else "FOR SHARE")
    async with connection.transaction():
        # The plan's cost estimate (one index probe per candidate) can pass jit_above_cost;
        # compiling then costs more than the chunk's whole execution.
        await connection.execute("SET LOCAL jit = off")
        row = await connection.fetchrow(
            statement, rules.year, start, below, rules.organization_id, chunk_mentors,
            list(rules.default_thresholds), rules.timezone, rules.grace_days,
        )
        assert row is not None
        result.mentors = row["mentors"]
        if row["user_ids"] is None:
            pass
        elif dry_run:
            for organization, value, reason in zip(
                row["organization_ids"], row["milestone_values"], row["suppressed_reasons"],
                strict=True,
            ):
                status = "pending" if reason is None else "suppressed"
                result.planned[(organization, value, status)] += 1
        else:
            await _insert(connection, rules.year, row, result, racing=racing)
    last = row["last_id"] if result.mentors == chunk_mentors else None
    return last, result


async def _insert(
    connection: asyncpg.Connection, year: int, candidates: asyncpg.Record, result: SweepResult,
    *, racing: bool,
) -> None:
    users, values = candidates["user_ids"], candidates["milestone_values"]
    ids = [notification_id(user, year, value) for user, value in zip(users, values, strict=True)]
    written = await connection.fetch(
        _INSERT.format(conflict="ON CONFLICT DO NOTHING" if racing else ""), year, ids, users,
        candidates["organization_ids"], values, candidates["session_counts"],
        candidates["suppressed_reasons"],
    )
    for row in written:
        result.by_status[row["status"]] += row["records"]
        result.by_milestone[row["milestone_value"]] += row["records"]
        result.pending_ids.extend(row["pending_ids"] or ())
    result.lost_races = len(ids) - result.recorded


async def sweep_year(
    pool: asyncpg.Pool, rules: SweepRules, *, chunk_mentors: int = 1_000,
    workers: int = SWEEP_WORKERS, dry_run: bool = False,
    on_chunk: Callable[[int], None] | None = None,
) -> SweepResult:
    """Every mentor-year of ``rules.year`` (of one organization, if given), chunk by chunk,
    ``workers`` ranges at once; ``on_chunk`` hears the mentor-years of each chunk done (the
    command's progress). ``dry_run``: count what would be recorded, lock and record nothing."""
    total = SweepResult(chunks=0)

    async def walk(low: UUID | None, high: UUID | None) -> None:
        start: UUID | None = low or NIL
        inclusive = True
        while start is not None:
            async with pool.acquire() as connection:
                try:
                    after, chunk = await sweep_chunk(
                        connection, rules, start, chunk_mentors, inclusive=inclusive,
                        below=high, dry_run=dry_run,
                    )
                except asyncpg.UniqueViolationError:
                    after, chunk = await sweep_chunk(
                        connection, rules, start, chunk_mentors, inclusive=inclusive,
                        below=high, dry_run=dry_run, racing=True,
                    )
            start = after
            inclusive = False
            total.add(chunk)
            if on_chunk is not None:
                on_chunk(chunk.mentors)

    bounds = await _split(pool, rules, workers)
    edges: list[UUID | None] = [None, *bounds, None]
    await asyncio.gather(*(walk(edges[i], edges[i + 1]) for i in range(len(edges) - 1)))
    return total


async def _split(pool: asyncpg.Pool, rules: SweepRules, workers: int) -> list[UUID]:
    """The keys that cut the year's mentors into ``workers`` ranges of about equal size."""
    if workers < 2:
        return []
    fractions = [index / workers for index in range(1, workers)]
    bounds = await pool.fetchval(_SPLIT, rules.year, rules.organization_id, fractions)
    return sorted(set(bounds or ()))


async def count_mentor_years(pool: asyncpg.Pool, rules: SweepRules) -> int:
    return int(await pool.fetchval(_MENTOR_YEARS, rules.year, rules.organization_id))
