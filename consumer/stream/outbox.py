"""The outbox publisher: sends ``pending`` records as ``milestone.reached``, exactly once.

One publisher at a time, across every process of the deployment (``run``, ``sweep``,
``replay``): the lease is a session-level advisory lock held on a dedicated connection, and
every statement that marks rows published runs on that connection, so a publisher that lost
its connection (and with it the lock) can mark nothing.

A send whose outcome is unknown (an error or a timeout after the request may have reached the
broker) puts the publisher "in doubt". Before it sends anything else, and whenever it takes the
lease, it reads the notification topic forward from the last position it recorded to the high
watermark and marks every pending row found there as published. What remains: a send already in
flight from a publisher that has been cut off from Postgres can land after the new publisher's
read-back, and is then emitted twice (the README's "Guarantees" names this window).

One cycle, numbered as in the code:
  1. take or confirm the lease           fails: no lease -> wait, another process publishes
  2. read back if in doubt               fails: broker away -> stay in doubt, retry later
  3. suppress rows of opted-out mentors, select pending rows (in created_at order)
  4. send them (acks=all), await every acknowledgement
                                         fails: -> in doubt, go to 2 before any other send
  5. mark the acknowledged rows published with their partition and offset, on the lease
     connection                          fails: lost lease -> rows stay pending; the next
                                         lease holder reads back and marks them
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence
from typing import Any
from uuid import UUID

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from consumer.faults import FaultInjector
from consumer.ops.metrics import Metrics
from consumer.settings import Settings
from consumer.store.errors import StoreUnavailable, classify
from consumer.stream.kafka import make_consumer, make_producer
from schemas.events import MilestoneReached

log = logging.getLogger(__name__)

PUBLISHER_LOCK_KEY = 0x6D696C6570756221  # "milepub!"
HEADER = "notification_id"

_SELECT_PENDING = """
WITH suppressed AS (
    UPDATE scenario_notifications n SET status = 'suppressed'
    FROM mentor_preferences p
    WHERE n.status = 'pending' AND n.scenario_type = 'milestone'
      AND p.mentor_id = n.user_id AND NOT p.milestone_notifications
    RETURNING n.id
)
SELECT n.id, n.user_id, n.organization_id, n.year, n.milestone_value, n.session_count,
       n.activity_id, n.reached_at, n.created_at,
       (SELECT count(*) FROM suppressed) AS suppressed
FROM scenario_notifications n
WHERE n.status = 'pending' AND n.scenario_type = 'milestone'
  AND n.id NOT IN (SELECT id FROM suppressed)
ORDER BY n.created_at, n.id
LIMIT $1
"""

_MARK_PUBLISHED = """
UPDATE scenario_notifications n
SET status = 'published', published_at = now(),
    published_partition = s.partition, published_offset = s.offset
