"""The restore read-back: a database restored from a backup older than a long notification topic.

The topic holds 200,000 notifications the database has no record of, and the publisher has no
read positions (as for a backup taken before the publisher ever ran). Its first read-back reads
them all: chunk by chunk, each chunk's positions saved as it is settled, then it publishes
again. A milestone recorded afterwards whose notification is among those on the topic is marked
published from what the read-back kept, not sent again; a new one is sent once.
"""

from __future__ import annotations

import asyncio
import json
import time

import asyncpg
import pytest
from aiokafka.errors import KafkaTimeoutError

from consumer.ops.metrics import Metrics
from consumer.stream.read_back import ReadBack
from tests.faults.checks import (
    metric,
    notification_ids,
    outputs,
    session_time,
    sessions,
    stop_all,
)
from tests.faults.conftest import ProxiedBroker
from tests.integration.operations import connect, settings_from
from tests.support import events
from tests.support.engine import EngineLauncher
from tests.support.kafka import KafkaHelper
from tests.support.topics import Topics

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

EARLIER = 200_000


async def _positions(connection: asyncpg.Connection, topic: str) -> int:
    try:
        total = await connection.fetchval(
            "SELECT coalesce(sum(next_offset), 0) FROM publisher_positions WHERE topic = $1",
            topic)
    except asyncpg.UndefinedTableError:  # not migrated yet
        return 0
    return int(total)


@pytest.mark.timeout(240)
async def test_a_long_topic_without_records_is_read_back_in_saved_chunks_then_publishing_goes_on(
    kafka: KafkaHelper,
    topics: Topics,
    database_url: str,
    engine_process: EngineLauncher,
) -> None:
    occurred_at, year = session_time()
    emitted_before, fresh = events.new_id(), events.new_id()
    before_id = events.notification_id(emitted_before, year, 50)
    earlier = [events.new_id() for _ in range(EARLIER - 1)]
    started = time.monotonic()
    await kafka.produce_batched(topics.notifications, (
        (mentor.encode(), json.dumps({"notification_id": nid}).encode(),
         [("notification_id", nid.encode())])
        for mentor, nid in [(emitted_before, before_id)]
        + [(m, events.notification_id(m, year - 1, 50)) for m in earlier]
    ))
    produced_s = time.monotonic() - started

    engine = engine_process()
    await engine.wait_ready(timeout_s=60)
    connection = await asyncpg.connect(database_url)
    try:
        # Positions move while the read-back works, not only at its end.
        seen_between = set()
        deadline = time.monotonic() + 150
        while (position := await _positions(connection, topics.notifications)) < EARLIER:
            if position:
                seen_between.add(position)
            assert time.monotonic() < deadline, f"read-back at {position}\n{outputs([engine])}"
            await asyncio.sleep(0.05)
        read_back_s = time.monotonic() - started - produced_s
        assert seen_between, "the positions were saved only at the end of the read-back"
        kept = await connection.fetchval("SELECT count(*) FROM publisher_unrecorded")
        assert kept == EARLIER

        # Publishing goes on: the mentor emitted before the restore is recorded again and
        # marked from what the read-back kept; the fresh one is sent.
        await kafka.produce_json_many(
            topics.activity,
            sessions(emitted_before, 50, occurred_at) + sessions(fresh, 50, occurred_at),
        )
        fresh_id = events.notification_id(fresh, year, 50)
        deadline = time.monotonic() + 60
        while True:
            rows = dict(await connection.fetch(
                "SELECT id::text, status FROM scenario_notifications"))
            if rows == {before_id: "published", fresh_id: "published"}:
                break
            assert time.monotonic() < deadline, f"{rows}\n{outputs([engine])}"
            await asyncio.sleep(0.3)
        body = await engine.metrics()
        await stop_all([engine])
        assert await connection.fetchval("SELECT count(*) FROM publisher_unrecorded") == EARLIER - 1
    finally:
        await connection.close()

    on_topic = notification_ids(await kafka.read_all(topics.notifications, timeout_s=60))
    assert on_topic[before_id] == 1
    assert on_topic[fresh_id] == 1
    assert sum(on_topic.values()) == EARLIER + 1
    assert metric(body, "milestones_readback_hits_total") == 1
    print(f"\n{EARLIER:,} notifications produced in {produced_s:.1f} s, read back in"
          f" {read_back_s:.1f} s ({EARLIER / read_back_s:,.0f}/s, start-up included),"
          f" {len(seen_between)} intermediate positions seen")


async def test_a_read_back_that_stalls_gives_up_and_the_next_one_goes_on_from_where_it_was(
    proxied_broker: ProxiedBroker,
    proxied_kafka: KafkaHelper,
    topics: Topics,
    database_url: str,
    engine_env: dict[str, str],
) -> None:
    """No deadline, a stall limit: a read-back whose broker stops answering gives up after
    ``stall_timeout_s`` without a record, keeping what it settled; the next one starts there."""
    total = 100_000
    await proxied_kafka.produce_batched(topics.notifications, (
        (mentor.encode(), b"{}", [("notification_id", events.notification_id(mentor, 2025, 50)
                                   .encode())])
        for mentor in (events.new_id() for _ in range(total))
    ))
    settings = settings_from({**engine_env, **proxied_broker.env()})
    connection = await connect(database_url)
    watcher = await asyncpg.connect(database_url)
    read_back = ReadBack(settings, Metrics(), chunk=2_000, stall_timeout_s=2.0)
    try:
        proxied_broker.proxy.latency_s = 0.2  # a slow link: the read-back takes seconds
        first = asyncio.ensure_future(read_back.run(connection, asyncio.Event()))
        deadline = time.monotonic() + 60
        while not await _positions(watcher, topics.notifications):
            assert not first.done(), first
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        proxied_broker.freeze()
        try:
            with pytest.raises(KafkaTimeoutError, match="no record for 2 s"):
                await asyncio.wait_for(first, 30)
        finally:
            proxied_broker.thaw()
        saved = await _positions(watcher, topics.notifications)
        assert 0 < saved < total
        proxied_broker.proxy.latency_s = 0.0
        again = await read_back.run(connection, asyncio.Event())
        assert again == total - saved
        assert await _positions(watcher, topics.notifications) == total
        assert await watcher.fetchval("SELECT count(*) FROM publisher_unrecorded") == total
    finally:
        await read_back.close()
        await watcher.close()
        await connection.close()
