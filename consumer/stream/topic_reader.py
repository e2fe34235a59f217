"""Read a whole topic, every partition from its first offset to its high watermark, no group.

For the small topics operators look at or the engine restores from (the thresholds topic, the
dead-letter topic). The end is judged by the fetch high watermark (``highwater``), which a
fetch response carries; ``end_offsets()`` is not used (wrong on some Kafka-protocol brokers).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaTimeoutError

from consumer.settings import Settings
from consumer.stream.kafka import make_consumer
from consumer.stream.teardown import within


class TopicMissing(Exception):
    """The topic does not exist (nothing was ever written to it)."""


@contextlib.asynccontextmanager
async def topic_records(
    settings: Settings, topic: str, *, timeout_s: float = 30.0
) -> AsyncIterator[AsyncIterator[ConsumerRecord[bytes, bytes]]]:
    """``async with topic_records(...) as records: async for record in records: ...``

    Records come in order within a partition. Raises :class:`TopicMissing`, or
    ``KafkaTimeoutError`` when the end is not reached within ``timeout_s``.
    """
    from consumer.service import start_client  # the service imports this module's users

    consumer = make_consumer(settings, group_id=None)
    await start_client(consumer, settings)  # a broker away: SettingsError naming the variable
    try:
        await consumer.topics()  # refresh the metadata: a topic created since is seen
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            raise TopicMissing(topic)
        tps = [TopicPartition(topic, partition) for partition in sorted(partitions)]
        consumer.assign(tps)
        for tp in tps:
            await consumer.seek_to_beginning(tp)

        async def records() -> AsyncIterator[ConsumerRecord[bytes, bytes]]:
            deadline = time.monotonic() + timeout_s
            left = list(tps)
            while left:
                batch = await consumer.getmany(*left, timeout_ms=200, max_records=1_000)
                for tp in left:
                    for record in batch.get(tp, ()):
                        yield record
                still = []
                for tp in left:
                    high = consumer.highwater(tp)
                    if high is None or await consumer.position(tp) < high:
                        still.append(tp)
                left = still
                if left and time.monotonic() > deadline:
                    raise KafkaTimeoutError(f"{topic}: end not reached in {timeout_s:g} s")

        yield records()
    finally:
        await within(consumer.stop(), 5.0, f"stopping the reader of {topic}")
