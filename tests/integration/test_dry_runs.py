"""``sweep --dry-run`` and ``prune --dry-run`` as real ``milestones`` processes: they say what
the command would do, change nothing, and the real command then does exactly that."""

from __future__ import annotations

import asyncpg

from consumer.commands.common import current_year
from consumer.commands.maintenance import prune_command
from consumer.commands.sweep import sweep_command
from consumer.domain.milestones import notification_id
from tests.integration.operations import settings_from, snapshot, statuses, uuid, write_events
from tests.support import events
from tests.support.engine import EngineLauncher

ORG = uuid(events.ORG)
OTHER_ORG = uuid(events.OTHER_ORG)


async def _command(engine_process: EngineLauncher, *args: str, env: dict[str, str] | None = None) -> str:
    process = engine_process(env or {}, args)
    assert await process.wait(60) == 0, process.output()
    return process.stdout()


def _words(line: str) -> list[str]:
    return line.split()


async def test_sweep_dry_run_counts_per_organization_and_year_and_records_nothing(
    db: asyncpg.Connection, engine_env: dict[str, str], engine_process: EngineLauncher,
) -> None:
    settings = settings_from(engine_env, thresholds="2,4")
    year = current_year(settings)
    summaries = [
        (events.new_id(), 5, ORG), (events.new_id(), 4, ORG), (events.new_id(), 1, ORG),
        (events.new_id(), 3, OTHER_ORG), (events.new_id(), 9, OTHER_ORG),
    ]
    for mentor, count, organization in summaries:
        await db.execute(
            "INSERT INTO annual_summary (user_id, year, session_count, organization_id)"
            " VALUES ($1, $2, $3, $4)", uuid(mentor), year, count, organization)
    first = summaries[0][0]
    await db.execute(  # already on record: not counted again
        "INSERT INTO scenario_notifications (id, user_id, organization_id, year, milestone_value,"
        " session_count, status) VALUES ($1, $2, $3, $4, 2, 2, 'published')",
        notification_id(uuid(first), year, 2), uuid(first), ORG, year)
    await db.execute("INSERT INTO milestone_thresholds VALUES ($1, '{3}')", OTHER_ORG)
    await db.execute("INSERT INTO mentor_preferences VALUES ($1, false, now())",
                     uuid(summaries[1][0]))  # opted out: suppressed
    before = await snapshot(db)

    output = await _command(
        engine_process, "sweep", "--dry-run", "--year", str(year),
        env={"MILESTONES_THRESHOLDS": "2,4"},
    )

    assert await snapshot(db) == before
    assert "nothing was recorded" in output
    lines = {tuple(_words(line)[:3]): _words(line)[3:] for line in output.splitlines()
             if line.startswith((events.ORG, events.OTHER_ORG))}
    assert lines == {
        (events.ORG, str(year), "4"): ["1", "1"],  # the first mentor's 4; the opted-out one's 4
        (events.ORG, str(year), "2"): ["0", "1"],  # the opted-out mentor's 2
        (events.OTHER_ORG, str(year), "3"): ["2", "0"],
    }
    assert "would record 5: 3 to send, 2 suppressed" in output

    # The sweep itself records exactly that.
    assert await sweep_command(settings, year=year, organization=None) == 0
    found = await statuses(db)
    assert len(found) == 6  # the one on record and the five
    assert sorted(status for status in found.values()).count("suppressed") == 2


async def test_prune_dry_run_says_what_it_would_drop_and_changes_nothing(
    db: asyncpg.Connection, engine_env: dict[str, str], engine_process: EngineLauncher,
) -> None:
    settings = settings_from(engine_env)
    year = current_year(settings)
    mentor, old_tombstone, new_tombstone = events.new_id(), events.new_id(), events.new_id()
    await write_events(settings, [
        *(events.logged(mentor, occurred_at=f"{year - 3}-03-0{day}T10:00:00+01:00")
          for day in (1, 2, 3)),
        events.logged(mentor, occurred_at=f"{year - 2}-03-01T10:00:00+01:00"),
        events.logged(mentor, occurred_at=f"{year - 1}-03-01T10:00:00+01:00"),
        events.logged(mentor, occurred_at=f"{year}-03-01T10:00:00+01:00"),
        events.deleted(mentor, old_tombstone),
        events.deleted(mentor, new_tombstone),
    ])
    await db.execute("UPDATE activity_ledger SET recorded_at = now() - interval '500 days'"
                     " WHERE activity_id = $1", uuid(old_tombstone))
    before = await snapshot(db)

    output = await _command(engine_process, "prune", "--before-year", str(year - 1), "--dry-run")

    assert await snapshot(db) == before
    assert await db.fetchval("SELECT closed_through_year FROM engine_state") is None
    assert "dry run: nothing was changed (no year is closed)" in output
    assert f"would close every year through {year - 2}" in output
    rows = {_words(line)[0]: _words(line)[1] for line in output.splitlines()
            if line.startswith((str(year - 3), str(year - 2), str(year - 1)))}
    assert rows == {str(year - 3): "3", str(year - 2): "1"}
    assert "would delete 4 ledger row(s) and 1 tombstone(s) older than 400 day(s)" in output

    # The prune itself deletes exactly that.
    assert await prune_command(settings, before_year=year - 1, tombstone_days=400) == 0
    assert await db.fetchval("SELECT count(*) FROM activity_ledger") == len(before["activity_ledger"]) - 5
