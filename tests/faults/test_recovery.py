"""Operators' accidents and repairs: a database restored from an old backup, a notification
topic deleted and created again, a row set back to ``pending`` on purpose.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import asyncpg
import pytest

from tests.faults.checks import (
    assert_end_state,
    expected_ids,
    notification_ids,
    outputs,
    session_time,
    sessions,
    stop_all,
    wait_until_counted,
    wait_until_emitted,
)
from tests.faults.conftest import ProxiedBroker
from tests.support import events
from tests.support.engine import EngineLauncher
from tests.support.kafka import KafkaHelper
from tests.support.postgres import with_database
from tests.support.topics import Topics

pytestmark = pytest.mark.e2e


async def _execute(dsn: str, sql: str, *args: object) -> str:
    connection = await asyncpg.connect(dsn)
    try:
        result: str = await connection.execute(sql, *args)
        return result
    finally:
        await connection.close()


async def test_a_database_restored_from_an_old_backup_then_replayed_emits_nothing_twice(
    kafka: KafkaHelper,
    topics: Topics,
    database_url: str,
    postgres_admin_dsn: str,
    engine_process: EngineLauncher,
) -> None:
    occurred_at, year = session_time()
    early, late = events.new_id(), events.new_id()
    name = urlsplit(database_url).path.lstrip("/")
    backup = f"{name}_backup"
    admin = with_database(postgres_admin_dsn, "postgres")

    engine = engine_process()
    await engine.wait_ready(timeout_s=60)
    await kafka.produce_json_many(topics.activity, sessions(early, 50, occurred_at))
    await wait_until_emitted(kafka, topics, database_url, expected_ids({early: 50}, year),
                             timeout_s=60, describe=lambda: outputs([engine]))
    await stop_all([engine])
    await _execute(admin, f'CREATE DATABASE "{backup}" TEMPLATE "{name}"')  # the backup
    try:
        # After the backup: the early mentor reaches 100, a second one 50. Both are emitted.
        engine = engine_process()
        await engine.wait_ready(timeout_s=60)
        await kafka.produce_json_many(
            topics.activity, sessions(early, 50, occurred_at) + sessions(late, 50, occurred_at)
        )
        counts = {early: 100, late: 50}
        await wait_until_emitted(kafka, topics, database_url, expected_ids(counts, year),
                                 timeout_s=60, describe=lambda: outputs([engine]))
        await stop_all([engine])

        # The restore: the database is as it was at the backup, the group's offsets are not.
        await _execute(admin, f'DROP DATABASE "{name}" WITH (FORCE)')
        await _execute(admin, f'CREATE DATABASE "{name}" TEMPLATE "{backup}"')
    finally:
        await _execute(admin, f'DROP DATABASE IF EXISTS "{backup}" WITH (FORCE)')

    # The runbook: replay the input topics (counts and records come back), then run. The
    # publisher's read-back starts at the positions of the backup and finds both notifications
    # on the topic: they are marked published, not sent again.
    replay = engine_process(args=("replay", "--from-beginning"))
    assert await replay.wait(120) == 0, replay.output()
    await wait_until_counted(database_url, counts, year, timeout_s=30,
                             describe=lambda: outputs([replay]))
    engine = engine_process()
    await engine.wait_ready(timeout_s=60)
    await wait_until_emitted(kafka, topics, database_url, expected_ids(counts, year),
                             timeout_s=60, describe=lambda: outputs([replay, engine]))
    await stop_all([engine])
    await assert_end_state(kafka, topics, database_url, counts, year)


@pytest.mark.parametrize("topics", [{"notifications": 1}], indirect=True)
async def test_a_recreated_notification_topic_is_read_back_from_its_start(
    proxied_broker: ProxiedBroker,
    proxied_kafka: KafkaHelper,
    topics: Topics,
    database_url: str,
    engine_process: EngineLauncher,
) -> None:
    """Deleting the topic loses what it held (not re-sent by itself; the repair re-emits it),
    and the positions recorded for the old topic must not hide the new one's records from the
    read-back after a lost acknowledgement."""
    occurred_at, year = session_time()
    env = {**proxied_broker.env(), "MILESTONES_KAFKA_REQUEST_TIMEOUT_MS": "3000"}
    old = {events.new_id(): 50 for _ in range(5)}
    engine = engine_process(env)
    await engine.wait_ready(timeout_s=60)
    await proxied_kafka.produce_json_many(
        topics.activity, [e for m in old for e in sessions(m, 50, occurred_at)]
    )
    await wait_until_emitted(proxied_kafka, topics, database_url, expected_ids(old, year),
                             timeout_s=60, describe=lambda: outputs([engine]))
    await stop_all([engine])

    # The topic is deleted and created again, empty: the recorded position (5) is past its end.
    await proxied_kafka.delete_topics([topics.notifications])
    await asyncio.sleep(1.0)
    await proxied_kafka.create_topics_with_counts({topics.notifications: 1})
    swallowed = proxied_broker.proxy.drop_response_to_produce(topics.notifications)
    engine = engine_process(env)
    await engine.wait_ready(timeout_s=60)
    fresh = events.new_id()
    await proxied_kafka.produce_json_many(topics.activity, sessions(fresh, 50, occurred_at))
    await asyncio.wait_for(swallowed.wait(), 60)  # written at offset 0, acknowledgement lost
    await wait_until_emitted(proxied_kafka, topics, database_url,
                             expected_ids({fresh: 50}, year), timeout_s=60,
                             describe=lambda: outputs([engine]))
    on_topic = notification_ids(await proxied_kafka.read_all(topics.notifications))
    assert on_topic == {events.notification_id(fresh, year, 50): 1}, on_topic  # not refilled

    # The operator's repair: the lost notifications set back to pending are emitted again.
    repaired = await _execute(database_url, "UPDATE scenario_notifications SET status = 'pending'"
                                            " WHERE id <> $1", events.notification_id(fresh, year, 50))
    assert repaired == "UPDATE 5"
    counts = {**old, fresh: 50}
    await wait_until_emitted(proxied_kafka, topics, database_url, expected_ids(counts, year),
                             timeout_s=60, describe=lambda: outputs([engine]))
    await stop_all([engine])
    await assert_end_state(proxied_kafka, topics, database_url, counts, year)


async def _copies(kafka: KafkaHelper, topics: Topics, nid: str) -> list[int]:
    """The offsets of every copy of ``nid`` on the notification topic."""
    return [record.offset for record in await kafka.read_all(topics.notifications)
            if record.header("notification_id") == nid]


async def _published_at(dsn: str, nid: str) -> tuple[str, int | None]:
    connection = await asyncpg.connect(dsn)
    try:
        row = await connection.fetchrow(
            "SELECT status, published_offset FROM scenario_notifications WHERE id = $1", nid)
    finally:
        await connection.close()
    assert row is not None
    return row["status"], row["published_offset"]


async def _until_copies(kafka: KafkaHelper, topics: Topics, dsn: str, nid: str, count: int,
                        describe: Callable[[], str]) -> list[int]:
    """Until the topic holds ``count`` copies of ``nid`` and its row is published again."""
    deadline = time.monotonic() + 60
    while True:
        copies = await _copies(kafka, topics, nid)
        status, _ = await _published_at(dsn, nid)
        if len(copies) >= count and status == "published":
            return copies
        assert time.monotonic() < deadline, f"{copies}, row {status}\n{describe()}"
        await asyncio.sleep(0.3)


async def test_a_row_set_back_to_pending_is_sent_again_even_where_the_read_back_meets_its_copy(
    kafka: KafkaHelper,
    topics: Topics,
    database_url: str,
    engine_process: EngineLauncher,
) -> None:
    """The operator's re-send: a row set back to ``pending`` is emitted again, also when the
    read-back that starts the next lease reads across the earlier copy (here the positions
    are reset, as after a restore); and the re-send itself keeps the crash guarantee: a crash
    after its acknowledgement is settled by the read-back, not sent a third time."""
    occurred_at, year = session_time()
    mentor = events.new_id()
    nid = events.notification_id(mentor, year, 50)
    engine = engine_process()
    await engine.wait_ready(timeout_s=60)
    await kafka.produce_json_many(topics.activity, sessions(mentor, 50, occurred_at))
    first = await _until_copies(kafka, topics, database_url, nid, 1, lambda: outputs([engine]))
    await stop_all([engine])

    # The repair, with the read positions back at the start of the topic.
    await _execute(database_url, "UPDATE scenario_notifications SET status = 'pending'"
                                 " WHERE id = $1", nid)
    await _execute(database_url, "DELETE FROM publisher_positions")
    # The re-send is acknowledged, and the process dies before marking it.
    crashing = engine_process({"MILESTONES_FAULT_POINT": "after_send_ack"})
    assert await crashing.wait(60) == -signal.SIGKILL, crashing.output()
    assert len(await _copies(kafka, topics, nid)) == 2
    survivor = engine_process({"MILESTONES_LOG_LEVEL": "DEBUG"})
    await survivor.wait_ready(timeout_s=60)
    both = lambda: outputs([crashing, survivor])  # noqa: E731
    second = await _until_copies(kafka, topics, database_url, nid, 2, both)
    assert await _published_at(database_url, nid) == ("published", second[-1])

    # Once more while the engine runs: a third copy.
    await _execute(database_url, "UPDATE scenario_notifications SET status = 'pending'"
                                 " WHERE id = $1", nid)
    third = await _until_copies(kafka, topics, database_url, nid, 3, both)
    await asyncio.sleep(1.0)  # nothing more comes
    assert await _copies(kafka, topics, nid) == third
    await stop_all([survivor])
    assert (len(first), len(second), len(third)) == (1, 2, 3), third
    status, offset = await _published_at(database_url, nid)
    assert (status, offset) == ("published", third[-1])
    # Each send is logged at DEBUG with the notification id and where it landed.
    assert f"sent {nid} to {topics.notifications}[" in survivor.output()
    assert f"]@{offset}" in survivor.output()
