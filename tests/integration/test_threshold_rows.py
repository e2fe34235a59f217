"""``milestone_thresholds`` rows the engine cannot use, against the real Postgres.

Migration 0003's CHECK refuses them and repairs those already there; a row that slips past
anyway (the constraint dropped by hand) is its organization's problem: its milestones wait,
logged and counted, and every other organization's batch goes on.
"""

from __future__ import annotations

from uuid import uuid4
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from consumer.ops.metrics import Metrics
from consumer.store.migrate import available_migrations, migrate
from consumer.store.postgres import BatchOptions, PostgresBatchStore
from consumer.store.sweep_sql import SweepRules, sweep_year
from consumer.stream.writer import BatchWriter
from tests.integration.operations import envelopes_of, summary
from tests.support import events

OPTIONS = BatchOptions(tz=ZoneInfo("Europe/Oslo"), default_thresholds=(1,), grace_days=31)
INSERT = "INSERT INTO milestone_thresholds (organization_id, thresholds) VALUES ($1, $2::text::int[])"
BAD_ROWS = ["{50,NULL}", "{NULL}", "{{50,100},{200,300}}", "[0:1]={50,100}"]



async def test_the_check_refuses_null_elements_nested_arrays_and_odd_bounds(
    pool: asyncpg.Pool,
) -> None:
    async with pool.acquire() as connection:
        await migrate(connection)
        for bad in BAD_ROWS:
            with pytest.raises(asyncpg.CheckViolationError):
                await connection.execute(INSERT, uuid4(), bad)
        for good in ["{}", "{100,50,50}"]:
            await connection.execute(INSERT, uuid4(), good)


async def test_migration_0003_repairs_the_bad_rows_already_there_and_keeps_the_originals(
    pool: asyncpg.Pool,
) -> None:
    async with pool.acquire() as connection:
        await connection.execute(
            "CREATE TABLE schema_migrations (version int PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for migration in available_migrations():
            if migration.version < 3:  # the schema as it was before 0003
                await connection.execute(migration.sql)
                await connection.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version, migration.name,
                )
        organizations = [uuid4() for _ in BAD_ROWS]
        for organization_id, bad in zip(organizations, BAD_ROWS, strict=True):
            await connection.execute(INSERT, organization_id, bad)
        good = uuid4()
        await connection.execute(INSERT, good, "{200,50}")

        applied = await migrate(connection)

        assert "0003_thresholds_check.sql" in applied
        rows = {
            row["organization_id"]: row["thresholds"]
            for row in await connection.fetch(
                "SELECT organization_id, thresholds::text AS thresholds FROM milestone_thresholds"
            )
        }
        assert [rows[o] for o in organizations] == ["{50}", "{}", "{50,100,200,300}", "{50,100}"]
        assert rows[good] == "{200,50}"  # a usable row is left exactly as it was
        kept = {
            row["organization_id"]: row["original"]
            for row in await connection.fetch(
                "SELECT organization_id, original::text AS original"
                " FROM milestone_thresholds_repaired"
            )
        }
        assert kept == dict(zip(organizations, BAD_ROWS, strict=True))



async def test_an_unusable_row_past_the_check_makes_its_organization_wait_not_the_batch(
    pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    async with pool.acquire() as connection:
        await migrate(connection)
        await connection.execute(
            "ALTER TABLE milestone_thresholds DROP CONSTRAINT thresholds_flat_without_nulls"
        )
        nested, with_null, fine = uuid4(), uuid4(), uuid4()
        await connection.execute(INSERT, nested, "{{1,2},{3,4}}")
        await connection.execute(INSERT, with_null, "{1,NULL}")
        await connection.execute(INSERT, fine, "{1,2}")
    mentors = {organization: events.new_id() for organization in (nested, with_null, fine)}
    # One mentor moves from the fine organization to the nested one inside the batch: the
    # thresholds of an earlier organization of the batch are read by another statement.
    mover = events.new_id()
    messages = [
        events.logged(mentor, organization_id=organization)
        for organization, mentor in mentors.items() for _ in range(2)
    ] + [events.logged(mover, organization_id=fine), events.logged(mover, organization_id=nested)]
    metrics = Metrics()
    writer = BatchWriter(PostgresBatchStore(pool), OPTIONS, metrics, counted_types=None)

    outcome = await writer.write(envelopes_of(messages))

    assert not outcome.refused
    async with pool.acquire() as connection:
        counts = await summary(connection)
        recorded = {
            (str(row["user_id"]), row["milestone_value"])
            for row in await connection.fetch(
                "SELECT user_id, milestone_value FROM scenario_notifications"
            )
        }
    assert all(counts[(mentor, 2026)] == 2 for mentor in [*mentors.values(), mover])
    # the fine organization's mentor and the mover's first session (under the fine one) only
    assert recorded == {(mentors[fine], 1), (mentors[fine], 2), (mover, 1)}
    assert metrics.value("milestones_threshold_rows_invalid_total") == 2
    assert "is unusable" in caplog.text
    assert str(nested) in caplog.text
    assert str(with_null) in caplog.text

    # The sweep leaves them waiting too, and records them once the rows are fixed.
    rules = SweepRules(year=2026, default_thresholds=(1,), timezone="Europe/Oslo", grace_days=31)
    assert (await sweep_year(pool, rules)).recorded == 0
    async with pool.acquire() as connection:
        await connection.execute(
            "UPDATE milestone_thresholds SET thresholds = '{1,2}' WHERE organization_id = ANY($1)",
            [nested, with_null],
        )
    assert (await sweep_year(pool, rules)).recorded == 5

