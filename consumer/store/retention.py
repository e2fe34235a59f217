"""Retention: the closed-years watermark and the deletes of ``milestones prune``.

Closing years ``<= W`` happens in one short transaction: the watermark moves up (never down)
and the guard trigger is re-created with ``W`` in its WHEN clause (see migration 0002). The DDL
waits for the batch transactions in flight and holds new ones back for a moment, so every ledger
insert that starts after the commit already sees the new guard. Only then are the rows deleted,
in chunks by ``activity_id``, each chunk its own transaction.

What may fail: the guard needs the table owner (``CREATE TRIGGER``), so ``prune`` runs with
the role that runs ``migrate``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import asyncpg

GUARD_TRIGGER = "activity_ledger_closed_years"

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

NIL = UUID(int=0)


async def read_closed_through_year(db: Any) -> int | None:
    """The watermark (``None``: no year is closed); ``db`` is a pool or a connection."""
    value = await db.fetchval(_READ)
    return None if value is None else int(value)


async def close_years(connection: asyncpg.Connection, through_year: int) -> int:
    """Close every year ``<= through_year`` (never lowering the watermark); return it."""
    async with connection.transaction():
        watermark = int(await connection.fetchval(_RAISE, through_year))
        # DDL cannot take a parameter; the value is an int from the database, never text.
        await connection.execute(f"DROP TRIGGER IF EXISTS {GUARD_TRIGGER} ON activity_ledger")
        await connection.execute(
            f"CREATE TRIGGER {GUARD_TRIGGER} BEFORE INSERT ON activity_ledger FOR EACH ROW"
            f" WHEN (NEW.year <= {watermark:d}) EXECUTE FUNCTION milestones_skip_closed_year()"
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
    after, op = NIL, ">="
    while True:
        row = await connection.fetchrow(_DELETE_CLOSED.format(op=op), after, watermark, chunk_rows)
        assert row is not None
        result.scanned += row["scanned"]
        result.deleted += row["deleted"]
        if on_chunk is not None:
            on_chunk(row["scanned"])
        if row["scanned"] < chunk_rows:
            return result
        after, op = row["last_id"], ">"


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
