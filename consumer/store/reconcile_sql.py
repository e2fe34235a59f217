"""``milestones reconcile``: the COUNT fallback (drift), its repair, the rebuild; and the
bounded drift check ``run`` makes at start.

The batch transaction writes a session's ledger row and its summary increment together, so in
any one snapshot ``drift = ledger count - summary count`` of a (mentor, year) is a constant
that no batch changes: a batch adds ``k`` to both sides. The rebuild keeps it too (it moves a
session and its count in one transaction). Only a repair or a hand edit changes it.

The fix relies on that. It counts without any lock, in one statement (one snapshot), then adds
each row's drift to whatever the row holds by then, chunk by chunk, in key order: the row
locks are held for one indexed ``INSERT ... ON CONFLICT DO UPDATE`` of at most
:data:`FIX_CHUNK_KEYS` rows, however large the ledger. A batch that committed between the
count and the repair has moved both sides, so ``current + drift`` is still the ledger's count;
a batch holding a row when the repair reaches it makes the repair wait, then the repair adds to
the committed value. What would break the arithmetic is a second repair applying the same
drift: :func:`repair_lock` lets one ``--fix``/``--rebuild`` run at a time, and each computes
its drift only once it holds that lock.

Lock order, as every writer: ``activity_ledger`` by ``activity_id``, then ``annual_summary``
by ``(user_id, year)``. The rebuild moves counts by deltas (-1 under the old mentor-year, +1
under the new one) in the same transaction as the ledger rows it changes, in chunks of
:data:`REBUILD_CHUNK_ROWS` ledger rows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from uuid import UUID

import asyncpg

from consumer.store.keyset import walk_chunks

log = logging.getLogger(__name__)

FIX_CHUNK_KEYS = 1_000
REBUILD_CHUNK_ROWS = 10_000
# Any constant works; it only has to differ from the other advisory locks of the database.
REPAIR_LOCK_KEY = 0x6D732D7265706169  # "ms-repai"

# $1 one year or NULL for all, $2 the closed-years watermark or NULL, $3 at most this many rows
# (NULL: all). A closed year's ledger rows are gone (prune), so it cannot be recounted and is
# left out. One statement, so the two counts come from one snapshot (see the module docstring).
# `differing` is the number of differing rows before the LIMIT.
DRIFT = """
SELECT coalesce(s.user_id, l.mentor_id) AS mentor_id, coalesce(s.year, l.year) AS year,
       coalesce(s.session_count, 0) AS summary_count, coalesce(l.sessions, 0) AS ledger_count,
       s.user_id IS NOT NULL AND s.organization_id IS NOT NULL AS has_organization,
       count(*) OVER () AS differing
FROM (SELECT user_id, year, session_count, organization_id FROM annual_summary
      WHERE ($1::int IS NULL OR year = $1) AND ($2::int IS NULL OR year > $2)) s
FULL JOIN (SELECT mentor_id, year, count(*)::int AS sessions FROM activity_ledger
           WHERE counted AND ($1::int IS NULL OR year = $1) AND ($2::int IS NULL OR year > $2)
           GROUP BY mentor_id, year) l
       ON l.mentor_id = s.user_id AND l.year = s.year
WHERE coalesce(s.session_count, 0) <> coalesce(l.sessions, 0)
ORDER BY 1, 2
LIMIT $3
"""

# For the repaired rows that have no organization (a missing row, or one made by a repair): the
# organization of the most recently recorded counted session, the nearest the ledger has to
# "processing order". Read without locks, and only when such rows exist (it scans the ledger).
LATEST_ORGANIZATION = """
SELECT DISTINCT ON (l.mentor_id, l.year) l.mentor_id, l.year, l.organization_id
FROM activity_ledger l
JOIN unnest($1::uuid[], $2::int[]) AS k(user_id, year)
  ON l.mentor_id = k.user_id AND l.year = k.year
WHERE l.counted
ORDER BY l.mentor_id, l.year, l.recorded_at DESC, l.activity_id DESC
"""

# One chunk of the fix, sorted by key: the only statement that takes row locks. $3 is each
# row's drift, added to the value the row holds now; a missing row is created with it.
FIX_APPLY = """
INSERT INTO annual_summary AS s (user_id, year, session_count, organization_id)
SELECT * FROM unnest($1::uuid[], $2::int[], $3::int[], $4::uuid[])
ORDER BY 1, 2
ON CONFLICT (user_id, year) DO UPDATE
SET session_count = s.session_count + excluded.session_count,
    organization_id = coalesce(s.organization_id, excluded.organization_id),
    updated_at = now()
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

@dataclass(frozen=True, slots=True)
class Drift:
    """One (mentor, year) whose summary differs from its ledger, both as of one snapshot."""

    mentor_id: UUID
    year: int
    summary_count: int
    ledger_count: int
    has_organization: bool = True

    @property
    def difference(self) -> int:
        return self.ledger_count - self.summary_count


async def find_drift(
    connection: asyncpg.Connection, year: int | None, closed_through_year: int | None,
    *, limit: int | None = None,
) -> list[Drift]:
    """Every differing row of ``year`` (``None``: every open year), by mentor and year."""
    return [_drift(row) for row in await connection.fetch(DRIFT, year, closed_through_year, limit)]


