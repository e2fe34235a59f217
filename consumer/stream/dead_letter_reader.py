"""Reading the dead-letter topic back: what ``status`` counts and ``dead-letters`` lists.

It reads without a consumer group (partitions assigned by hand), so it never disturbs ``run``.
It starts each partition at the first record at or after ``since_ms`` (ListOffsets by time;
a broker that answers an earlier offset, as Tansu does, only makes it read more: records are
filtered by timestamp again here) and stops at the high watermark its first fetch of each
partition reports (never ``end_offsets()``, which Tansu answers wrongly), so dead letters that
keep arriving cannot keep it reading. The scan is bounded in time and in the
records it keeps; the answer says whether it read everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition

from consumer.settings import Settings
from consumer.stream.kafka import make_consumer

HEADER_REASON = "error"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One record of the dead-letter topic, with its headers decoded as the contract writes them."""

    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, str]

    @property
    def reason(self) -> str:
        return self.headers.get(HEADER_REASON, "")

    @property
    def source(self) -> tuple[str, int | None, int | None]:
        """(topic, partition, offset) of the rejected message, as far as the headers tell."""

        def number(name: str) -> int | None:
            text = self.headers.get(name, "")
            return int(text) if text.isdigit() else None

        return (self.headers.get("source_topic", ""), number("source_partition"),
                number("source_offset"))


@dataclass(slots=True)
class DeadLetterScan:
    """``total`` dead letters matched (``letters`` keeps the first ``keep`` of them);
    ``complete`` is False when the time bound stopped the scan before the high watermark."""

    letters: list[DeadLetter] = field(default_factory=list)
    total: int = 0
    complete: bool = True
    topic_exists: bool = True


def _decode_headers(headers: Sequence[tuple[str, bytes | None]] | None) -> dict[str, str]:
    decoded: dict[str, str] = {}
    for name, value in headers or ():
        decoded[str(name)] = value.decode("utf-8", "replace") if value is not None else ""
    return decoded


async def read_dead_letters(
    settings: Settings, *, since_ms: int = 0, timeout_s: float = 5.0, keep: int = 1_000,
) -> DeadLetterScan:
    """The dead letters with a timestamp at or after ``since_ms``, in partition/offset order.

    Raises the client's ``KafkaError`` (or ``TimeoutError`` past ``timeout_s``) when the broker
    cannot be reached; the caller decides what that means.
    """
    deadline = time.monotonic() + timeout_s
    consumer = make_consumer(settings, group_id=None)
    try:
        await asyncio.wait_for(consumer.start(), max(0.1, deadline - time.monotonic()))
        return await _scan(consumer, settings.dlq_topic, since_ms, deadline, keep)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(consumer.stop(), 5)


async def _scan(
    consumer: AIOKafkaConsumer, topic: str, since_ms: int, deadline: float, keep: int
) -> DeadLetterScan:
    scan = DeadLetterScan()
    partitions = consumer.partitions_for_topic(topic)
    if partitions is None:
        if topic not in await consumer.topics():  # refreshes the metadata once
            scan.topic_exists = False
            return scan
        partitions = consumer.partitions_for_topic(topic)
    tps = [TopicPartition(topic, p) for p in sorted(partitions or ())]
    if not tps:
        return scan
    consumer.assign(tps)
    starts = await consumer.offsets_for_times({tp: since_ms for tp in tps}) if since_ms else {}
    reading = set(tps)
    ends: dict[TopicPartition, int] = {}
    for tp in tps:
        found = starts.get(tp) if since_ms else None
        if since_ms and found is None:
            reading.discard(tp)  # nothing at or after since_ms
            consumer.pause(tp)
        elif found is not None:
            consumer.seek(tp, found.offset)
        else:
            await consumer.seek_to_beginning(tp)
    while reading:
        left_s = deadline - time.monotonic()
        if left_s <= 0:
            scan.complete = False
            break
        batches = await consumer.getmany(*reading, timeout_ms=int(min(left_s, 0.5) * 1000))
        for tp, records in batches.items():
            for record in records:
                if record.timestamp < since_ms or record.offset >= ends.get(tp, record.offset + 1):
                    continue
                scan.total += 1
                if len(scan.letters) < keep:
                    scan.letters.append(DeadLetter(
                        tp.partition, record.offset, record.timestamp, record.key,
                        record.value, _decode_headers(record.headers),
                    ))
        for tp in list(reading):
            if tp not in ends and (high := consumer.highwater(tp)) is not None:
                ends[tp] = high
            if tp in ends and await consumer.position(tp) >= ends[tp]:
                reading.discard(tp)
                consumer.pause(tp)
    scan.letters.sort(key=lambda letter: (letter.partition, letter.offset))
    return scan
