"""What the database knows about its tables without reading them."""

from __future__ import annotations

import asyncpg

_ESTIMATED_ROWS = "SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass($1)"


async def estimated_rows(db: asyncpg.Pool | asyncpg.Connection, table: str) -> int | None:
    """The planner's estimate of a table's rows, free where ``count(*)`` reads the table
    (a progress total, the size named in a log line); ``None`` before the table was first
    analyzed."""
    value = await db.fetchval(_ESTIMATED_ROWS, table)
    return int(value) if value is not None and value >= 0 else None
