"""Read a topic to the end it had when reading started, every partition, no consumer group.

For the small topics operators look at or the engine restores from (the thresholds topic, the
dead-letter topic). No group: nothing is committed and ``run`` is never made to rebalance.
The end of a partition is the high watermark its first fetch reports (a fetch response carries
it; ``end_offsets()`` is not used, it is wrong on some Kafka-protocol brokers), so records that
keep arriving cannot keep a reader reading. ``since_ms`` starts each partition at the first
record at or after that time (ListOffsets by time; a broker that answers an earlier offset, as
Tansu does, only makes it read more, since records are filtered by timestamp here as well).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaTimeoutError

from consumer.settings import Settings
from consumer.stream.kafka import make_consumer, start_client, verify_kafka_access
from consumer.stream.teardown import within


class TopicMissing(Exception):
    """The topic does not exist (nothing was ever written to it)."""


@contextlib.asynccontextmanager
async def topic_records(
    settings: Settings, topic: str, *, timeout_s: float = 30.0, since_ms: int | None = None,
    start_timeout_s: float | None = None,
) -> AsyncIterator[AsyncIterator[ConsumerRecord[bytes, bytes]]]:
    """``async with topic_records(...) as records: async for record in records: ...``

    Records come in order within a partition; with ``since_ms``, only those timestamped at or
    after it. Raises :class:`TopicMissing`, or ``KafkaTimeoutError`` when the end is not
    reached within ``timeout_s``. A broker away: with ``start_timeout_s`` None, the service's
    start-up retries, then :class:`SettingsError`; with a number, one attempt bounded by it,
    then the client's ``KafkaError`` or ``TimeoutError`` (``status`` reports it, not exits 2).
    """
    consumer = make_consumer(settings, group_id=None)
    if start_timeout_s is None:
        await start_client(consumer, settings)  # a broker away: SettingsError naming the variable
    else:
        try:
            await verify_kafka_access(settings)  # refused credentials: exit 2, not "unreachable"
            await asyncio.wait_for(consumer.start(), start_timeout_s)
        except BaseException:
            await within(consumer.stop(), 5.0, f"stopping the reader of {topic}")
            raise
    try:
        await consumer.topics()  # refresh the metadata: a topic created since is seen
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            raise TopicMissing(topic)
        tps = [TopicPartition(topic, partition) for partition in sorted(partitions)]
        consumer.assign(tps)
        left = await _seek(consumer, tps, since_ms)
        yield _records(consumer, topic, left, since_ms or 0, timeout_s)
    finally:
        await within(consumer.stop(), 5.0, f"stopping the reader of {topic}")


async def _seek(
    consumer: AIOKafkaConsumer, tps: list[TopicPartition], since_ms: int | None
) -> list[TopicPartition]:
    """Position every partition; return those that may hold something to read."""
    if not since_ms:
        for tp in tps:
            await consumer.seek_to_beginning(tp)
        return tps
    starts = await consumer.offsets_for_times({tp: since_ms for tp in tps})
    left = []
    for tp in tps:
        found = starts.get(tp)
        if found is not None:  # None: no record at or after since_ms
            consumer.seek(tp, found.offset)
            left.append(tp)
    return left


async def _records(
    consumer: AIOKafkaConsumer, topic: str, left: list[TopicPartition], since_ms: int,
    timeout_s: float,
) -> AsyncIterator[ConsumerRecord[bytes, bytes]]:
    deadline = time.monotonic() + timeout_s
    ends: dict[TopicPartition, int] = {}
    while left:
        batch = await consumer.getmany(*left, timeout_ms=200, max_records=1_000)
        for tp in left:  # the end is fixed before anything is yielded
            if tp not in ends and (high := consumer.highwater(tp)) is not None:
                ends[tp] = high
        for tp in left:
            end = ends.get(tp)
            for record in batch.get(tp, ()):
                if end is not None and record.offset >= end:
                    break
                if record.timestamp >= since_ms:
                    yield record
        left = [tp for tp in left if tp not in ends or await consumer.position(tp) < ends[tp]]
        if left and time.monotonic() > deadline:
            raise KafkaTimeoutError(f"{topic}: end not reached in {timeout_s:g} s")
