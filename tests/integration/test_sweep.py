"""``milestones sweep`` against the real Postgres (and the broker for what it emits)."""

from __future__ import annotations

import asyncio
import collections
import contextlib

import asyncpg
import pytest

from consumer.commands import sweep as sweep_module
from consumer.commands.common import current_year
from consumer.commands.sweep import sweep_command
from consumer.domain.milestones import notification_id
from consumer.store.sweep_sql import SweepRules, sweep_year
from tests.integration.operations import (
    eventually,
    settings_from,
    statuses,
    summary,
    uuid,
    writer_in_transaction,
)
from tests.support import events
from tests.support.kafka import KafkaHelper
from tests.support.topics import Topics

ORG = uuid(events.ORG)
OTHER_ORG = uuid(events.OTHER_ORG)


async def put_summary(
    db: asyncpg.Connection, mentor: str, year: int, count: int, organization: object = ORG
) -> None:
    await db.execute(
        "INSERT INTO annual_summary (user_id, year, session_count, organization_id)"
        " VALUES ($1, $2, $3, $4)",
        uuid(mentor), year, count, organization,
    )


async def test_sweep_records_what_is_missing_and_it_is_emitted(
    db: asyncpg.Connection, engine_env: dict[str, str], kafka: KafkaHelper, topics: Topics,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = settings_from(engine_env, thresholds="2,4,8")
    year = current_year(settings)
    reached, opted_out, below, late, custom, none = (events.new_id() for _ in range(6))
    no_milestones_org = uuid(events.new_id())
    await put_summary(db, reached, year, 5)  # 2 and 4; 2 is on record already
    await put_summary(db, opted_out, year, 2)
    await put_summary(db, below, year, 1)
    await put_summary(db, late, year - 2, 9)  # a past year: recorded, never emitted
    await put_summary(db, custom, year, 3, OTHER_ORG)  # its organization's own thresholds
    await put_summary(db, none, year, 30, no_milestones_org)
    thresholds = "INSERT INTO milestone_thresholds (organization_id, thresholds) VALUES ($1, $2)"
    await db.execute(thresholds, OTHER_ORG, [3, 1, 3])  # used sorted, without repeats
    await db.execute(thresholds, no_milestones_org, [])  # empty: no milestones at all
    await db.execute(
        "INSERT INTO mentor_preferences VALUES ($1, false, now())", uuid(opted_out)
    )
    await db.execute(
        "INSERT INTO scenario_notifications (id, user_id, organization_id, year, milestone_value,"
        " session_count, status) VALUES ($1, $2, $3, $4, 2, 2, 'published')",
        notification_id(uuid(reached), year, 2), uuid(reached), ORG, year,
    )

    assert await sweep_command(settings, year=year, organization=None) == 0
    assert await sweep_command(settings, year=year - 2, organization=None) == 0

    assert await statuses(db) == {
        (reached, year, 2): "published",  # the earlier record, untouched
        (reached, year, 4): "published",
        (opted_out, year, 2): "suppressed",
        (late, year - 2, 2): "suppressed",
        (late, year - 2, 4): "suppressed",
        (late, year - 2, 8): "suppressed",
        (custom, year, 1): "published",
        (custom, year, 3): "published",
    }
    rows = await db.fetch(
        "SELECT * FROM scenario_notifications WHERE user_id = $1 AND milestone_value = 4",
        uuid(reached),
    )
    assert rows[0]["activity_id"] is None
    assert rows[0]["session_count"] == 5
    assert rows[0]["reached_at"] == rows[0]["created_at"]
    sent = await kafka.wait_for_count(topics.notifications, 3)
    by_id = {record.json()["notification_id"]: record.json() for record in sent}
    assert set(by_id) == {
        str(notification_id(uuid(reached), year, 4)),
        str(notification_id(uuid(custom), year, 1)),
        str(notification_id(uuid(custom), year, 3)),
    }
    message = by_id[str(notification_id(uuid(reached), year, 4))]
    assert message["activity_id"] is None
    assert message["session_count"] == 5
    assert message["organization_id"] == events.ORG
    assert message["reached_at"] == message["created_at"]
    output = capsys.readouterr().out
    assert "recorded 4: 3 to send, 1 suppressed; sent 3, still pending 0" in output

    # A second sweep finds nothing left to record.
    assert await sweep_command(settings, year=year, organization=None) == 0
    assert "recorded 0" in capsys.readouterr().out


async def test_sweep_of_one_organization_leaves_the_others(
    db: asyncpg.Connection, engine_env: dict[str, str]
) -> None:
    settings = settings_from(engine_env, thresholds="2")
    year = current_year(settings)
    ours, theirs = events.new_id(), events.new_id()
    await put_summary(db, ours, year, 2, ORG)
    await put_summary(db, theirs, year, 2, OTHER_ORG)
    await db.execute("INSERT INTO mentor_preferences VALUES ($1, false, now())", uuid(ours))

    assert await sweep_command(settings, year=year, organization=events.ORG) == 0

    assert await statuses(db) == {(ours, year, 2): "suppressed"}


@pytest.mark.e2e
@pytest.mark.slow
async def test_two_sweeps_and_run_at_once_record_and_emit_each_milestone_once(
    db: asyncpg.Connection, engine_env: dict[str, str], engine_process, kafka: KafkaHelper,
    topics: Topics, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A threshold change reaches 150 mentors through two sweeps and the live service at once:
    the sweeps walk in small chunks while ``run`` counts each mentor's next session."""
    monkeypatch.setattr(sweep_module, "CHUNK_MENTORS", 16)
    settings = settings_from(engine_env, thresholds="2,4")
    year = current_year(settings)
    mentors = [events.new_id() for _ in range(150)]
    await db.execute("INSERT INTO milestone_thresholds VALUES ($1, '{5}')", ORG)
    engine = engine_process({"MILESTONES_THRESHOLDS": "2,4"})
    await engine.wait_ready()
    await kafka.produce_json_many(
        topics.activity,
        [events.logged(m, occurred_at=f"{year}-03-0{day}T10:00:00+01:00")
         for m in mentors for day in (1, 2, 3)],
    )
    await eventually(lambda: summary(db), lambda counts: sum(counts.values()) == 450)
    assert await statuses(db) == {}  # 3 sessions, threshold 5: nothing yet

    await db.execute("UPDATE milestone_thresholds SET thresholds = '{2,4}' WHERE organization_id = $1", ORG)
    fourth = kafka.produce_json_many(
        topics.activity, [events.logged(m, occurred_at=f"{year}-03-04T10:00:00+01:00") for m in mentors]
    )
    results = await asyncio.gather(
        sweep_command(settings, year=year, organization=None),
        sweep_command(settings, year=year, organization=None),
        fourth,
    )
    assert results[:2] == [0, 0]

    expected = {str(notification_id(uuid(m), year, value)) for m in mentors for value in (2, 4)}
    await eventually(lambda: summary(db), lambda counts: sum(counts.values()) == 600)
    await eventually(
        lambda: statuses(db),
        lambda found: len(found) == 300 and set(found.values()) == {"published"},
    )
    await kafka.wait_for(topics.notifications, lambda rs: len(rs) >= len(expected), timeout_s=30)
    await asyncio.sleep(1.5)  # a duplicate would show up by now
    records = await kafka.read_all(topics.notifications)
    sent = collections.Counter(record.json()["notification_id"] for record in records)
    assert set(sent) == expected
    assert max(sent.values()) == 1
    assert engine.running()
    assert "deadlock" not in engine.output().lower()
    with contextlib.suppress(Exception):
        await engine.stop()


async def test_a_milestone_another_writer_records_during_the_sweep_is_kept_and_not_doubled(
    db: asyncpg.Connection, engine_env: dict[str, str], database_url: str,
) -> None:
    """The sweep inserts without ON CONFLICT; a record committed by another writer between the
    chunk's evaluation and its insert rolls the chunk back, and the chunk runs again."""
    settings = settings_from(engine_env, thresholds="2")
    year = current_year(settings)
    raced, other = events.new_id(), events.new_id()
    await put_summary(db, raced, year, 3)
    await put_summary(db, other, year, 3)
    async with writer_in_transaction(database_url) as (writer, racing, pool):
        await writer.execute(
            "INSERT INTO scenario_notifications (id, user_id, organization_id, year,"
            " milestone_value, session_count, status) VALUES ($1, $2, $3, $4, 2, 3, 'published')",
            notification_id(uuid(raced), year, 2), uuid(raced), ORG, year)
        rules = SweepRules(year, (2,), settings.timezone, settings.notify_grace_days)
        sweeping = asyncio.ensure_future(sweep_year(pool, rules, workers=1))
        await asyncio.sleep(0.5)
        assert not sweeping.done()  # its insert waits for the other writer's key
        await racing.commit()
        result = await asyncio.wait_for(sweeping, 10)

    assert result.recorded == 1
    assert await statuses(db) == {(raced, year, 2): "published", (other, year, 2): "pending"}
