"""Retention: the closed-years watermark and the deletes of ``milestones prune``.

Closing years ``<= W`` happens in one short transaction: the watermark moves up (never down)
and the guard trigger is replaced with ``W`` in its WHEN clause (see migration 0002). The DDL
waits for the batch transactions in flight and holds new ones back for a moment, so every ledger
insert that starts after the commit already sees the new guard. Only then are the rows deleted,
in chunks by ``activity_id``, each chunk its own transaction.

Beside a live ``run``: ``CREATE OR REPLACE TRIGGER`` takes SHARE ROW EXCLUSIVE on the ledger,
which waits for writers but not for readers (``DROP TRIGGER`` would take ACCESS EXCLUSIVE and
queue every batch behind any long scan, such as ``reconcile``'s). While the DDL waits, the
batches queue behind it, so it waits at most :data:`CLOSE_LOCK_TIMEOUT_MS` and then gives way
and tries again: a batch is held back at most that long.

What may fail: the guard needs the table owner (``CREATE TRIGGER``), so ``prune`` runs with
the role that runs ``migrate``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import asyncpg

from consumer.retry import Backoff
from consumer.store.keyset import walk_chunks

log = logging.getLogger(__name__)

GUARD_TRIGGER = "activity_ledger_closed_years"
CLOSE_LOCK_TIMEOUT_MS = 1_000
CLOSE_RETRY_PAUSE_S = 0.5

_READ = "SELECT closed_through_year FROM engine_state"

_RAISE = """
UPDATE engine_state
SET closed_through_year = greatest(coalesce(closed_through_year, $1), $1),
    closed_at = CASE WHEN closed_through_year IS NULL OR closed_through_year < $1
                     THEN now() ELSE closed_at END
RETURNING closed_through_year
"""

# Keyset over the primary key: one index range per chunk, whatever the share of closed rows.
_DELETE_CLOSED = """
WITH chunk AS (
    SELECT activity_id, year FROM activity_ledger
    WHERE activity_id {op} $1
    ORDER BY activity_id
    LIMIT $3
), gone AS (
    DELETE FROM activity_ledger l
    USING chunk c
    WHERE l.activity_id = c.activity_id AND c.year <= $2
    RETURNING l.activity_id
)
SELECT (SELECT activity_id FROM chunk ORDER BY activity_id DESC LIMIT 1) AS last_id,
       (SELECT count(*) FROM chunk)::int AS scanned,
       (SELECT count(*) FROM gone)::int AS deleted
"""

_DELETE_TOMBSTONES = """
DELETE FROM activity_ledger
WHERE activity_id IN (
    SELECT activity_id FROM activity_ledger
    WHERE mentor_id IS NULL AND recorded_at < now() - make_interval(days => $1)
    ORDER BY recorded_at
    LIMIT $2
)
"""

# prune --dry-run: what the deletes would remove (read-only; one scan of the ledger).
_CLOSED_SESSIONS = """
SELECT year, count(*)::bigint AS sessions FROM activity_ledger
WHERE year <= $1
GROUP BY year
ORDER BY year
"""

_OLD_TOMBSTONES = """
SELECT count(*)::bigint FROM activity_ledger
WHERE mentor_id IS NULL AND recorded_at < now() - make_interval(days => $1)
"""



async def read_closed_through_year(db: Any) -> int | None:
    """The watermark (``None``: no year is closed); ``db`` is a pool or a connection."""
    value = await db.fetchval(_READ)
    return None if value is None else int(value)


async def close_years(connection: asyncpg.Connection, through_year: int) -> int:
    """Close every year ``<= through_year`` (never lowering the watermark); return it."""
    backoff = Backoff(CLOSE_RETRY_PAUSE_S, CLOSE_RETRY_PAUSE_S, jitter=False)
    while True:
        try:
            return await _close_years_once(connection, through_year)
        except asyncpg.LockNotAvailableError:
            log.warning(
                "prune: the ledger is busy (attempt %d: its lock not granted within %d ms);"
                " trying again", backoff.attempts + 1, CLOSE_LOCK_TIMEOUT_MS,
            )
            await backoff.wait()


async def _close_years_once(connection: asyncpg.Connection, through_year: int) -> int:
    async with connection.transaction():
        await connection.execute(f"SET LOCAL lock_timeout = {CLOSE_LOCK_TIMEOUT_MS:d}")
        watermark = int(await connection.fetchval(_RAISE, through_year))
        # DDL cannot take a parameter; the value is an int from the database, never text.
        await connection.execute(
            f"CREATE OR REPLACE TRIGGER {GUARD_TRIGGER} BEFORE INSERT ON activity_ledger"
            f" FOR EACH ROW WHEN (NEW.year <= {watermark:d})"
            " EXECUTE FUNCTION milestones_skip_closed_year()"
        )
    return watermark


@dataclass(slots=True)
class PruneResult:
    scanned: int = 0
    deleted: int = 0


async def delete_closed_sessions(
    connection: asyncpg.Connection, watermark: int, *, chunk_rows: int = 10_000,
    on_chunk: Callable[[int], None] | None = None,
) -> PruneResult:
    """Delete the ledger rows of years ``<= watermark``, one short transaction per chunk;
    ``on_chunk`` hears the rows scanned by each chunk (the command's progress)."""
    result = PruneResult()

    async def chunk(op: str, after: UUID) -> asyncpg.Record | None:
        return await connection.fetchrow(
            _DELETE_CLOSED.format(op=op), after, watermark, chunk_rows
        )

    async for row in walk_chunks(chunk, chunk_rows, on_chunk):
        result.scanned += row["scanned"]
        result.deleted += row["deleted"]
    return result


async def delete_old_tombstones(
    connection: asyncpg.Connection, older_than_days: int, *, chunk_rows: int = 10_000
) -> int:
    """Delete tombstones (a delete whose log never came) recorded more than N days ago.

    A log for such an id arriving later would count: the price of not keeping every delete
    forever. The default age (400 days) outlasts any producer's redelivery.
    """
    total = 0
    while True:
        status = await connection.execute(_DELETE_TOMBSTONES, older_than_days, chunk_rows)
        deleted = int(status.split()[-1])
        total += deleted
        if deleted < chunk_rows:
            return total


@dataclass(frozen=True, slots=True)
class PrunePlan:
    """What ``prune`` would do, read without changing anything."""

    closed_now: int | None  # the watermark today (None: no year closed)
    closed_after: int  # the watermark after the prune (it never goes down)
    sessions_by_year: list[tuple[int, int]]  # ledger rows it would delete, per year
    tombstones: int  # tombstones it would delete


async def plan_prune(
    connection: asyncpg.Connection, through_year: int, tombstone_days: int
) -> PrunePlan:
    closed_now = await read_closed_through_year(connection)
    closed_after = through_year if closed_now is None else max(closed_now, through_year)
    rows = await connection.fetch(_CLOSED_SESSIONS, closed_after)
    tombstones = int(await connection.fetchval(_OLD_TOMBSTONES, tombstone_days))
    return PrunePlan(
        closed_now, closed_after, [(row["year"], row["sessions"]) for row in rows], tombstones
    )