FROM unnest($1::uuid[], $2::int[], $3::bigint[]) AS s(id, partition, offset)
WHERE n.id = s.id AND n.status = 'pending'
RETURNING n.id
"""

_ADVANCE_POSITIONS = """
INSERT INTO publisher_positions AS p (topic, partition, next_offset)
SELECT $1, * FROM unnest($2::int[], $3::bigint[])
ON CONFLICT (topic, partition) DO UPDATE
SET next_offset = greatest(p.next_offset, excluded.next_offset)
"""


def message_for(row: asyncpg.Record) -> MilestoneReached:
    return MilestoneReached(
        notification_id=row["id"],
        mentor_id=row["user_id"],
        organization_id=row["organization_id"],
        year=row["year"],
        milestone_value=row["milestone_value"],
        session_count=row["session_count"],
        activity_id=row["activity_id"],
        reached_at=row["reached_at"] or row["created_at"],
        created_at=row["created_at"],
    )


def notification_id_of(headers: Sequence[tuple[str, bytes]], value: bytes | None) -> UUID | None:
    for name, raw in headers or ():
        if name == HEADER:
            with contextlib.suppress(ValueError):
                return UUID(raw.decode())
    if value:
        with contextlib.suppress(ValueError, TypeError, KeyError):
            return UUID(json.loads(value)["notification_id"])
    return None


class Publisher:
    """Runs as its own task beside the consume loop; :meth:`wake` after each commit."""

    def __init__(
        self,
        settings: Settings,
        dsn: str,
        metrics: Metrics,
        faults: FaultInjector,
        *,
        idle_interval_s: float = 1.0,
    ) -> None:
        self._settings = settings
        self._dsn = dsn
        self._metrics = metrics
        self._faults = faults
        self._idle_interval_s = idle_interval_s
        self._topic = settings.notification_topic
        self._wakeup = asyncio.Event()
        self._connection: asyncpg.Connection | None = None
        self._producer: AIOKafkaProducer | None = None
        self._reader: AIOKafkaConsumer | None = None
        self._leader = False
        self._in_doubt = True
        self.published = 0

    def wake(self) -> None:
        self._wakeup.set()

    @property
    def leader(self) -> bool:
        return self._leader

    async def run(self, stop: asyncio.Event) -> None:
        backoff = 0.2
        while not stop.is_set():
            try:
                if not await self._hold_lease():
                    await self._idle(stop, self._idle_interval_s)
                    continue
                if self._in_doubt:
                    await self._read_back()
                sent = await self._publish_some()
                backoff = 0.2
                if sent < self._settings.publisher_batch_max:
                    await self._idle(stop, self._idle_interval_s)
            except (TimeoutError, KafkaError) as error:
                self._in_doubt = True
                log.warning("publisher: broker trouble (%s); will read back before sending", error)
                await self._idle(stop, backoff)
                backoff = min(backoff * 2, self._settings.retry_backoff_max_s)
            except Exception as error:
                mapped = classify(error)
                if not isinstance(mapped, StoreUnavailable):
                    raise
                log.warning("publisher: database unreachable (%s); lease dropped", mapped)
                await self._drop_lease()
                await self._idle(stop, backoff)
                backoff = min(backoff * 2, self._settings.retry_backoff_max_s)

    async def close(self) -> None:
        await self._drop_lease()
        for client in (self._producer, self._reader):
            if client is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.stop(), 5)
        self._producer = self._reader = None

    async def _idle(self, stop: asyncio.Event, seconds: float) -> None:
        waiters = {asyncio.ensure_future(self._wakeup.wait()), asyncio.ensure_future(stop.wait())}
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        self._wakeup.clear()

    # 1. the lease
    async def _hold_lease(self) -> bool:
        if self._connection is None or self._connection.is_closed():
            self._leader = False
            self._connection = await asyncpg.connect(self._dsn, timeout=5)
            await self._connection.execute("SET statement_timeout = '30s'")
        if self._leader:
            return True
        took = await self._connection.fetchval("SELECT pg_try_advisory_lock($1)", PUBLISHER_LOCK_KEY)
        if took:
            log.info("publisher: lease taken; reading the topic back before sending")
            self._leader = True
            self._in_doubt = True
            self._metrics.set("milestones_publisher_leader", 1)
        return bool(took)

    async def _drop_lease(self) -> None:
        self._leader = False
        self._in_doubt = True
        self._metrics.set("milestones_publisher_leader", 0)
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._connection.close(), 2)
            if not self._connection.is_closed():
                self._connection.terminate()
        self._connection = None

    async def _ensure_producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            producer = make_producer(self._settings, retry_internally=False)
            await producer.start()
            self._producer = producer
        return self._producer

    # 2. read back
    async def _read_back(self) -> None:
        """Mark as published every pending row already on the topic past our last position."""
        assert self._connection is not None
        if self._reader is None:
            reader = make_consumer(self._settings, group_id=None)
            await reader.start()
            self._reader = reader
        reader = self._reader
        partitions = await _partitions(reader, self._topic)
        stored = {
            row["partition"]: row["next_offset"]
            for row in await self._connection.fetch(
                "SELECT partition, next_offset FROM publisher_positions WHERE topic = $1",
                self._topic,
            )
        }
        tps = [TopicPartition(self._topic, p) for p in partitions]
        reader.assign(tps)
        for tp in tps:
            if tp.partition in stored:
                reader.seek(tp, stored[tp.partition])
            else:
                await reader.seek_to_beginning(tp)
        found: dict[UUID, tuple[int, int]] = {}
        deadline = time.monotonic() + 60
        ends: dict[int, int] = {}
        while True:
            batch = await reader.getmany(timeout_ms=200, max_records=5_000)
            for tp, records in batch.items():
                for record in records:
                    nid = notification_id_of(record.headers, record.value)
                    if nid is not None:
                        found[nid] = (tp.partition, record.offset)
            caught_up = True
            for tp in tps:
                high = reader.highwater(tp)
                if high is None or await reader.position(tp) < high:
                    caught_up = False
                else:
                    ends[tp.partition] = high
            if caught_up:
                break
            if time.monotonic() > deadline:
                raise TimeoutError("read-back did not reach the high watermark in 60 s")
        hits = 0
        if found:
            ids = list(found)
            rows = await self._connection.fetch(
                _MARK_PUBLISHED,
                ids,
                [found[i][0] for i in ids],
                [found[i][1] for i in ids],
            )
            hits = len(rows)
        if ends:
            await self._connection.execute(
                _ADVANCE_POSITIONS, self._topic, list(ends), list(ends.values())
            )
        if hits:
            log.warning("publisher: read-back found %d pending notification(s) already sent", hits)
            self._metrics.inc("milestones_readback_hits_total", hits)
        self._in_doubt = False

    # 3-5. one round of sends
    async def _publish_some(self) -> int:
        assert self._connection is not None
        rows = await self._connection.fetch(_SELECT_PENDING, self._settings.publisher_batch_max)
        if rows and rows[0]["suppressed"]:
            self._metrics.inc("milestones_suppressed_at_publish_total", rows[0]["suppressed"])
        if not rows:
            return 0
        producer = await self._ensure_producer()
        futures = []
        for row in rows:
            message = message_for(row)
            futures.append(
                await producer.send(
                    self._topic,
                    value=message.model_dump_json().encode(),
                    key=str(row["user_id"]).encode(),
                    headers=[(HEADER, str(row["id"]).encode())],
                )
            )
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        acked: list[tuple[UUID, Any]] = []
        failed = 0
        for row, outcome in zip(rows, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                failed += 1
            else:
                acked.append((row["id"], outcome))
        if failed:
            self._in_doubt = True
            log.warning("publisher: %d send(s) failed or timed out; outcome in doubt", failed)
        if not acked:
            return 0
        self._faults.reached("after_send_ack")
        async with self._connection.transaction():
            await self._connection.fetch(
                _MARK_PUBLISHED,
                [nid for nid, _ in acked],
                [meta.partition for _, meta in acked],
                [meta.offset for _, meta in acked],
            )
            if not self._in_doubt:
                ends: dict[int, int] = {}
                for _, meta in acked:
                    ends[meta.partition] = max(ends.get(meta.partition, 0), meta.offset + 1)
                await self._connection.execute(
                    _ADVANCE_POSITIONS, self._topic, list(ends), list(ends.values())
                )
        self._faults.reached("after_mark_published")
        self._metrics.inc("milestones_published_total", len(acked))
        self.published += len(acked)
        return len(rows)


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> list[int]:
    deadline = time.monotonic() + 30
    while True:
        await consumer.topics()
        found = consumer.partitions_for_topic(topic)
        if found:
            return sorted(found)
        if time.monotonic() > deadline:
            raise TimeoutError(f"topic {topic} not found")
        await asyncio.sleep(0.5)
