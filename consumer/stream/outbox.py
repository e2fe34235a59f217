"""The outbox publisher: sends ``pending`` records as ``milestone.reached``, exactly once.

One publisher at a time, across every process of the deployment (``run``, ``sweep``,
``replay``): the lease is a session-level advisory lock held on a dedicated connection, and
every statement that marks rows published runs on that connection, so a publisher that lost
its connection (and with it the lock) can mark nothing. The connection has a client-side
command timeout: one that went silent fails instead of hanging while it looks like the lease.

A send whose outcome is unknown (an error or a timeout after the request may have reached the
broker) puts the publisher "in doubt". Before it sends anything else, and whenever it takes the
lease, it reads the notification topic forward from the positions recorded in
``publisher_positions`` to the high watermark and marks every pending row found there as
published (the metric ``milestones_readback_hits_total`` counts them). The read-back:
- sets the positions to where it stopped (lower too: a partition that ends before its recorded
  position was deleted and created again, and is read again from its start);
- remembers the notifications it found that have no record at all (the database was restored
  from a backup older than the topic) and holds the positions before them: recorded again by a
  replay, they are marked published instead of being sent a second time.
What remains: a send already in flight from a publisher that has been cut off from Postgres can
land after the new publisher's read-back, and is then emitted twice (docs/guarantees.md).

aiokafka's own re-sends are turned off for this producer (``make_producer``): after a lost
acknowledgement it would write the batch again by itself, which only a read-back can settle.

One cycle, numbered as in the code:
  1. take or confirm the lease           fails: no lease -> wait, another process publishes
  2. read back if in doubt               fails: broker away -> stay in doubt, retry later
  3. suppress rows of opted-out mentors, select pending rows (in created_at order), on the
     lease connection                    fails: database away -> drop the lease, back off
  4. send them (acks=all), await every acknowledgement
                                         fails: -> in doubt, go to 2 before any other send
  5. mark the acknowledged rows published with their partition and offset, on the lease
     connection                          fails: lost lease -> rows stay pending; the next
                                         lease holder reads back and marks them
Every wait between attempts is a capped exponential backoff with jitter.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar
from uuid import UUID

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaTimeoutError
from pydantic import ValidationError

from consumer.faults import FaultInjector
from consumer.ops.logs import fields
from consumer.ops.metrics import Metrics
from consumer.settings import Settings
from consumer.store.errors import StoreUnavailable, classify
from consumer.store.postgres import SERVER_SETTINGS
from consumer.stream.kafka import broker_trouble, make_consumer, make_producer
from consumer.stream.teardown import within
from schemas.events import MilestoneReached

log = logging.getLogger(__name__)

PUBLISHER_LOCK_KEY = 0x6D696C6570756221  # "milepub!"
HEADER = "notification_id"
LEASE_COMMAND_TIMEOUT_S = 30.0
READ_BACK_TIMEOUT_S = 60.0
READ_BACK_CHUNK = 5_000

_T = TypeVar("_T")

_SELECT_PENDING = """
WITH suppressed AS (
    UPDATE scenario_notifications n
    SET status = 'suppressed', suppressed_reason = 'opted_out_before_send'
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
ORDER BY n.created_at, n.user_id, n.year, n.milestone_value
LIMIT $1
"""

_MARK_PUBLISHED = """
UPDATE scenario_notifications n
SET status = 'published', published_at = now(),
    published_partition = s.sent_partition, published_offset = s.sent_offset
FROM unnest($1::uuid[], $2::int[], $3::bigint[]) AS s(id, sent_partition, sent_offset)
WHERE n.id = s.id AND n.status = 'pending'
RETURNING n.id, extract(epoch FROM now() - n.created_at)::float8 AS waited_s
"""

# The read-back has read each partition to its high watermark: that is where the next one
# starts, lower than before too (the topic was deleted and created again, or truncated).
_SET_POSITIONS = """
INSERT INTO publisher_positions AS p (topic, partition, next_offset)
SELECT $1, * FROM unnest($2::int[], $3::bigint[])
ON CONFLICT (topic, partition) DO UPDATE SET next_offset = excluded.next_offset
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
        self._unsendable: set[UUID] = set()
        # Notifications found on the topic by the last read-back that have no record at all:
        # the database is behind the topic (restored from a backup). Recorded again later (by
        # a replay), they are marked published from here instead of being sent a second time.
        self._on_topic_unrecorded: dict[UUID, tuple[int, int]] = {}
        self.published = 0

    def wake(self) -> None:
        self._wakeup.set()

    @property
    def leader(self) -> bool:
        return self._leader

    async def run(self, stop: asyncio.Event) -> None:
        """Publish until ``stop``; every failure is waited out, none ends the task.

        The store's errors and the broker's are told apart at their edges (:meth:`_db` maps
        asyncpg's, aiokafka raises its own), because they call for different repairs: a lost
        database connection has lost the lease with it, while a broker error leaves the
        outcome of the sends in hand unknown.
        """
        backoff = _Backoff(self._settings.retry_backoff_max_s)
        while not stop.is_set():
            try:
                if not await self._hold_lease():
                    await self._idle(stop, self._idle_interval_s)
                    continue
                if self._in_doubt:
                    await self._read_back(stop)
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
        producer, reader, self._producer, self._reader = self._producer, self._reader, None, None
        if producer is not None:
            await within(producer.stop(), 5.0, "stopping the publisher's producer")
        if reader is not None:
            await within(reader.stop(), 5.0, "stopping the publisher's reader")

    async def _idle(self, stop: asyncio.Event, seconds: float) -> None:
        waiters = {asyncio.ensure_future(self._wakeup.wait()), asyncio.ensure_future(stop.wait())}
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        self._wakeup.clear()

    # 1. the lease
    async def _db(self, call: Awaitable[_T]) -> _T:
        """Await a call on the lease connection, mapping its failures to the store's family."""
        try:
            return await call
        except Exception as error:
            mapped = classify(error)
            if mapped is None:
                raise
            raise mapped from error

    async def _hold_lease(self) -> bool:
        if self._connection is None or self._connection.is_closed():
            self._leader = False
            self._connection = None
            # command_timeout: a connection that went silent (no reset) must fail, not hang
            # while it still looks like the lease.
            connection = await self._db(asyncpg.connect(
                self._dsn, timeout=5, command_timeout=LEASE_COMMAND_TIMEOUT_S,
                server_settings=SERVER_SETTINGS,  # the pool's timeouts and custom plans
            ))
            self._connection = connection
        if self._leader:
            return True
        took = await self._db(
            self._connection.fetchval("SELECT pg_try_advisory_lock($1)", PUBLISHER_LOCK_KEY)
        )
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
            await _start_or_stop(producer)
            self._producer = producer
        return self._producer

    # 2. read back
    async def _read_back(self, stop: asyncio.Event) -> None:
        """Mark as published every pending row already on the topic past our last position.

        Reads to the high watermark of every partition, marking in chunks so that memory does
        not grow with the length of the topic (the first lease on a database without positions
        reads it all). Raises ``KafkaTimeoutError`` if the broker does not let it get there.
        """
        connection = self._connection
        assert connection is not None
        if self._reader is None:
            reader = make_consumer(self._settings, group_id=None)
            await _start_or_stop(reader)
            self._reader = reader
        reader = self._reader
        partitions = await _partitions(reader, self._topic)
        stored = {
            row["partition"]: row["next_offset"]
            for row in await self._db(connection.fetch(
                "SELECT partition, next_offset FROM publisher_positions WHERE topic = $1",
                self._topic,
            ))
        }
        tps = [TopicPartition(self._topic, p) for p in partitions]
        reader.assign(tps)
        deadline = time.monotonic() + READ_BACK_TIMEOUT_S
        unrecorded: dict[UUID, tuple[int, int]] = {}
        hits, ends = await self._scan(reader, tps, stored, stop, deadline, unrecorded)
        shrunk = {p: end for p, end in ends.items() if stored.get(p, 0) > end}
        if shrunk:
            # Ends before our position: the topic was deleted and created again (or truncated).
            # The records of the new topic are all below the old position: read it from 0.
            for partition, end in shrunk.items():
                log.warning(
                    "publisher: %s[%d] ends at %d, before the recorded position %d: the topic"
                    " was deleted or truncated; reading it from its start", self._topic,
                    partition, end, stored[partition],
                )
            again = [tp for tp in tps if tp.partition in shrunk]
            reader.assign(again)
            more, new_ends = await self._scan(reader, again, {}, stop, deadline, unrecorded)
            hits += more
            ends.update(new_ends)
        self._on_topic_unrecorded = unrecorded
        if unrecorded:
            # Hold each position at the first such record, so that the next lease holder (a
            # restart) finds them again; until then they are known from memory.
            for partition, offset in unrecorded.values():
                ends[partition] = min(ends.get(partition, offset), offset)
            log.warning(
                "publisher: %d notification(s) on %s have no record in the database (restored"
                " from a backup?); if recorded again they will be marked published, not sent",
                len(unrecorded), self._topic,
            )
        if ends:
            await self._db(connection.execute(
                _SET_POSITIONS, self._topic, list(ends), list(ends.values())
            ))
        if hits:
            log.warning("publisher: read-back found %d pending notification(s) already sent", hits)
            self._metrics.inc("milestones_readback_hits_total", hits)
        self._in_doubt = False

    async def _scan(
        self,
        reader: AIOKafkaConsumer,
        tps: list[TopicPartition],
        starts: dict[int, int],
        stop: asyncio.Event,
        deadline: float,
        unrecorded: dict[UUID, tuple[int, int]],
    ) -> tuple[int, dict[int, int]]:
        """Read ``tps`` from ``starts`` (the beginning where absent) to their high watermarks,
        marking what is found; return the rows marked and the watermarks reached."""
        connection = self._connection
        assert connection is not None
        for tp in tps:
            if tp.partition in starts:
                reader.seek(tp, starts[tp.partition])
            else:
                await reader.seek_to_beginning(tp)
        found: dict[UUID, tuple[int, int]] = {}
        hits = 0
        ends: dict[int, int] = {}
        while True:
            batch = await reader.getmany(*tps, timeout_ms=200, max_records=READ_BACK_CHUNK)
            for tp, records in batch.items():
                for record in records:
                    nid = notification_id_of(record.headers, record.value)
                    if nid is not None:
                        found[nid] = (tp.partition, record.offset)
            if len(found) >= READ_BACK_CHUNK:
                hits += await self._mark_found(connection, found, unrecorded)
                found = {}
            caught_up = True
            for tp in tps:
                high = reader.highwater(tp)
                if high is None or await reader.position(tp) < high:
                    caught_up = False
                else:
                    ends[tp.partition] = high
            if caught_up:
                break
            if stop.is_set():
                raise KafkaTimeoutError("read-back interrupted by shutdown")
            if time.monotonic() > deadline:
                raise KafkaTimeoutError(
                    f"read-back did not reach the high watermark in {READ_BACK_TIMEOUT_S:g} s"
                )
        hits += await self._mark_found(connection, found, unrecorded)
        return hits, ends

    async def _mark_found(
        self,
        connection: asyncpg.Connection,
        found: dict[UUID, tuple[int, int]],
        unrecorded: dict[UUID, tuple[int, int]],
    ) -> int:
        """Mark the pending rows among ``found``; add the ids without a row to ``unrecorded``."""
        if not found:
            return 0
        ids = list(found)
        rows = await self._db(connection.fetch(
            _MARK_PUBLISHED, ids, [found[i][0] for i in ids], [found[i][1] for i in ids]
        ))
        recorded = await self._db(connection.fetch(
            "SELECT id FROM scenario_notifications WHERE id = ANY($1::uuid[])", ids
        ))
        known = {row["id"] for row in recorded}
        unrecorded.update((nid, where) for nid, where in found.items() if nid not in known)
        return len(rows)

    # 3-5. one round of sends
    async def _publish_some(self) -> int:
        connection = self._connection
        assert connection is not None
        started = time.perf_counter()
        # On the lease connection: a row list read here proves the lease was still held.
        rows = await self._db(connection.fetch(_SELECT_PENDING, self._settings.publisher_batch_max))
        if rows and rows[0]["suppressed"]:
            self._metrics.inc("milestones_suppressed_at_publish_total", rows[0]["suppressed"])
        if not rows:
            return 0
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
        if self._on_topic_unrecorded:
            sendable = await self._mark_seen(connection, sendable)
        rows = [row for row, _ in sendable]
        if not rows:
            return 0
        producer = await self._ensure_producer()
        futures: list[asyncio.Future[Any]] = []
        try:
            for row, message in sendable:
                futures.append(
                    await producer.send(
                        self._topic,
                        value=message.model_dump_json().encode(),
                        key=str(row["user_id"]).encode(),
                        headers=[(HEADER, str(row["id"]).encode())],
                    )
                )
        finally:
            # Whatever happened to the later sends, the earlier ones are in flight: wait for
            # them (each ends within the request timeout) so no send outlives this round.
            outcomes = await asyncio.gather(*futures, return_exceptions=True)
        acked: list[tuple[UUID, Any]] = []
        failed = 0
        for row, outcome in zip(rows, outcomes, strict=False):
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
        waited = await self._db(self._mark_sent(connection, acked))
        self._faults.reached("after_mark_published")
        self._metrics.inc("milestones_published_total", len(acked))
        # Per notification: the round already does a send per row, and rows are few.
        for seconds in waited:
            self._metrics.observe("milestones_notification_latency_seconds", max(0.0, seconds))
        self._metrics.observe(
            "milestones_publisher_round_duration_seconds", time.perf_counter() - started
        )
        self.published += len(acked)
        return len(rows)

    async def _mark_seen(
        self, connection: asyncpg.Connection, sendable: list[tuple[asyncpg.Record, Any]]
    ) -> list[tuple[asyncpg.Record, Any]]:
        """Mark published the rows the read-back saw on the topic before they were recorded;
        return the others, to be sent."""
        seen = {row["id"]: self._on_topic_unrecorded[row["id"]] for row, _ in sendable
                if row["id"] in self._on_topic_unrecorded}
        if not seen:
            return sendable
        ids = list(seen)
        rows = await self._db(connection.fetch(
            _MARK_PUBLISHED, ids, [seen[i][0] for i in ids], [seen[i][1] for i in ids]
        ))
        for nid in ids:
            del self._on_topic_unrecorded[nid]
        if rows:
            log.warning("publisher: %d notification(s) recorded again were already on the topic;"
                        " marked published, not sent", len(rows))
            self._metrics.inc("milestones_readback_hits_total", len(rows))
        return [(row, message) for row, message in sendable if row["id"] not in seen]

    async def _mark_sent(
        self, connection: asyncpg.Connection, acked: list[tuple[UUID, Any]]
    ) -> list[float]:
        """Step 5, one transaction on the lease connection: a lost lease marks nothing.

        Returns, per row marked, the seconds from its creation to now by the database clock
        (the notification latency, free of any clock skew between hosts)."""
        async with connection.transaction():
            marked = await connection.fetch(
                _MARK_PUBLISHED,
                [nid for nid, _ in acked],
                [meta.partition for _, meta in acked],
                [meta.offset for _, meta in acked],
            )
            # Positions stay where the read-back put them while records are in doubt or while
            # some notifications on the topic still wait for their record.
            if not self._in_doubt and not self._on_topic_unrecorded:
                ends: dict[int, int] = {}
                for _, meta in acked:
                    ends[meta.partition] = max(ends.get(meta.partition, 0), meta.offset + 1)
                await connection.execute(
                    _ADVANCE_POSITIONS, self._topic, list(ends), list(ends.values())
                )
        return [row["waited_s"] for row in marked]


async def _start_or_stop(client: Any) -> None:
    """Start an aiokafka client; one that fails to start is stopped, not leaked."""
    try:
        await client.start()
    except BaseException:
        await within(client.stop(), 5.0, "stopping a client that did not start")
        raise


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> list[int]:
    deadline = time.monotonic() + 30
    while True:
        await consumer.topics()
        found = consumer.partitions_for_topic(topic)
        if found:
            return sorted(found)
        if time.monotonic() > deadline:
            raise KafkaTimeoutError(f"topic {topic} not found")
        await asyncio.sleep(0.5)


class _Backoff:
    """Capped exponential backoff with jitter: 0.2 s doubling to ``cap_s``, each drawn in [½, 1]."""

    def __init__(self, cap_s: float, first_s: float = 0.2) -> None:
        self._cap_s = cap_s
        self._first_s = first_s
        self._delay_s = first_s

    def reset(self) -> None:
        self._delay_s = self._first_s

    def next(self) -> float:
        delay = self._delay_s * random.uniform(0.5, 1.0)
        self._delay_s = min(self._delay_s * 2, self._cap_s)
        return delay
