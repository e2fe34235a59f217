"""``milestones reconcile``: the task card's COUNT fallback, as an operator's check and repair.

The per-batch path never counts rows; this command recounts each mentor-year from the ledger,
lists every ``annual_summary`` row that differs and, with ``--fix``, sets it to the ledger's
count. ``--rebuild`` first recomputes each session's year and counted flag under the current
settings (time zone, counted types), for a rule change that a replay cannot apply.
"""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

import asyncpg

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


@dataclass(frozen=True, slots=True)
class Drift:
    mentor_id: UUID
    year: int
    summary_count: int
    ledger_count: int


async def summary_drift(
    connection: asyncpg.Connection, year: int, *, limit: int | None = None
) -> list[Drift]:
    rows = await connection.fetch(_DRIFT, year, limit)
    return [
        Drift(row["mentor_id"], year, row["summary_count"], row["ledger_count"]) for row in rows
    ]
