"""A small Kafka client for tests: produce raw or JSON records, read a whole topic, wait for a
condition over it.

Reading assigns every partition by hand (no consumer group, nothing committed) and reads up to
the high watermark reported by the fetch responses of a consumer started for that call, so
everything acknowledged before the call is seen. ``end_offsets()`` is not used: Tansu answers it
wrongly. What one call has read is kept, so the next call fetches only what is new.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from consumer.stream.admin import create_topics
from consumer.stream.kafka import partition_for_key

Headers = Mapping[str, bytes | str] | Sequence[tuple[str, bytes | str]]


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]
    timestamp_ms: int

    def json(self) -> Any:
        """The value decoded as JSON (``AssertionError`` for a null value)."""
        assert self.value is not None, f"{self.topic}[{self.partition}]@{self.offset} is null"
        return json.loads(self.value)

    def header(self, name: str) -> str | None:
        """A header as UTF-8 text, ``None`` when absent."""
        raw = self.headers.get(name)
        return None if raw is None else raw.decode("utf-8")


@dataclass(frozen=True)
class Produced:
    topic: str
    partition: int
    offset: int
    timestamp_ms: int


@dataclass
class _Progress:
    """What earlier reads of one topic returned, and where each partition continues."""

    records: list[Record] = field(default_factory=list)
    positions: dict[int, int] = field(default_factory=dict)


def _encode_headers(headers: Headers | None) -> list[tuple[str, bytes]]:
    if headers is None:
        return []
    items = headers.items() if isinstance(headers, Mapping) else headers
    return [(name, value.encode() if isinstance(value, str) else value) for name, value in items]


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


class KafkaHelper:
    """One producer (started on first use) and short-lived reading consumers; :meth:`close`
    stops them."""

    def __init__(self, bootstrap_servers: str, client_options: Mapping[str, Any] | None = None) -> None:
        self.bootstrap_servers = bootstrap_servers
        # More keyword arguments of every client: the security settings of a secured broker.
        self._options = dict(client_options or {})
        self._producer: AIOKafkaProducer | None = None
        self._progress: dict[str, _Progress] = {}

    async def close(self) -> None:
        if self._producer is not None:
            producer, self._producer = self._producer, None
            await producer.stop()

    async def _get_producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap_servers,
                acks="all",
                linger_ms=0,
                request_timeout_ms=15_000,
                **self._options,
            )
            await producer.start()
            self._producer = producer
        return self._producer

    # ------------------------------------------------------------------ producing

    async def produce(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        headers: Headers | None = None,
        timestamp_ms: int | None = None,
        partition: int | None = None,
    ) -> Produced:
        """Send one record and wait for the broker's acknowledgement."""
        producer = await self._get_producer()
        metadata = await producer.send_and_wait(
            topic,
            value=value,
            key=key,
            partition=partition,
            timestamp_ms=timestamp_ms,
            headers=_encode_headers(headers),
        )
        return Produced(topic, metadata.partition, metadata.offset, metadata.timestamp)

    async def produce_json(
        self,
        topic: str,
        obj: Mapping[str, Any],
        key: bytes | None = None,
        *,
        timestamp_ms: int | None = None,
        partition: int | None = None,
    ) -> Produced:
        """Send ``obj`` as compact JSON. ``key=None`` means the contract's key: ``mentor_id`` as
        UTF-8 (a null key only when ``obj`` has none; use :meth:`produce` for a null key)."""
        return await self.produce(
            topic,
            json_bytes(obj),
            key if key is not None else _mentor_key(obj),
            timestamp_ms=timestamp_ms,
            partition=partition,
        )

    async def produce_json_many(self, topic: str, objs: Iterable[Mapping[str, Any]]) -> list[Produced]:
        """Send many JSON records keyed by ``mentor_id``, pipelined, and wait for all of them.
        Records of one key keep their order (one partition, one producer, in order)."""
        producer = await self._get_producer()
        futures = [await producer.send(topic, value=json_bytes(obj), key=_mentor_key(obj)) for obj in objs]
        results = await asyncio.gather(*futures)
        return [Produced(topic, md.partition, md.offset, md.timestamp) for md in results]

    async def produce_batched(
        self, topic: str, records: Iterable[tuple[bytes, bytes, list[tuple[str, bytes]]]]
    ) -> int:
        """Send ``(key, value, headers)`` records as whole record batches, partitioned by key
        as the default producer does: the quick way to fill a topic with a few hundred
        thousand records. Returns how many were sent, once all are acknowledged."""
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap_servers, acks="all",
                                    max_batch_size=512 * 1024, request_timeout_ms=30_000)
        await producer.start()
        try:
            partitions = sorted(await producer.partitions_for(topic))
            open_batches: dict[int, Any] = {}
            futures: list[asyncio.Future[Any]] = []
            sent = 0
            for key, value, headers in records:
                partition = partition_for_key(key, partitions)
                batch = open_batches.get(partition) or producer.create_batch()
                if batch.append(timestamp=None, key=key, value=value, headers=headers) is None:
                    futures.append(await producer.send_batch(batch, topic, partition=partition))
                    batch = producer.create_batch()
                    batch.append(timestamp=None, key=key, value=value, headers=headers)
                open_batches[partition] = batch
                sent += 1
            for partition, batch in open_batches.items():
                futures.append(await producer.send_batch(batch, topic, partition=partition))
            await asyncio.gather(*futures)
            return sent
        finally:
            await producer.stop()

    # ------------------------------------------------------------------ reading

    async def read_all(self, topic: str, timeout_s: float = 15.0) -> list[Record]:
        """Every record of ``topic`` (all partitions), ordered by partition then offset, up to
        the high watermark at the time of the call. ``TimeoutError`` if it cannot catch up."""
        progress = self._progress.setdefault(topic, _Progress())
        deadline = time.monotonic() + timeout_s
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap_servers,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=50,
            request_timeout_ms=15_000,
            **self._options,
        )
        await consumer.start()
        try:
            partitions = await _partitions(consumer, topic, deadline)
            assigned = [TopicPartition(topic, number) for number in partitions]
            consumer.assign(assigned)
            for tp in assigned:
                consumer.seek(tp, progress.positions.get(tp.partition, 0))
            pending = set(assigned)
            while pending:
                remaining_s = deadline - time.monotonic()
                if remaining_s <= 0:
                    behind = sorted(tp.partition for tp in pending)
                    raise TimeoutError(f"{topic}: partitions {behind} not read to the end")
                batch = await consumer.getmany(timeout_ms=int(min(remaining_s, 0.2) * 1000))
                for messages in batch.values():
                    progress.records.extend(
                        Record(
                            topic=message.topic,
                            partition=message.partition,
                            offset=message.offset,
                            key=message.key,
                            value=message.value,
                            headers={name: bytes(value) for name, value in message.headers},
                            timestamp_ms=message.timestamp,
                        )
                        for message in messages
                    )
                for tp in list(pending):
                    highwater = consumer.highwater(tp)
                    position = await consumer.position(tp)
                    progress.positions[tp.partition] = position
                    if highwater is not None and position >= highwater:
                        pending.discard(tp)
        finally:
            await consumer.stop()
        progress.records.sort(key=lambda record: (record.partition, record.offset))
        return list(progress.records)

    async def wait_for(
        self,
        topic: str,
        predicate: Callable[[list[Record]], bool],
        timeout_s: float = 20.0,
        interval_s: float = 0.1,
    ) -> list[Record]:
        """Read ``topic`` again and again until ``predicate(all records)`` holds; return those
        records. ``AssertionError`` describing the topic when it does not within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            records = await self.read_all(topic, timeout_s=max(1.0, deadline - time.monotonic()))
            if predicate(records):
                return records
            if time.monotonic() >= deadline:
                shown = "\n".join(f"  {_describe(record)}" for record in records[-10:])
                raise AssertionError(
                    f"condition not met on {topic} after {timeout_s:g} s; "
                    f"{len(records)} records, the last ones:\n{shown}"
                )
            await asyncio.sleep(interval_s)

    async def wait_for_count(self, topic: str, count: int, timeout_s: float = 20.0) -> list[Record]:
        """Wait until ``topic`` holds at least ``count`` records."""
        return await self.wait_for(topic, lambda records: len(records) >= count, timeout_s)

    async def create_topics(self, names: Sequence[str], partitions: int = 1) -> None:
        """Create topics (an existing one is left as it is)."""
        await create_topics(self.bootstrap_servers, names, partitions, client_options=self._options)

    async def create_topics_with_counts(self, partitions: Mapping[str, int]) -> None:
        """Create topics with a partition count each."""
        await create_topics(
            self.bootstrap_servers, list(partitions), partitions, client_options=self._options
        )

    async def delete_topics(self, names: Sequence[str]) -> None:
        """Best effort: a broker that cannot delete leaves them."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap_servers, **self._options)
        try:
            await admin.start()
            await admin.delete_topics(list(names))
        except Exception:  # cleanup must not fail a test
            pass
        finally:
            await admin.close()
        for name in names:
            self._progress.pop(name, None)


def _mentor_key(obj: Mapping[str, Any]) -> bytes | None:
    mentor = obj.get("mentor_id")
    return str(mentor).encode() if mentor is not None else None


async def _partitions(consumer: AIOKafkaConsumer, topic: str, deadline: float) -> list[int]:
    while True:
        partitions = consumer.partitions_for_topic(topic)
        if partitions:
            return sorted(partitions)
        if time.monotonic() >= deadline:
            raise TimeoutError(f"topic {topic!r} is unknown to the broker")
        await consumer.topics()  # refreshes the metadata of every topic
        await asyncio.sleep(0.05)


def _describe(record: Record) -> str:
    value = record.value if record.value is None or len(record.value) < 300 else record.value[:300]
    return f"[{record.partition}]@{record.offset} key={record.key!r} value={value!r}"
