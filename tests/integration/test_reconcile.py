"""``milestones reconcile``: the COUNT fallback, its repair and the rebuild, on the real Postgres.

The ledger is filled through the engine's own BatchWriter (no broker needed).
"""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from consumer.commands.common import current_year
from consumer.commands.reconcile import reconcile_command
from consumer.store.reconcile_sql import find_drift, fix_drift, startup_drift
from tests.integration.operations import (
    settings_from,
    summary,
    uuid,
    write_events,
    writer_in_transaction,
)
from tests.support import events


async def test_reconcile_lists_a_tampered_summary_and_fix_repairs_it(
    db: asyncpg.Connection, engine_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    settings = settings_from(engine_env)
    year = current_year(settings)
    tampered, missing, phantom = events.new_id(), events.new_id(), events.new_id()
    await write_events(settings, [
        *(events.logged(tampered, occurred_at=f"{year}-02-0{n}T10:00:00+01:00") for n in (1, 2, 3)),
        events.logged(tampered, occurred_at=f"{year - 1}-06-01T10:00:00+02:00"),
        *(events.logged(missing, occurred_at=f"{year}-02-0{n}T10:00:00+01:00") for n in (1, 2)),
    ])
    await db.execute("UPDATE annual_summary SET session_count = 7 WHERE user_id = $1 AND year = $2",
                     uuid(tampered), year)
    await db.execute("DELETE FROM annual_summary WHERE user_id = $1", uuid(missing))
    await db.execute("INSERT INTO annual_summary (user_id, year, session_count) VALUES ($1, $2, 4)",
                     uuid(phantom), year)

    assert await reconcile_command(settings, year=None, fix=False, rebuild=False) == 1
    listed = capsys.readouterr().out
    assert "differs from the ledger for 3 mentor-year(s)" in listed
    for mentor, numbers in ((tampered, "7       3"), (missing, "0       2"), (phantom, "4       0")):
        line = next(line for line in listed.splitlines() if line.startswith(mentor))
        assert " ".join(numbers.split()) in " ".join(line.split())
    assert (await summary(db))[(tampered, year)] == 7  # listing changes nothing

    assert await reconcile_command(settings, year=None, fix=True, rebuild=False) == 0
    assert "fixed 3 row(s)" in capsys.readouterr().out
    assert await summary(db) == {
        (tampered, year): 3, (tampered, year - 1): 1, (missing, year): 2, (phantom, year): 0,
    }
    organization = await db.fetchval(
        "SELECT organization_id FROM annual_summary WHERE user_id = $1", uuid(missing))
    assert str(organization) == events.ORG  # a re-created row takes its sessions' organization
    assert await reconcile_command(settings, year=year, fix=False, rebuild=False) == 0
    assert f"agrees with the ledger for {year}" in capsys.readouterr().out


async def test_fix_waits_for_a_batch_in_flight_and_keeps_its_session(
    db: asyncpg.Connection, engine_env: dict[str, str], database_url: str
) -> None:
    """A batch holding the summary row (its ledger row not yet visible to the count) when the
    repair reaches it: the repair waits, then adds the drift to the committed value."""
    settings = settings_from(engine_env)
    year = current_year(settings)
    mentor = events.new_id()
    await write_events(settings, [events.logged(mentor, occurred_at=f"{year}-01-05T10:00:00+01:00")])
    await db.execute("UPDATE annual_summary SET session_count = 9")
    drift = await find_drift(db, year, None)
    async with writer_in_transaction(database_url) as (batch, in_flight, pool):
        await batch.execute(
            "INSERT INTO activity_ledger (activity_id, mentor_id, organization_id, year,"
            " occurred_at, activity_type, counted) VALUES ($1, $2, $3, $4, now(), 'session', true)",
            uuid(events.new_id()), uuid(mentor), uuid(events.ORG), year,
        )
        await batch.execute(
            "UPDATE annual_summary SET session_count = session_count + 1"
            " WHERE user_id = $1 AND year = $2", uuid(mentor), year,
        )
        fixing = asyncio.ensure_future(fix_drift(pool, drift))
        await asyncio.sleep(0.5)
        assert not fixing.done()  # waiting for the batch's row lock
        await in_flight.commit()
        await asyncio.wait_for(fixing, 10)

    assert await summary(db) == {(mentor, year): 2}
    assert await find_drift(db, None, None) == []


async def test_rebuild_after_a_time_zone_change_moves_sessions_to_their_new_year(
    db: asyncpg.Connection, engine_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    oslo = settings_from(engine_env, timezone="Europe/Oslo")
    mentor = events.new_id()
    removed = events.new_id()
    await write_events(oslo, [
        events.logged(mentor, occurred_at="2025-12-31T23:30:00Z"),  # 2026 in Oslo, 2025 in UTC
        events.logged(mentor, occurred_at="2026-03-14T10:00:00Z"),
        events.logged(mentor, occurred_at="2026-03-15T10:00:00Z", activity_type="call"),
        events.logged(mentor, removed, occurred_at="2025-12-31T23:45:00Z"),
        events.deleted(mentor, removed),
    ])
    assert await summary(db) == {(mentor, 2026): 3}

    utc_sessions_only = settings_from(
        engine_env, timezone="UTC", counted_activity_types="session"
    )
    assert await reconcile_command(utc_sessions_only, year=None, fix=False, rebuild=True) == 0

    output = capsys.readouterr().out
    assert "rebuild under time zone UTC and counted types session" in output
    assert await summary(db) == {(mentor, 2025): 1, (mentor, 2026): 1}
    years = await db.fetch(
        "SELECT year, counted FROM activity_ledger WHERE mentor_id = $1 ORDER BY occurred_at",
        uuid(mentor),
    )
    assert [(row["year"], row["counted"]) for row in years] == [
        (2025, True), (2025, False), (2026, True), (2026, False),
    ]
    assert await find_drift(db, None, None) == []
    # Under the old rules again, the rebuild puts everything back.
    assert await reconcile_command(oslo, year=None, fix=False, rebuild=True) == 0
    assert await summary(db) == {(mentor, 2025): 0, (mentor, 2026): 3}


async def test_a_batch_committed_between_the_count_and_the_repair_is_kept(
    db: asyncpg.Connection, engine_env: dict[str, str], database_url: str
) -> None:
    """The count takes no lock; the repair adds the drift to the value the row holds then."""
    settings = settings_from(engine_env)
    year = current_year(settings)
    mentor, missing = events.new_id(), events.new_id()
    await write_events(settings, [
        events.logged(mentor, occurred_at=f"{year}-01-05T10:00:00+01:00"),
        events.logged(missing, occurred_at=f"{year}-01-05T10:00:00+01:00"),
    ])
    await db.execute("UPDATE annual_summary SET session_count = 9 WHERE user_id = $1", uuid(mentor))
    await db.execute("DELETE FROM annual_summary WHERE user_id = $1", uuid(missing))
    drift = await find_drift(db, year, None)
    assert sorted((str(item.mentor_id), item.difference) for item in drift) == sorted(
        [(mentor, -8), (missing, 1)]
    )
    # Two more sessions for each, committed after the count and before the repair.
    await write_events(settings, [
        events.logged(who, occurred_at=f"{year}-01-0{day}T10:00:00+01:00")
        for who in (mentor, missing) for day in (6, 7)
    ])
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        fixed = await fix_drift(pool, drift)
    finally:
        await pool.close()

    assert fixed.rows == 2
    assert fixed.chunks == 1
    assert await summary(db) == {(mentor, year): 3, (missing, year): 3}
    assert await find_drift(db, None, None) == []
    organization = await db.fetchval(
        "SELECT organization_id FROM annual_summary WHERE user_id = $1", uuid(missing))
    assert str(organization) == events.ORG


async def test_the_start_up_check_reports_drift_and_gives_up_within_its_budget(
    db: asyncpg.Connection, engine_env: dict[str, str], database_url: str
) -> None:
    settings = settings_from(engine_env)
    year = current_year(settings)
    mentors = [events.new_id() for _ in range(7)]
    await write_events(settings, [
        events.logged(m, occurred_at=f"{year}-01-05T10:00:00+01:00") for m in mentors
    ])
    await db.execute("UPDATE annual_summary SET session_count = 5")
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        found = await startup_drift(pool, year, budget_s=5)
        assert found is not None
        assert found.differing == 7
        assert len(found.examples) == 5
        # A ledger too large for the budget: the database cancels the scan, the check says so.
        await db.execute(
            "INSERT INTO activity_ledger (activity_id, mentor_id, organization_id, year,"
            " occurred_at, activity_type, counted)"
            " SELECT gen_random_uuid(), gen_random_uuid(), $1, $2, now(), 'session', true"
            " FROM generate_series(1, 300000)", uuid(events.ORG), year)
        assert await startup_drift(pool, year, budget_s=0.01) is None
    finally:
        await pool.close()