def _drift(row: asyncpg.Record) -> Drift:
    return Drift(row["mentor_id"], row["year"], row["summary_count"], row["ledger_count"],
                 row["has_organization"])


@dataclass(frozen=True, slots=True)
class StartupDrift:
    """What ``run`` found at start: ``differing`` rows in ``year``, ``examples`` of them."""

    year: int
    differing: int
    examples: list[Drift]


async def startup_drift(pool: asyncpg.Pool, year: int, *, budget_s: float) -> StartupDrift | None:
    """The drift of ``year``, or ``None`` when the check did not finish within ``budget_s``.

    Without an index on (mentor, year), the recount scans the ledger: seconds per few million
    rows. The statement timeout bounds what one start may spend on it (the database cancels
    the scan), so a restart on a large ledger costs at most ``budget_s`` of one connection.
    """
    async with pool.acquire() as connection, connection.transaction():
        await connection.execute(f"SET LOCAL statement_timeout = {int(budget_s * 1000):d}")
        try:
            rows = await connection.fetch(DRIFT, year, None, 5)
        except asyncpg.QueryCanceledError:
            return None
    return StartupDrift(
        year, int(rows[0]["differing"]) if rows else 0, [_drift(row) for row in rows]
    )


@asynccontextmanager
async def repair_lock(pool: asyncpg.Pool) -> AsyncIterator[None]:
    """One ``reconcile --fix``/``--rebuild`` at a time (see the module docstring).

    A session-level advisory lock on a connection held for the block; a second repair waits
    for the first, then computes its own drift.
    """
    async with pool.acquire() as connection:
        if not await connection.fetchval("SELECT pg_try_advisory_lock($1)", REPAIR_LOCK_KEY):
            log.warning("another `milestones reconcile --fix/--rebuild` is running: waiting")
            await connection.execute("SELECT pg_advisory_lock($1)", REPAIR_LOCK_KEY)
        try:
            yield
        finally:
            await connection.execute("SELECT pg_advisory_unlock($1)", REPAIR_LOCK_KEY)


@dataclass(slots=True)
class FixResult:
    rows: int = 0
    chunks: int = 0
    longest_chunk_s: float = 0.0  # the longest time a chunk held its row locks (an upper bound)


async def fix_drift(
    pool: asyncpg.Pool, drift: Sequence[Drift], *, chunk_keys: int = FIX_CHUNK_KEYS,
    on_chunk: Callable[[int], None] | None = None,
) -> FixResult:
    """Add each listed row's drift to its current value; the listing must come from
    :func:`find_drift` under :func:`repair_lock` (the drift is applied exactly once).

    ``on_chunk`` hears the rows of each chunk done (the command's progress).
    """
    items = sorted(drift, key=lambda item: (item.mentor_id, item.year))
    organizations = await _latest_organizations(pool, [i for i in items if not i.has_organization])
    result = FixResult()
    for start in range(0, len(items), chunk_keys):
        chunk = items[start : start + chunk_keys]
        async with pool.acquire() as connection:
            began = time.monotonic()
            async with connection.transaction():
                await connection.execute(
                    FIX_APPLY,
                    [item.mentor_id for item in chunk],
                    [item.year for item in chunk],
                    [item.difference for item in chunk],
                    [organizations.get((item.mentor_id, item.year)) for item in chunk],
                )
            result.longest_chunk_s = max(result.longest_chunk_s, time.monotonic() - began)
        result.rows += len(chunk)
        result.chunks += 1
        if on_chunk is not None:
            on_chunk(len(chunk))
    return result


async def _latest_organizations(
    pool: asyncpg.Pool, items: Sequence[Drift]
) -> dict[tuple[UUID, int], UUID]:
    if not items:
        return {}
    rows = await pool.fetch(
        LATEST_ORGANIZATION, [item.mentor_id for item in items], [item.year for item in items]
    )
    return {(row["mentor_id"], row["year"]): row["organization_id"] for row in rows}


@dataclass(slots=True)
class RebuildResult:
    scanned: int = 0
    changed: int = 0
    summaries: int = 0


async def rebuild_ledger(
    pool: asyncpg.Pool,
    *,
    timezone: str,
    counted_types: frozenset[str] | None,
    closed_through_year: int | None,
    chunk_rows: int = REBUILD_CHUNK_ROWS,
    on_chunk: Callable[[int], None] | None = None,
) -> RebuildResult:
    """Recompute every open session's year and counted flag; move the counts by deltas;
    ``on_chunk`` hears the ledger rows of each chunk read."""
    result = RebuildResult()
    types = sorted(counted_types) if counted_types is not None else None

    async def chunk(op: str, after: UUID) -> asyncpg.Record | None:
        async with pool.acquire() as connection, connection.transaction():
            return await connection.fetchrow(
                REBUILD_CHUNK.format(op=op), after, chunk_rows, timezone, types,
                closed_through_year,
            )

    async for row in walk_chunks(chunk, chunk_rows, on_chunk):
        result.scanned += row["scanned"]
        result.changed += row["changed"]
        result.summaries += row["summaries"]
    return result
