"""Differential test: the sweep's SQL and the Python evaluator agree on random states.

Each example is a set of mentor-years (count, organization, opt-out, milestones already on
record), organizations with their own thresholds or none (an empty array included, unsorted
with repeats too), a time zone and a grace period chosen so that the previous year's deadline
falls within a day of now. ``consumer.domain.milestones.evaluate`` says what must be recorded;
the sweep, in chunks of three mentors, must record exactly that.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from uuid import UUID
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumer.domain.calendar import is_late
from consumer.domain.milestones import evaluate, normalize_thresholds, notification_id
from consumer.store.migrate import migrate
from consumer.store.sweep_sql import SweepRules, sweep_year

DEFAULT = (2, 3, 5)
ORGS = [UUID(int=100 + index) for index in range(3)]
ZONES = ["Europe/Oslo", "Pacific/Kiritimati", "Pacific/Pago_Pago"]
THIS_YEAR = datetime.now(UTC).year


@dataclass(frozen=True)
class MentorYear:
    count: int
    org: int
    preference: bool | None  # None: no row (opted in)
    recorded: frozenset[int]
    past_year: bool


mentor_years = st.lists(
    st.builds(
        MentorYear,
        st.integers(0, 9),
        st.integers(0, 2),
        st.sampled_from([None, True, False]),
        st.frozensets(st.integers(1, 9), max_size=4),
        st.booleans(),
    ),
    min_size=1,
    max_size=10,
)
org_thresholds = st.lists(
    st.one_of(st.none(), st.lists(st.integers(1, 9), max_size=5)), min_size=3, max_size=3
)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    async with pool.acquire() as connection:
        await migrate(connection)
    yield pool
    await pool.close()


Row = tuple[UUID, int, int, str, int]


def expected_records(
    states: list[MentorYear], orgs: list[list[int] | None], db_now: datetime, zone: str,
    grace_days: int,
) -> set[Row]:
    found: set[Row] = set()
    for index, state in enumerate(states):
        mentor = UUID(int=index + 1)
        year = THIS_YEAR - 1 if state.past_year else THIS_YEAR
        own = orgs[state.org]
        thresholds = DEFAULT if own is None else normalize_thresholds(own)
        decisions = evaluate(
            state.count, thresholds, state.recorded, opted_out=state.preference is False,
            notify=not is_late(year, db_now, ZoneInfo(zone), grace_days),
        )
        for decision in decisions:
            status = "pending" if decision.emit else "suppressed"
            found.add((mentor, year, decision.milestone_value, status, state.count))
    return found


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    states=mentor_years,
    orgs=org_thresholds,
    zone=st.sampled_from(ZONES),
    grace_shift=st.integers(-1, 1),
)
async def test_sweep_records_exactly_what_the_evaluator_decides(
    pool: asyncpg.Pool, states: list[MentorYear], orgs: list[list[int] | None], zone: str,
    grace_shift: int,
) -> None:
    async with pool.acquire() as connection:
        await connection.execute(
            "TRUNCATE annual_summary, scenario_notifications, mentor_preferences,"
            " milestone_thresholds"
        )
        db_now: datetime = await connection.fetchval("SELECT now()")
        # The previous year's deadline lands within a day of now, on either side.
        grace_days = (db_now - datetime(THIS_YEAR, 1, 1, tzinfo=UTC)).days + grace_shift
        for org, own in zip(ORGS, orgs, strict=True):
            if own is not None:
                await connection.execute("INSERT INTO milestone_thresholds VALUES ($1, $2)", org, own)
        for index, state in enumerate(states):
            mentor = UUID(int=index + 1)
            year = THIS_YEAR - 1 if state.past_year else THIS_YEAR
            await connection.execute(
                "INSERT INTO annual_summary (user_id, year, session_count, organization_id)"
                " VALUES ($1, $2, $3, $4)", mentor, year, state.count, ORGS[state.org],
            )
            if state.preference is not None:
                await connection.execute(
                    "INSERT INTO mentor_preferences VALUES ($1, $2, now())", mentor,
                    state.preference,
                )
            for value in state.recorded:
                await connection.execute(
                    "INSERT INTO scenario_notifications (id, user_id, organization_id, year,"
                    " milestone_value, session_count, status)"
                    " VALUES ($1, $2, $3, $4, $5, 0, 'published')",
                    notification_id(mentor, year, value), mentor, ORGS[state.org], year, value,
                )

    for year in (THIS_YEAR, THIS_YEAR - 1):
        rules = SweepRules(year=year, default_thresholds=DEFAULT, timezone=zone,
                           grace_days=grace_days)
        await sweep_year(pool, rules, chunk_mentors=3)

    async with pool.acquire() as connection:
        rows = await connection.fetch(
            "SELECT * FROM scenario_notifications WHERE status <> 'published'"
        )
    assert {
        (row["user_id"], row["year"], row["milestone_value"], row["status"], row["session_count"])
        for row in rows
    } == expected_records(states, orgs, db_now, zone, grace_days)
    for row in rows:
        assert row["id"] == notification_id(row["user_id"], row["year"], row["milestone_value"])
        assert row["activity_id"] is None
        assert row["reached_at"] == row["created_at"]
        assert row["organization_id"] == ORGS[states[row["user_id"].int - 1].org]
