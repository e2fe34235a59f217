"""Each way a milestone ends up ``suppressed`` records its reason (``suppressed_reason``)."""

from __future__ import annotations

import time

import asyncpg

from consumer.commands.common import current_year
from consumer.commands.sweep import sweep_command
from consumer.domain.milestones import SUPPRESSED_REASONS, notification_id
from consumer.runtime import open_pool, publish_and_wait
from tests.integration.operations import settings_from, uuid, write_events
from tests.integration.test_sweep import put_summary
from tests.support import events

ORG = uuid(events.ORG)


async def reasons(db: asyncpg.Connection) -> dict[tuple[str, int, int], tuple[str, str | None]]:
    rows = await db.fetch(
        "SELECT user_id, year, milestone_value, status, suppressed_reason"
        " FROM scenario_notifications"
    )
    return {
        (str(r["user_id"]), r["year"], r["milestone_value"]): (r["status"], r["suppressed_reason"])
        for r in rows
    }


async def test_batch_records_why_it_suppressed(
    db: asyncpg.Connection, engine_env: dict[str, str]
) -> None:
    settings = settings_from(engine_env, thresholds="1")
    year = current_year(settings)
    opted_out, late, replayed, sent = (events.new_id() for _ in range(4))
    this_year = f"{year}-03-14T10:00:00+01:00"
    await write_events(settings, [
        events.preference(opted_out, False, changed_at=f"{year}-01-01T12:00:00+00:00"),
        events.logged(opted_out, occurred_at=this_year),
        events.logged(late, occurred_at=f"{year - 2}-03-14T10:00:00+01:00"),
        events.logged(sent, occurred_at=this_year),
    ])
    now_ms = int(time.time() * 1000)
    await write_events(
        settings, [events.logged(replayed, occurred_at=this_year)],
        timestamp_ms=now_ms - 60_000, suppress_before_ms=now_ms,
    )
    assert await reasons(db) == {
        (opted_out, year, 1): ("suppressed", "opted_out"),
        (late, year - 2, 1): ("suppressed", "grace_period_over"),
        (replayed, year, 1): ("suppressed", "replay_no_notify"),
        (sent, year, 1): ("pending", None),
    }


async def test_sweep_records_why_it_suppressed(
    db: asyncpg.Connection, engine_env: dict[str, str]
) -> None:
    settings = settings_from(engine_env, thresholds="1")
    year = current_year(settings)
    opted_out, late = events.new_id(), events.new_id()
    await put_summary(db, opted_out, year, 1)
    await put_summary(db, late, year - 2, 1)
    await db.execute("INSERT INTO mentor_preferences VALUES ($1, false, now())", uuid(opted_out))
    assert await sweep_command(settings, year=year, organization=None) == 0
    assert await sweep_command(settings, year=year - 2, organization=None) == 0
    assert await reasons(db) == {
        (opted_out, year, 1): ("suppressed", "opted_out"),
        (late, year - 2, 1): ("suppressed", "grace_period_over"),
    }


async def test_publisher_records_an_opt_out_after_the_record(
    db: asyncpg.Connection, engine_env: dict[str, str]
) -> None:
    settings = settings_from(engine_env)
    year = current_year(settings)
    mentor = uuid(events.new_id())
    row_id = notification_id(mentor, year, 50)
    await db.execute(
        "INSERT INTO scenario_notifications (id, user_id, organization_id, year, milestone_value,"
        " session_count, status) VALUES ($1, $2, $3, $4, 50, 50, 'pending')",
        row_id, mentor, ORG, year,
    )
    await db.execute("INSERT INTO mentor_preferences VALUES ($1, false, now())", mentor)
    pool = await open_pool(settings, max_size=2)
    try:
        assert await publish_and_wait(settings, pool, [row_id], timeout_s=20) == 0
    finally:
        await pool.close()
    assert await reasons(db) == {(str(mentor), year, 50): ("suppressed", "opted_out_before_send")}


async def test_the_schema_accepts_every_reason_the_code_writes(db: asyncpg.Connection) -> None:
    check = await db.fetchval(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint"
        " WHERE conname = 'suppressed_reason_known'"
    )
    for reason in SUPPRESSED_REASONS:
        assert f"'{reason}'" in check
