"""``milestones prune``: closed years leave the ledger and are ignored from then on."""

from __future__ import annotations

import asyncio
import json
import time

import asyncpg
import pytest

from consumer.commands.common import current_year
from consumer.commands.maintenance import prune_command
from consumer.commands.replay import replay_command
from consumer.domain.batch import Envelope
from consumer.ops.metrics import Metrics
from consumer.runtime import batch_options
from consumer.settings import SettingsError
from consumer.store.postgres import PostgresBatchStore
from consumer.stream.writer import BatchWriter
from tests.integration.operations import (
    EVENT_ADAPTER,
    eventually,
    settings_from,
    snapshot,
    statuses,
    summary,
    uuid,
    write_events,
)
from tests.support import events
from tests.support.kafka import KafkaHelper
from tests.support.topics import Topics


def at(year: int, month: int = 3, day: int = 14) -> str:
    return f"{year}-{month:02d}-{day:02d}T10:00:00+01:00"


async def test_prune_then_replay_changes_nothing(
    db: asyncpg.Connection, engine_env: dict[str, str], kafka: KafkaHelper, topics: Topics,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = settings_from(engine_env, thresholds="2")
    year = current_year(settings)
    mentor = events.new_id()
    old_deleted = events.new_id()
    await kafka.produce_json_many(topics.activity, [
        events.logged(mentor, occurred_at=at(year - 2, day=1)),
        events.logged(mentor, occurred_at=at(year - 2, day=2)),
        events.logged(mentor, old_deleted, occurred_at=at(year - 2, day=3)),
        events.deleted(mentor, old_deleted),
        events.logged(mentor, occurred_at=at(year, day=1)),
    ])
    assert await replay_command(settings, from_beginning=True, from_timestamp=None,
                                no_notify=True, install_signals=False) == 0
    assert await summary(db) == {(mentor, year - 2): 2, (mentor, year): 1}

    assert await prune_command(settings, before_year=year, tombstone_days=400) == 0
    assert f"closed every year through {year - 1}" in capsys.readouterr().out
    assert await db.fetchval("SELECT count(*) FROM activity_ledger WHERE year < $1", year) == 0
    before = await snapshot(db)

    assert await replay_command(settings, from_beginning=True, from_timestamp=None,
                                no_notify=False, install_signals=False) == 0

    after = await snapshot(db)
    for table in ("annual_summary", "scenario_notifications", "mentor_preferences"):
        assert after[table] == before[table], table
    # The ledger gains only a tombstone for the replayed delete of a pruned session.
    new_rows = [row for row in after["activity_ledger"] if row not in before["activity_ledger"]]
    assert [(str(row["activity_id"]), row["mentor_id"]) for row in new_rows] == [(old_deleted, None)]
    assert await statuses(db) == {(mentor, year - 2, 2): "suppressed"}


async def test_a_stale_writer_cannot_count_a_closed_year_again(
    db: asyncpg.Connection, engine_env: dict[str, str]
) -> None:
    """The database guard: a writer that read the watermark before the prune (it refreshes
    every 30 s) still cannot count a duplicate of a pruned session."""
    settings = settings_from(engine_env, thresholds="5")
    year = current_year(settings)
    mentor = events.new_id()
    session = events.logged(mentor, occurred_at=at(year - 1))
    pool = await asyncpg.create_pool(settings.require_database(), min_size=1, max_size=2)
    try:
        writer = BatchWriter(PostgresBatchStore(pool), batch_options(settings), Metrics(), counted_types=None)

        async def write(event: dict[str, object]) -> None:
            envelope = Envelope(EVENT_ADAPTER.validate_json(json.dumps(event)), 0, "t", 0, 0,
                                int(time.time() * 1000))
            await writer.write([envelope])

        await write(session)
        assert writer.closed_through_year is None
        assert await prune_command(settings, before_year=year, tombstone_days=400) == 0
        await write(session)  # the same session again, and a new one of the closed year
        await write(events.logged(mentor, occurred_at=at(year - 1, day=15)))
        assert writer.closed_through_year is None  # not refreshed yet: the guard did it
    finally:
        await pool.close()

    assert await summary(db) == {(mentor, year - 1): 1}
    assert await db.fetchval("SELECT count(*) FROM activity_ledger") == 0


async def test_prune_never_lowers_the_watermark_and_drops_only_old_tombstones(
    db: asyncpg.Connection, engine_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    settings = settings_from(engine_env)
    year = current_year(settings)
    mentor = events.new_id()
    old_tombstone, new_tombstone = events.new_id(), events.new_id()
    await write_events(settings, [
        events.deleted(mentor, old_tombstone),
        events.deleted(mentor, new_tombstone),
        events.logged(mentor, occurred_at=at(year)),
    ])
    await db.execute("UPDATE activity_ledger SET recorded_at = now() - interval '500 days'"
                     " WHERE activity_id = $1", uuid(old_tombstone))

    assert await prune_command(settings, before_year=year, tombstone_days=400) == 0
    assert await prune_command(settings, before_year=year - 3, tombstone_days=400) == 0

    assert "already closed" in capsys.readouterr().out
    assert await db.fetchval("SELECT closed_through_year FROM engine_state") == year - 1
    left = {str(row["activity_id"]) for row in await db.fetch("SELECT activity_id FROM activity_ledger")}
    assert new_tombstone in left
    assert old_tombstone not in left
    assert len(left) == 2
    with pytest.raises(SettingsError, match="--before-year"):
        await prune_command(settings, before_year=year + 1, tombstone_days=400)


@pytest.mark.e2e
async def test_run_ignores_sessions_of_closed_years_and_counts_them_in_metrics(
    db: asyncpg.Connection, engine_env: dict[str, str], engine_process, kafka: KafkaHelper,
    topics: Topics,
) -> None:
    settings = settings_from(engine_env)
    year = current_year(settings)
    mentor = events.new_id()
    assert await prune_command(settings, before_year=year - 1, tombstone_days=400) == 0
    service = engine_process()
    await service.wait_ready()

    await kafka.produce_json_many(topics.activity, [
        events.logged(mentor, occurred_at=at(year - 2)),
        events.logged(mentor, occurred_at=at(year - 5)),
        events.logged(mentor, occurred_at=at(year)),
    ])

    await eventually(lambda: summary(db), lambda counts: counts == {(mentor, year): 1})
    metrics = await eventually(
        service.metrics, lambda text: 'milestones_events_total{outcome="closed_year"} 2' in text
    )
    assert 'milestones_events_total{outcome="counted"} 1' in metrics


async def test_prune_waiting_for_a_busy_ledger_holds_the_writers_back_at_most_a_second(
    db: asyncpg.Connection, engine_env: dict[str, str], database_url: str
) -> None:
    """The guard's DDL queues every ledger insert behind it while it waits: it gives way after
    its lock timeout and tries again, so a writer is never held back for long."""
    settings = settings_from(engine_env)
    year = current_year(settings)
    insert = (
        "INSERT INTO activity_ledger (activity_id, mentor_id, organization_id, year, occurred_at,"
        " activity_type, counted) VALUES (gen_random_uuid(), $1, $1, $2, now(), 'session', true)"
    )
    await write_events(settings, [events.logged(events.new_id(), occurred_at=at(year - 2))])
    busy = await asyncpg.connect(database_url)  # a long transaction that wrote to the ledger
    writer = await asyncpg.connect(database_url)
    try:
        long_transaction = busy.transaction()
        await long_transaction.start()
        await busy.execute(insert, uuid(events.ORG), year)
        pruning = asyncio.ensure_future(
            prune_command(settings, before_year=year, tombstone_days=400)
        )
        await asyncio.sleep(0.3)  # the prune is now waiting for its lock
        waits = []
        for _ in range(4):
            started = time.monotonic()
            await asyncio.wait_for(writer.execute(insert, uuid(events.ORG), year), 5)
            waits.append(time.monotonic() - started)
        assert not pruning.done()
        await long_transaction.commit()
        assert await asyncio.wait_for(pruning, 10) == 0
    finally:
        await busy.close()
        await writer.close()
    assert max(waits) < 1.6, waits
    assert await db.fetchval("SELECT closed_through_year FROM engine_state") == year - 1
