"""The outbox publisher: sends ``pending`` records as ``milestone.reached``, exactly once.

Three parts, one module each: the lease (``publisher_lease.py``: one publisher at a time
across every process of the deployment, ``run``, ``sweep``, ``replay``), the read-back
(``read_back.py``: settles sends whose outcome is unknown by reading the topic), and the send
loop here, which ties them together.
What remains: a publisher whose Postgres session (and with it the lease) ended while the
process runs on still sends what it picked; from the pick (3) until those records are on the
topic, another lease holder's read-back does not see them and sends them again
(docs/guarantees.md).

aiokafka's own re-sends are turned off for this producer (``make_producer``): after a lost
acknowledgement it would write the batch again by itself, which only a read-back can settle.

One cycle, numbered as in the code:
  1. take or confirm the lease           fails: no lease -> wait, another process publishes
  2. read back if in doubt               fails: broker away -> stay in doubt, retry later
  3. pick the oldest pending rows, on the lease connection; among them mark published those
     the read-back saw on the topic before they had a record, suppress those of opted-out
     mentors, clear an operator's re-send mark (one statement)
                                         fails: database away -> drop the lease, back off
  4. send them (acks=all): one record batch per partition, all handed over at once, then
     await every acknowledgement     fails: -> in doubt, go to 2 before any other send
  5. mark the acknowledged rows published with their partition and offset, one UPDATE over
     arrays on the lease connection      fails: lost lease -> rows stay pending; the next
                                         lease holder reads back and marks them
Every wait between attempts is a capped exponential backoff with jitter (``consumer/retry.py``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any
from uuid import UUID

import asyncpg
from aiokafka import AIOKafkaProducer
from pydantic import ValidationError

from consumer.faults import FaultInjector
from consumer.ops.logs import fields
from consumer.ops.metrics import Metrics
from consumer.retry import Backoff
from consumer.settings import Settings
from consumer.store.errors import StoreUnavailable, classify
from consumer.store.outbox_sql import ADVANCE_POSITIONS, MARK_SENT, SELECT_PENDING
from consumer.stream.kafka import (
    PUBLISHER_MAX_BATCH_BYTES,
    broker_trouble,
    make_producer,
    partition_for_key,
    started,
)
from consumer.stream.publisher_lease import PublisherLease, on_lease
from consumer.stream.read_back import HEADER, ReadBack
from consumer.stream.teardown import within
from schemas.events import MilestoneReached

log = logging.getLogger(__name__)


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
        self._metrics = metrics
        self._faults = faults
        self._idle_interval_s = idle_interval_s
        self._topic = settings.notification_topic
        self._wakeup = asyncio.Event()
        self._lease = PublisherLease(dsn, metrics)
        self._read_back = ReadBack(settings, metrics)
        self._producer: AIOKafkaProducer | None = None
        self._in_doubt = True
        self._unsendable: set[UUID] = set()
        self.published = 0

    def wake(self) -> None:
        self._wakeup.set()

    @property
    def leader(self) -> bool:
        return self._lease.held

    async def run(self, stop: asyncio.Event) -> None:
        """Publish until ``stop``; every failure is waited out, none ends the task.

        The store's errors and the broker's are told apart at their edges (``on_lease`` maps
        asyncpg's, aiokafka raises its own), because they call for different repairs: a lost
        database connection has lost the lease with it, while a broker error leaves the
        outcome of the sends in hand unknown.
        """
        backoff = Backoff(0.2, self._settings.retry_backoff_max_s)
        while not stop.is_set():
            try:
                # 1. the lease
                if not await self._lease.hold():
                    await self._idle(stop, self._idle_interval_s)
                    continue
                if self._lease.taken_now:
                    self._in_doubt = True
                # 2. read back
                if self._in_doubt:
                    await self._read_back.run(self._lease.connection, stop)
                    self._in_doubt = False
                sent = await self._publish_some()
                backoff.reset()
                if sent < self._settings.publisher_batch_max:
                    await self._idle(stop, self._idle_interval_s)
            except Exception as error:
                if broker_trouble(error):
                    self._in_doubt = True
                    log.warning("publisher: broker trouble (%s: %s); will read back before"
                                " sending", type(error).__name__, error)
                    await self._idle(stop, backoff.next())
                    continue
                mapped = classify(error)  # StoreError passes through; asyncpg's are mapped
                if isinstance(mapped, StoreUnavailable):
                    log.warning("publisher: database unreachable (%s); lease dropped", mapped)
                else:
                    # A bug must not end the task silently while the consume loop runs on:
                    # say it loudly, start again from a clean lease, and keep trying.
                    log.exception("publisher: unexpected error; lease dropped")
                await self._drop_lease()
                await self._idle(stop, backoff.next())

    async def close(self) -> None:
        await self._drop_lease()
        producer, self._producer = self._producer, None
        if producer is not None:
            await within(producer.stop(), 5.0, "stopping the publisher's producer")
        await self._read_back.close()

    async def _idle(self, stop: asyncio.Event, seconds: float) -> None:
        waiters = {asyncio.ensure_future(self._wakeup.wait()), asyncio.ensure_future(stop.wait())}
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        self._wakeup.clear()

    async def _drop_lease(self) -> None:
        self._in_doubt = True
        await self._lease.drop()

    async def _ensure_producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            self._producer = await started(make_producer(
                self._settings, retry_internally=False, max_batch_bytes=PUBLISHER_MAX_BATCH_BYTES
            ), self._settings)
        return self._producer

    # 3-5. one round of sends
    async def _publish_some(self) -> int:
        """One round; returns how many rows it picked (a full round: go on without a pause)."""
        connection = self._lease.connection
        started = time.perf_counter()
        # 3. On the lease connection: a row list read here proves the lease was still held.
        picked = await on_lease(
            connection.fetch(SELECT_PENDING, self._settings.publisher_batch_max, self._topic)
        )
        suppressed: int = picked[0]["suppressed"]
        seen: int = picked[0]["seen"]
        if suppressed:
            self._metrics.inc("milestones_suppressed_at_publish_total", suppressed)
        if seen:
            log.warning("publisher: %d notification(s) recorded again were already on the topic;"
                        " marked published, not sent", seen)
            self._metrics.inc("milestones_readback_hits_total", seen)
        rows = [row for row in picked if row["id"] is not None]
        settled = suppressed + seen  # the round's rows that needed no send
        sendable = []
        for row in rows:
            try:
                sendable.append((row, message_for(row)))
            except ValidationError as error:
                # A row inserted by hand without a required column: skip it, keep the rest.
                if row["id"] not in self._unsendable:
                    self._unsendable.add(row["id"])
                    log.error("publisher: pending row %s cannot be sent (%s)", row["id"],
                              " ".join(str(error).split()),
                              extra=fields(notification_id=row["id"], mentor_id=row["user_id"]))
        if not sendable:
            return settled
        # 4. send
        acked, failed = await self._send(await self._ensure_producer(), sendable)
        if failed:
            self._in_doubt = True
            log.warning("publisher: %d send(s) failed or timed out; outcome in doubt", failed)
        if not acked:
            return 0
        self._faults.reached("after_send_ack")
        # 5. mark
        oldest_waited_s = await on_lease(self._mark_sent(connection, acked))
        self._faults.reached("after_mark_published")
        self._metrics.inc("milestones_published_total", len(acked))
        if oldest_waited_s is not None:
            self._metrics.observe("milestones_notification_latency_seconds", max(0.0, oldest_waited_s))
        self._metrics.observe(
            "milestones_publisher_round_duration_seconds", time.perf_counter() - started
        )
        self.published += len(acked)
        return len(rows) + settled

    async def _send(
        self, producer: AIOKafkaProducer, sendable: list[tuple[asyncpg.Record, MilestoneReached]]
    ) -> tuple[list[tuple[UUID, int, int]], int]:
        """Send the round as one record batch per partition (more only past the batch size),
        all handed to the producer before any acknowledgement is awaited; return the
        acknowledged ``(id, partition, offset)`` and how many sends failed or timed out.

        The partition is the default producer's choice for the key (murmur2 of the mentor id),
        so a mentor's notifications stay in one partition, in order.
        """
        partitions = sorted(await producer.partitions_for(self._topic))
        batches: dict[int, list[Any]] = {}
        placed: list[tuple[UUID, int, int, int]] = []  # id, partition, batch, offset in batch
        for row, message in sendable:
            key = str(row["user_id"]).encode()
            partition = partition_for_key(key, partitions)
            builders = batches.get(partition)
            if builders is None:
                builders = batches[partition] = [producer.create_batch()]
            value = message.model_dump_json().encode()
            headers = [(HEADER, str(row["id"]).encode())]
            appended = builders[-1].append(timestamp=None, key=key, value=value, headers=headers)
            if appended is None:  # full: a second batch for this partition
                builders.append(producer.create_batch())
                appended = builders[-1].append(
                    timestamp=None, key=key, value=value, headers=headers
                )
            placed.append((row["id"], partition, len(builders) - 1, appended.offset))
        # First batches of every partition first: a second batch of a partition waits until
        # the first one is on its way.
        order = sorted(
            ((partition, index) for partition, builders in batches.items()
             for index in range(len(builders))),
            key=lambda pair: (pair[1], pair[0]),
        )
        futures: dict[tuple[int, int], asyncio.Future[Any]] = {}
        try:
            for partition, index in order:
                futures[(partition, index)] = await producer.send_batch(
                    batches[partition][index], self._topic, partition=partition
                )
        finally:
            # Whatever happened to the later batches, the earlier ones are in flight: wait for
            # them (each ends within the request timeout) so no send outlives this round.
            outcomes = dict(zip(
                futures, await asyncio.gather(*futures.values(), return_exceptions=True),
                strict=True,
            ))
        acked: list[tuple[UUID, int, int]] = []
        failed = 0
        debug = log.isEnabledFor(logging.DEBUG)
        for nid, partition, index, relative in placed:
            outcome = outcomes.get((partition, index))
            if outcome is None or isinstance(outcome, BaseException):
                failed += 1
                continue
            offset = outcome.offset + relative
            acked.append((nid, partition, offset))
            if debug:
                log.debug(
                    "publisher: sent %s to %s[%d]@%d", nid, self._topic, partition, offset,
                    extra=fields(notification_id=nid, topic=self._topic, partition=partition,
                                 offset=offset),
                )
        return acked, failed

    async def _mark_sent(
        self, connection: asyncpg.Connection, acked: list[tuple[UUID, int, int]]
    ) -> float | None:
        """Step 5, one transaction on the lease connection: a lost lease marks nothing.

        Returns the seconds the oldest row marked waited since it was recorded (None: none
        was still pending)."""
        async with connection.transaction():
            oldest_waited_s: float | None = await connection.fetchval(
                MARK_SENT,
                [nid for nid, _, _ in acked],
                [partition for _, partition, _ in acked],
                [offset for _, _, offset in acked],
            )
            # Positions stay where the read-back put them while records are in doubt.
            if not self._in_doubt:
                ends: dict[int, int] = {}
                for _, partition, offset in acked:
                    ends[partition] = max(ends.get(partition, 0), offset + 1)
                await connection.execute(
                    ADVANCE_POSITIONS, self._topic, list(ends), list(ends.values())
                )
        return oldest_waited_s

