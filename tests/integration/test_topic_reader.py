"""Reading a topic back without a group (the dead-letter and thresholds topics), on the real broker."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka.errors import KafkaError

from consumer.settings import Settings
from consumer.stream.topic_reader import TopicMissing, topic_records
from tests.conftest import TopicsFactory
from tests.integration.operations import settings_from
from tests.support.kafka import KafkaHelper

DAY_MS = 86_400_000


async def read(
    settings: Settings, topic: str, *, timeout_s: float = 10, since_ms: int | None = None,
    start_timeout_s: float | None = None,
) -> list[tuple[int, bytes | None]]:
    async with topic_records(settings, topic, timeout_s=timeout_s, since_ms=since_ms,
                             start_timeout_s=start_timeout_s) as records:
        return [(record.partition, record.value) async for record in records]


async def test_reads_since_a_time_in_offset_order_within_each_partition(
    engine_env: dict[str, str], kafka: KafkaHelper, topics_factory: TopicsFactory
) -> None:
    topics = await topics_factory(dlq=2)
    settings = settings_from(engine_env)
    now = int(time.time() * 1000)
    for partition, age_ms, value in ((0, 3 * DAY_MS, b"a"), (1, DAY_MS, b"b"), (0, 60_000, b"c"),
                                     (1, 1_000, b"d"), (0, 0, b"e")):
        await kafka.produce(topics.dlq, value, key=b"k", partition=partition,
                            timestamp_ms=now - age_ms)

    recent = await read(settings, topics.dlq, since_ms=now - 3_600_000, timeout_s=10)
    everything = await read(settings, topics.dlq, timeout_s=10)
    future = await read(settings, topics.dlq, since_ms=now + DAY_MS, timeout_s=10)

    assert sorted(recent) == [(0, b"c"), (0, b"e"), (1, b"d")]
    assert [value for partition, value in recent if partition == 0] == [b"c", b"e"]
    assert sorted(everything) == [(0, b"a"), (0, b"c"), (0, b"e"), (1, b"b"), (1, b"d")]
    assert future == []


async def test_records_that_keep_arriving_do_not_keep_it_reading(
    engine_env: dict[str, str], kafka: KafkaHelper, topics_factory: TopicsFactory
) -> None:
    topics = await topics_factory(dlq=1)
    await kafka.produce_json_many(topics.dlq, [{"n": n} for n in range(2_500)])
    settings = settings_from(engine_env)
    seen = []
    async with topic_records(settings, topics.dlq, timeout_s=20) as records:
        async for record in records:
            seen.append(record.value)
            if len(seen) > 2_400:  # late records arrive while the last ones are read
                await kafka.produce(topics.dlq, b"late", key=b"k")
            if len(seen) == 2_500:  # and a fetch has time to report them
                await asyncio.sleep(0.5)
    assert len(seen) == 2_500
    assert b"late" not in seen


async def test_an_empty_topic_has_no_records_and_a_missing_one_says_so(
    engine_env: dict[str, str], topics_factory: TopicsFactory
) -> None:
    topics = await topics_factory(dlq=3)
    settings = settings_from(engine_env)
    assert await read(settings, topics.dlq, timeout_s=10) == []
    with pytest.raises(TopicMissing):
        await read(settings, f"{topics.dlq}-never-made", timeout_s=10)


async def test_an_unreachable_broker_raises_within_the_start_bound(
    engine_env: dict[str, str],
) -> None:
    settings = settings_from(engine_env, kafka_bootstrap_servers="127.0.0.1:9")
    started = time.monotonic()
    with pytest.raises((KafkaError, asyncio.TimeoutError)):
        await read(settings, "anything", start_timeout_s=2)
    assert time.monotonic() - started < 5
