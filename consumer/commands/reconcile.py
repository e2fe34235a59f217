"""``milestones reconcile``: the task card's COUNT fallback, as an operator's check and repair.

The per-batch path never counts rows; this command recounts each mentor-year from the ledger,
lists every ``annual_summary`` row that differs and, with ``--fix``, sets it to the ledger's
count (in chunks, in the engine's lock order: safe beside ``run``). ``--rebuild`` first
recomputes each session's year and counted flag under the current settings (time zone,
counted types), for a rule change that a replay cannot apply: the ledger keeps the first
delivery of every ``activity_id``, so replaying the topic again changes nothing.

Years at or below the closed-years watermark (``prune``) have no ledger rows left; they are
neither compared nor rebuilt. Exit status: 0 when the summary agrees (or was repaired), 1 when
differences were found and left as they are.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from uuid import UUID

import asyncpg

from consumer.commands.common import command_pool, estimated_rows, table
from consumer.ops.progress import Progress
from consumer.settings import Settings
from consumer.store import reconcile_sql
from consumer.store.retention import read_closed_through_year

log = logging.getLogger(__name__)

FIX_CHUNK_KEYS = 1_000
REBUILD_CHUNK_ROWS = 10_000
SHOWN_ROWS = 50
EXIT_DIFFERENCES = 1

_DRIFT = """
SELECT coalesce(s.user_id, l.mentor_id) AS mentor_id,
       coalesce(s.session_count, 0) AS summary_count,
       coalesce(l.sessions, 0) AS ledger_count
FROM (SELECT user_id, session_count FROM annual_summary WHERE year = $1) s
FULL JOIN (SELECT mentor_id, count(*)::int AS sessions FROM activity_ledger
           WHERE counted AND year = $1 GROUP BY mentor_id) l
       ON l.mentor_id = s.user_id
WHERE coalesce(s.session_count, 0) <> coalesce(l.sessions, 0)
ORDER BY 1
LIMIT $2
"""

NIL = UUID(int=0)


@dataclass(frozen=True, slots=True)
class Drift:
    mentor_id: UUID
    year: int
    summary_count: int
    ledger_count: int


async def summary_drift(
    connection: asyncpg.Connection, year: int, *, limit: int | None = None
) -> list[Drift]:
    """The rows of one year that differ (``run`` checks the current year at start)."""
    rows = await connection.fetch(_DRIFT, year, limit)
    return [
        Drift(row["mentor_id"], year, row["summary_count"], row["ledger_count"]) for row in rows
    ]


async def find_drift(
    connection: asyncpg.Connection, year: int | None, closed_through_year: int | None
) -> list[Drift]:
    """Every differing row of ``year`` (``None``: every open year), by mentor and year."""
    rows = await connection.fetch(reconcile_sql.DRIFT, year, closed_through_year)
    return [
        Drift(row["mentor_id"], row["year"], row["summary_count"], row["ledger_count"])
        for row in rows
    ]


async def fix_drift(
    pool: asyncpg.Pool, drift: list[Drift], *, chunk_keys: int = FIX_CHUNK_KEYS,
    on_chunk: Callable[[int], None] | None = None,
) -> int:
    """Set each listed row to the ledger's count as of the fix; return the rows changed.

    The list only says where to look: each chunk recounts under the row locks, so a batch
    committed since the listing is neither lost nor counted twice.
    """
    keys = sorted({(item.mentor_id, item.year) for item in drift})
    changed = 0
    for start in range(0, len(keys), chunk_keys):
        chunk = keys[start : start + chunk_keys]
        mentors = [key[0] for key in chunk]
        years = [key[1] for key in chunk]
        async with pool.acquire() as connection, connection.transaction():
            await connection.execute(reconcile_sql.FIX_CREATE_MISSING, mentors, years)
            await connection.execute(reconcile_sql.FIX_LOCK, mentors, years)
            changed += len(await connection.fetch(reconcile_sql.FIX_SET, mentors, years))
        if on_chunk is not None:
            on_chunk(len(chunk))
    return changed


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
    """Recompute every open session's year and counted flag; move the counts by deltas."""
    result = RebuildResult()
    types = sorted(counted_types) if counted_types is not None else None
    after, op = NIL, ">="
    while True:
        async with pool.acquire() as connection, connection.transaction():
            row = await connection.fetchrow(
                reconcile_sql.REBUILD_CHUNK.format(op=op), after, chunk_rows, timezone, types,
                closed_through_year,
            )
        assert row is not None
        result.scanned += row["scanned"]
        result.changed += row["changed"]
        result.summaries += row["summaries"]
        if on_chunk is not None:
            on_chunk(row["scanned"])
        if row["scanned"] < chunk_rows:
            return result
        after, op = row["last_id"], ">"


async def reconcile_command(settings: Settings, *, year: int | None, fix: bool, rebuild: bool) -> int:
    async with command_pool(settings, statement_timeouts=False) as pool:
        closed = await read_closed_through_year(pool)
        if year is not None and closed is not None and year <= closed:
            print(f"{year} is a closed year (pruned through {closed}): its ledger rows are gone,"
                  " there is nothing to compare")
            return 0
        if rebuild:
            rows = await estimated_rows(pool, "activity_ledger")
            with Progress("rebuild", rows, unit="ledger rows") as progress:
                rebuilt = await rebuild_ledger(
                    pool, timezone=settings.timezone,
                    counted_types=settings.counted_activity_types, closed_through_year=closed,
                    on_chunk=progress.advance,
                )
            print(
                f"rebuild under time zone {settings.timezone} and counted types "
                f"{_types(settings.counted_activity_types)}: {rebuilt.scanned:,} ledger row(s)"
                f" read, {rebuilt.changed:,} changed, {rebuilt.summaries:,} summary row(s) moved"
            )
        async with pool.acquire() as connection:
            drift = await find_drift(connection, year, closed)
        scope = f"{year}" if year is not None else "every open year"
        if not drift:
            print(f"annual_summary agrees with the ledger for {scope}")
            return 0
        print(f"annual_summary differs from the ledger for {len(drift):,} mentor-year(s) ({scope}):")
        shown = [
            (str(item.mentor_id), str(item.year), item.summary_count, item.ledger_count,
             item.ledger_count - item.summary_count)
            for item in drift[:SHOWN_ROWS]
        ]
        print(table(shown, ("mentor", "year", "summary", "ledger", "difference")))
        if len(drift) > SHOWN_ROWS:
            print(f"... and {len(drift) - SHOWN_ROWS:,} more")
        if not (fix or rebuild):
            print("run again with --fix to set them to the ledger's count")
            return EXIT_DIFFERENCES
        with Progress("fix", len(drift), unit="mentor-years") as progress:
            changed = await fix_drift(pool, drift, on_chunk=progress.advance)
        print(f"fixed {changed:,} row(s); run `milestones sweep` to record any milestone the"
              " new counts reach")
        return 0


def _types(types: frozenset[str] | None) -> str:
    return "all" if types is None else ", ".join(sorted(types))
