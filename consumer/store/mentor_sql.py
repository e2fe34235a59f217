"""What ``milestones mentor`` shows: one mentor's year, read in one snapshot; and the demo's view
of a few mentors."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import asyncpg

from consumer.store.thresholds_sql import thresholds_of

_SUMMARY = """
SELECT session_count, organization_id, updated_at FROM annual_summary
WHERE user_id = $1 AND year = $2
"""

_PREFERENCE = """
SELECT milestone_notifications, changed_at FROM mentor_preferences WHERE mentor_id = $1
"""

_MILESTONES = """
SELECT id, milestone_value, status, suppressed_reason, organization_id, session_count,
       activity_id, reached_at, created_at, published_at, published_partition, published_offset
FROM scenario_notifications
WHERE user_id = $1 AND scenario_type = 'milestone' AND year = $2
ORDER BY milestone_value
"""

_YEARS = "SELECT year, session_count FROM annual_summary WHERE user_id = $1 ORDER BY year"


@dataclass(frozen=True, slots=True)
class MentorFacts:
    session_count: int | None  # None: no counted session that year
    organization_id: UUID | None
    summary_updated_at: datetime | None
    organization_thresholds: tuple[int, ...] | None  # None: no row, the default applies
    milestone_notifications: bool | None  # None: no preference recorded (opted in)
    preference_changed_at: datetime | None
    milestones: list[asyncpg.Record]
    years: dict[int, int]
    db_now: datetime


async def mentor_facts(connection: asyncpg.Connection, mentor_id: UUID, year: int) -> MentorFacts:
    async with connection.transaction(isolation="repeatable_read", readonly=True):
        summary = await connection.fetchrow(_SUMMARY, mentor_id, year)
        organization_id = summary["organization_id"] if summary else None
        preference = await connection.fetchrow(_PREFERENCE, mentor_id)
        return MentorFacts(
            session_count=summary["session_count"] if summary else None,
            organization_id=organization_id,
            summary_updated_at=summary["updated_at"] if summary else None,
            organization_thresholds=(
                await thresholds_of(connection, organization_id) if organization_id else None
            ),
            milestone_notifications=preference["milestone_notifications"] if preference else None,
            preference_changed_at=preference["changed_at"] if preference else None,
            milestones=list(await connection.fetch(_MILESTONES, mentor_id, year)),
            years={row["year"]: row["session_count"]
                   for row in await connection.fetch(_YEARS, mentor_id)},
            db_now=await connection.fetchval("SELECT now()"),
        )


_OVERVIEW_COUNTS = "SELECT user_id, year, session_count FROM annual_summary WHERE user_id = ANY($1::uuid[])"
_OVERVIEW_MILESTONES = """
SELECT user_id, year, milestone_value, status, suppressed_reason FROM scenario_notifications
WHERE user_id = ANY($1::uuid[]) ORDER BY created_at, milestone_value
"""


async def mentors_overview(
    connection: asyncpg.Connection, ids: list[UUID]
) -> tuple[list[asyncpg.Record], list[asyncpg.Record]]:
    """A few mentors' counts per year and their milestones in record order (the demo's view)."""
    return await connection.fetch(_OVERVIEW_COUNTS, ids), await connection.fetch(_OVERVIEW_MILESTONES, ids)
