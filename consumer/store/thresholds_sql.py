"""``milestone_thresholds`` and its history: list, and apply one change (from the command or
the thresholds topic) with the value it replaced.

Every change goes through :func:`apply_change`, so the command and the restore from the topic
keep the same rule: a change is applied only when it is newer (``changed_at``) than anything the
database knows for that organization, which makes a restore idempotent and lets a change made
by the command win over an older message on the topic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal
from uuid import UUID

import asyncpg

from consumer.domain.thresholds import ThresholdsChange

Source = Literal["command", "topic"]

# Threshold changes are rare: one lock for all of them keeps "newer than what is known" true
# between the read and the write without a row to lock when the organization has none.
THRESHOLDS_LOCK_KEY = 0x6D696C657468723E  # "milethr>"

_KNOWN = """
SELECT t.thresholds,
       greatest(t.changed_at,
                (SELECT max(h.changed_at) FROM milestone_thresholds_history h
                 WHERE h.organization_id = $1)) AS changed_at,
       t.organization_id IS NOT NULL AS has_row
FROM (SELECT 1) one
LEFT JOIN milestone_thresholds t ON t.organization_id = $1
"""

_UPSERT = """
INSERT INTO milestone_thresholds (organization_id, thresholds, changed_at) VALUES ($1, $2, $3)
ON CONFLICT (organization_id) DO UPDATE
SET thresholds = excluded.thresholds, changed_at = excluded.changed_at
"""

_HISTORY = """
INSERT INTO milestone_thresholds_history
    (organization_id, thresholds, previous, changed_at, source)
VALUES ($1, $2, $3, $4, $5)
"""

LIST = """
SELECT t.organization_id, t.thresholds, t.changed_at,
       (SELECT h.previous FROM milestone_thresholds_history h
        WHERE h.organization_id = t.organization_id
        ORDER BY h.changed_at DESC, h.id DESC LIMIT 1) AS previous
FROM milestone_thresholds t
ORDER BY t.organization_id
"""

HISTORY = """
SELECT organization_id, thresholds, previous, changed_at, recorded_at, source
FROM milestone_thresholds_history
WHERE $1::uuid IS NULL OR organization_id = $1
ORDER BY organization_id, changed_at, id
"""


@dataclass(frozen=True, slots=True)
class Applied:
    """What a change did: ``applied`` False when the database already knew something newer."""

    applied: bool
    previous: tuple[int, ...] | None
    known_changed_at: datetime | None


async def apply_change(
    connection: asyncpg.Connection, change: ThresholdsChange, source: Source
) -> Applied:
    """Set (or, with ``thresholds`` None, remove) an organization's row and log it, if newer."""
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock($1)", THRESHOLDS_LOCK_KEY)
        known = await connection.fetchrow(_KNOWN, change.organization_id)
        assert known is not None
        previous = tuple(known["thresholds"]) if known["has_row"] else None
        known_at: datetime | None = known["changed_at"]
        if known_at is not None and change.changed_at <= known_at:
            return Applied(False, previous, known_at)
        if change.thresholds is None:
            await connection.execute(
                "DELETE FROM milestone_thresholds WHERE organization_id = $1",
                change.organization_id,
            )
        else:
            await connection.execute(
                _UPSERT, change.organization_id, list(change.thresholds), change.changed_at
            )
        await connection.execute(
            _HISTORY, change.organization_id,
            None if change.thresholds is None else list(change.thresholds),
            None if previous is None else list(previous), change.changed_at, source,
        )
        return Applied(True, previous, known_at)


async def apply_changes(
    connection: asyncpg.Connection, changes: Sequence[ThresholdsChange], source: Source
) -> int:
    """Apply each change (see :func:`apply_change`); return how many were newer."""
    applied = 0
    for change in changes:
        applied += (await apply_change(connection, change, source)).applied
    return applied


async def list_thresholds(connection: asyncpg.Connection) -> list[asyncpg.Record]:
    return list(await connection.fetch(LIST))


async def history(
    connection: asyncpg.Connection, organization_id: UUID | None = None
) -> list[asyncpg.Record]:
    return list(await connection.fetch(HISTORY, organization_id))


async def thresholds_of(
    connection: asyncpg.Connection, organization_id: UUID
) -> tuple[int, ...] | None:
    """The organization's own thresholds (sorted, without repeats), or None without a row."""
    value = await connection.fetchval(
        "SELECT thresholds FROM milestone_thresholds WHERE organization_id = $1", organization_id
    )
    return None if value is None else tuple(sorted(set(value)))
