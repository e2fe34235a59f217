"""``milestones replay`` against the real broker and Postgres; ``run`` as a real process."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from datetime import UTC, datetime

import asyncpg
import pytest
from aiokafka import TopicPartition

from consumer.commands.common import current_year
from consumer.commands.replay import (
    StartingPoint,
    Survey,
    missing_history,
    removed_history,
    replay_command,
    warn_about_removed_history,
)
from consumer.domain.milestones import notification_id
from consumer.settings import SettingsError
from tests.integration.operations import (
    commit_at_end,
    eventually,
    settings_from,
    snapshot,
    statuses,
    summary,
    uuid,
)
from tests.support import events
from tests.support.kafka import KafkaHelper
from tests.support.postgres import create_database, drop_database
from tests.support.topics import Topics


def day(year: int, number: int) -> str:
    return f"{year}-03-{number:02d}T10:00:00+01:00"


async def replay(env: dict[str, str], **flags: object) -> int:
    settings = settings_from(env, thresholds="2,3")
    return await replay_command(
        settings,
        from_beginning=bool(flags.get("from_beginning", False)),
        from_timestamp=flags.get("from_timestamp"),  # type: ignore[arg-type]
        no_notify=bool(flags.get("no_notify", False)),
        install_signals=False,
    )


@pytest.mark.e2e
async def test_replay_twice_changes_nothing(
    db: asyncpg.Connection, engine_env: dict[str, str], engine_process, kafka: KafkaHelper,
    topics: Topics,
) -> None:
    year = current_year(settings_from(engine_env))
    reached, opted_out, removed = events.new_id(), events.new_id(), events.new_id()
    await kafka.produce_json(topics.preferences, events.preference(opted_out, enabled=False))
    gone = events.new_id()
    await kafka.produce_json_many(topics.activity, [
        *(events.logged(reached, occurred_at=day(year, n)) for n in (1, 2, 3)),
        *(events.logged(opted_out, occurred_at=day(year, n)) for n in (1, 2)),
        events.logged(removed, gone, occurred_at=day(year, 1)),
        events.deleted(removed, gone),
    ])
    await kafka.produce(topics.activity, b"{not json", key=b"x")
    env = {**engine_env, "MILESTONES_THRESHOLDS": "2,3"}

    first = engine_process(env, args=("replay",))
    assert await first.wait(60) == 0, first.output()
    after_first = await snapshot(db)
    second = engine_process(env, args=("replay", "--from-beginning"))
    assert await second.wait(60) == 0, second.output()

    assert await snapshot(db) == after_first
    assert await summary(db) == {(reached, year): 3, (opted_out, year): 2, (removed, year): 0}
    assert await statuses(db) == {
        (reached, year, 2): "published",
        (reached, year, 3): "published",
        (opted_out, year, 2): "suppressed",
    }
    assert "replay caught up" in first.stdout()
    assert "2 to send (2 sent), 1 suppressed; 1 rejected message(s) skipped" in first.stdout()
    assert "0 new session(s), 0 removed; milestones recorded: 0 to send" in second.stdout()
    assert len(await kafka.read_all(topics.notifications)) == 2
    assert await kafka.read_all(topics.dlq) == []  # the live service dead-letters, not a replay
    assert "rejected (not dead-lettered again: the service did when it first read it)" in (
        first.stderr()
    )
    assert "dead letter " not in first.stderr() + second.stderr()


async def test_replay_of_a_topic_holding_deletions(
    db: asyncpg.Connection, engine_env: dict[str, str], kafka: KafkaHelper, topics: Topics
) -> None:
    year = current_year(settings_from(engine_env))
    mentor, other = events.new_id(), events.new_id()
    a, b, c, early, never = (events.new_id() for _ in range(5))
    await kafka.produce_json_many(topics.activity, [
        events.logged(mentor, a, day(year, 1)),
        events.logged(mentor, b, day(year, 2)),   # count 2: milestone 2
        events.deleted(mentor, b),                # back to 1: the milestone stays
        events.deleted(mentor, early),            # a delete before its log...
        events.logged(mentor, early, day(year, 3)),  # ...so this never counts
        events.deleted(other, never),             # a delete of a session never logged
        events.logged(mentor, c, day(year, 4)),   # 2 again: nothing new
        events.logged(other, None, day(year - 1, 5)),
    ])
    # Its mentor_id does not matter (keyed like the session so that it comes after it).
    await kafka.produce_json(topics.activity, events.deleted(other, a), key=mentor.encode())

    assert await replay(engine_env) == 0

    assert await summary(db) == {(mentor, year): 1, (other, year - 1): 1}
    assert await statuses(db) == {(mentor, year, 2): "published"}
    ledger = await db.fetch("SELECT activity_id, counted, deleted_at IS NOT NULL AS deleted"
                            " FROM activity_ledger")
    state = {str(row["activity_id"]): (row["counted"], row["deleted"]) for row in ledger}
    assert state[a] == (False, True)
    assert state[b] == (False, True)
    assert state[early] == (False, True)
    assert state[never] == (False, True)
    assert state[c] == (True, False)


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("no_notify", [True, False], ids=["no-notify", "notify"])
async def test_replay_beside_run_congratulates_the_mentor_crossing_live(
    db: asyncpg.Connection, engine_env: dict[str, str], engine_process, kafka: KafkaHelper,
    topics: Topics, broker: str, no_notify: bool,
) -> None:
    """The database lost what the service had counted (it had read the topic to the end);
    the replay restores it while ``run`` goes on, and a mentor crosses a milestone live."""
    year = current_year(settings_from(engine_env))
    old, live, stamped_later = events.new_id(), events.new_id(), events.new_id()
    await kafka.produce_json_many(topics.activity, [
        events.logged(old, occurred_at=day(year, 1)),
        events.logged(old, occurred_at=day(year, 2)),  # crossed 2 long ago
        events.logged(live, occurred_at=day(year, 1)),
        events.logged(stamped_later, occurred_at=day(year, 1)),
    ])
    # Only the replay reads this one (the service is committed past it): its record is newer
    # than the replay's start, so its crossing congratulates even under --no-notify.
    await kafka.produce_json(
        topics.activity, events.logged(stamped_later, occurred_at=day(year, 2)),
        timestamp_ms=int(time.time() * 1000) + 3_600_000,
    )
    await commit_at_end(broker, engine_env["MILESTONES_GROUP_ID"],
                        [topics.activity, topics.preferences])
    service = engine_process({"MILESTONES_THRESHOLDS": "2,3"})
    await service.wait_ready()

    replaying = asyncio.ensure_future(replay(engine_env, from_beginning=True, no_notify=no_notify))
    await eventually(lambda: summary(db), lambda counts: counts.get((live, year)) == 1)
    await kafka.produce_json(topics.activity, events.logged(live, occurred_at=day(year, 2)))
    assert await asyncio.wait_for(replaying, 60) == 0

    expected_old = "suppressed" if no_notify else "published"
    found = await eventually(
        lambda: statuses(db),
        lambda found: found.get((live, year, 2)) == "published" and len(found) == 3,
    )
    assert found == {
        (old, year, 2): expected_old,
        (live, year, 2): "published",
        (stamped_later, year, 2): "published",
    }
    assert await summary(db) == {(old, year): 2, (live, year): 2, (stamped_later, year): 2}
    wanted = {str(notification_id(uuid(m), year, 2)) for m in (live, stamped_later)}
    if not no_notify:
        wanted.add(str(notification_id(uuid(old), year, 2)))
    await kafka.wait_for(topics.notifications, lambda rs: len(rs) >= len(wanted))
    await asyncio.sleep(1.0)  # a duplicate would show up by now
    records = await kafka.read_all(topics.notifications)
    sent = collections.Counter(record.json()["notification_id"] for record in records)
    assert set(sent) == wanted
    assert max(sent.values()) == 1
    assert service.running()


async def test_replay_from_a_timestamp_is_caught_up_and_idempotent(
    db: asyncpg.Connection, engine_env: dict[str, str], kafka: KafkaHelper, topics: Topics
) -> None:
    year = current_year(settings_from(engine_env))
    mentor = events.new_id()
    await kafka.produce_json(topics.activity, events.logged(mentor, occurred_at=day(year, 1)))
    assert await replay(engine_env) == 0
    start = datetime.now(UTC).isoformat()
    await kafka.produce_json(topics.activity, events.logged(mentor, occurred_at=day(year, 2)))

    assert await replay(engine_env, from_timestamp=start) == 0

    assert await summary(db) == {(mentor, year): 2}


def test_a_start_time_needs_an_offset() -> None:
    with pytest.raises(SettingsError, match="--from-timestamp"):
        StartingPoint.from_flags(from_beginning=False, from_timestamp="2026-01-01T00:00:00")
    with pytest.raises(SettingsError, match="--from-timestamp"):
        StartingPoint.from_flags(from_beginning=False, from_timestamp="yesterday")
    point = StartingPoint.from_flags(from_beginning=False, from_timestamp="2026-01-01T00:00:00Z")
    assert point.timestamp_ms == 1_767_225_600_000


async def test_a_replay_stopped_before_it_caught_up_exits_1(
    db: asyncpg.Connection, engine_env: dict[str, str], kafka: KafkaHelper, topics: Topics,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await kafka.produce_json(topics.activity, events.logged(events.new_id()))
    stop = asyncio.Event()
    stop.set()  # as SIGTERM would, before the first batch

    code = await replay_command(settings_from(engine_env), from_beginning=True,
                                from_timestamp=None, no_notify=False, install_signals=False,
                                stop=stop)

    assert code == 1
    assert "run `milestones replay` again to continue" in capsys.readouterr().err
    assert await summary(db) == {}


def test_every_partition_that_no_longer_starts_at_offset_0_is_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Whatever the database holds (the warning no longer asks it): Tansu cannot delete
    records (it closes the connection on DeleteRecords), so the decision is tested here and
    the real command's path by every replay test (all partitions start at 0: no warning)."""
    cut, whole, other = TopicPartition("a", 0), TopicPartition("a", 1), TopicPartition("b", 3)
    beginnings = {cut: 40, whole: 0, other: 7}
    assert removed_history(beginnings) == [cut, other]

    warn_about_removed_history(Survey(beginnings=beginnings))

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "topic a no longer starts at offset 0 ([0] at 40): retention removed records there,"
        " and a replay cannot rebuild what retention removed",
        "topic b no longer starts at offset 0 ([3] at 7): retention removed records there,"
        " and a replay cannot rebuild what retention removed",
    ]


