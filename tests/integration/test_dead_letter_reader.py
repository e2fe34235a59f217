"""Reading the dead-letter topic back (for ``status`` and ``dead-letters``), on the real broker."""

from __future__ import annotations

import time

import pytest
from aiokafka.errors import KafkaError

from consumer.stream.dead_letter_reader import read_dead_letters
from tests.conftest import TopicsFactory
from tests.integration.operations import settings_from
from tests.support.kafka import KafkaHelper

DAY_MS = 86_400_000


def headers(reason: str, offset: int) -> dict[str, str]:
    return {"error": reason, "source_topic": "activity-logged", "source_partition": "3",
            "source_offset": str(offset)}


async def test_reads_the_dead_letters_since_a_time_with_their_headers(
    engine_env: dict[str, str], kafka: KafkaHelper, topics_factory: TopicsFactory
) -> None:
    topics = await topics_factory(dlq=2)
    settings = settings_from(engine_env, dlq_topic=topics.dlq)
    now = int(time.time() * 1000)
    for partition, age_ms, offset in ((0, 3 * DAY_MS, 1), (1, DAY_MS, 2), (0, 60_000, 3),
                                      (1, 1_000, 4), (0, 0, 5)):
        await kafka.produce(topics.dlq, b'{"bad": true}', key=b"k", partition=partition,
                            timestamp_ms=now - age_ms, headers=headers(f"reason {offset}", offset))
    await kafka.produce(topics.dlq, None, key=b"k", partition=1, timestamp_ms=now,
                        headers=headers("null value", 6))

    recent = await read_dead_letters(settings, since_ms=now - 3_600_000, timeout_s=10)

    assert recent.complete
    assert recent.topic_exists
    assert recent.total == 4
    assert [(letter.partition, letter.reason) for letter in recent.letters] == [
        (0, "reason 3"), (0, "reason 5"), (1, "reason 4"), (1, "null value")
    ]
    first = recent.letters[0]
    assert first.source == ("activity-logged", 3, 3)
    assert first.value == b'{"bad": true}'
    assert first.key == b"k"
    assert recent.letters[-1].value is None

    everything = await read_dead_letters(settings, timeout_s=10, keep=2)
    assert everything.total == 6
    assert len(everything.letters) == 2

    nothing = await read_dead_letters(settings, since_ms=now + DAY_MS, timeout_s=10)
    assert (nothing.total, nothing.complete) == (0, True)


async def test_an_empty_or_missing_topic_has_no_dead_letters(
    engine_env: dict[str, str], topics_factory: TopicsFactory
) -> None:
    topics = await topics_factory(dlq=3)
    empty = await read_dead_letters(settings_from(engine_env, dlq_topic=topics.dlq), timeout_s=10)
    assert (empty.total, empty.complete, empty.topic_exists) == (0, True, True)


async def test_an_unreachable_broker_raises_within_the_bound(engine_env: dict[str, str]) -> None:
    settings = settings_from(engine_env, kafka_bootstrap_servers="127.0.0.1:9")
    started = time.monotonic()
    with pytest.raises((KafkaError, TimeoutError)):
        await read_dead_letters(settings, timeout_s=2)
    assert time.monotonic() - started < 5