def test_a_database_holding_less_than_the_group_committed_is_missing_history() -> None:
    kept, restored, fresh, never, retained = (TopicPartition("a", n) for n in range(5))
    committed: dict[TopicPartition, int | None] = {
        kept: 100, restored: 100, fresh: 5, never: None, retained: 50,
    }
    held = {kept: 120, restored: 60}  # a crash after saving, before committing: 120 > 100
    beginnings = {retained: 50}  # what is below 50 is gone: resuming at 50 skips nothing
    assert missing_history(committed, held, beginnings) == [restored, fresh]
    assert missing_history({kept: 100}, {kept: 100}, {}) == []


@pytest.mark.e2e
async def test_a_plain_replay_into_a_fresh_database_refuses_until_told_to_start_from_the_beginning(
    db: asyncpg.Connection, engine_env: dict[str, str], engine_process, kafka: KafkaHelper,
    topics: Topics, postgres_admin_dsn: str,
) -> None:
    year = current_year(settings_from(engine_env))
    mentor = events.new_id()
    await kafka.produce_json_many(
        topics.activity, [events.logged(mentor, occurred_at=day(year, n)) for n in (1, 2, 3)]
    )
    first = engine_process(args=("replay",))  # a new group: from the beginning
    assert await first.wait(60) == 0, first.output()
    assert await summary(db) == {(mentor, year): 3}
    name, fresh_url = await create_database(postgres_admin_dsn)
    try:
        fresh_env = {"MILESTONES_DATABASE_URL": fresh_url}

        refused = engine_process(fresh_env, args=("replay",))

        assert await refused.wait(60) == 2, refused.output()
        lines = [line for line in refused.stderr().splitlines() if "--from-beginning" in line]
        assert len(lines) == 1, refused.output()
        assert lines[0].startswith("milestones: replay: this database holds less than the"
                                   f" replay group {engine_env['MILESTONES_GROUP_ID']}-replay")
        assert lines[0].endswith("add --from-beginning")
        fresh = await asyncpg.connect(fresh_url)
        try:
            assert await summary(fresh) == {}  # nothing was read
            full = engine_process(fresh_env, args=("replay", "--from-beginning"))
            assert await full.wait(60) == 0, full.output()
            assert await summary(fresh) == {(mentor, year): 3}
            again = engine_process(fresh_env, args=("replay",))  # it holds the history now
            assert await again.wait(60) == 0, again.output()
            assert "0 new session(s)" in again.stdout()
        finally:
            await fresh.close()
    finally:
        await drop_database(postgres_admin_dsn, name)
