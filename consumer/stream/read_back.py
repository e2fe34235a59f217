"""Step 2 of the publisher: the read-back, which settles sends whose outcome is unknown.

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
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaTimeoutError

from consumer.ops.metrics import Metrics
from consumer.settings import Settings
from consumer.store.outbox_sql import (
    MARK_PUBLISHED,
    READ_POSITIONS,
    RECORDED_AMONG,
    SET_POSITIONS,
)
from consumer.stream.kafka import make_consumer, started
from consumer.stream.publisher_lease import on_lease
from consumer.stream.teardown import within

log = logging.getLogger(__name__)

HEADER = "notification_id"
READ_BACK_TIMEOUT_S = 60.0
READ_BACK_CHUNK = 5_000


def notification_id_of(headers: Sequence[tuple[str, bytes]], value: bytes | None) -> UUID | None:
    for name, raw in headers or ():
        if name == HEADER:
            with contextlib.suppress(ValueError):
                return UUID(raw.decode())
    if value:
        with contextlib.suppress(ValueError, TypeError, KeyError):
            return UUID(json.loads(value)["notification_id"])
    return None


class ReadBack:
    """The topic reader and what the last read-back found without a record."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._topic = settings.notification_topic
        self._reader: AIOKafkaConsumer | None = None
        # Notifications found on the topic by the last read-back that have no record at all:
        # the database is behind the topic (restored from a backup). Recorded again later (by
        # a replay), they are marked published from here instead of being sent a second time.
        self._on_topic_unrecorded: dict[UUID, tuple[int, int]] = {}

    @property
    def holds_positions(self) -> bool:
        """True while notifications on the topic wait for their record: the positions stay
        before them."""
        return bool(self._on_topic_unrecorded)

    async def close(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            await within(reader.stop(), 5.0, "stopping the publisher's reader")

    async def run(self, connection: asyncpg.Connection, stop: asyncio.Event) -> None:
        """Mark as published every pending row already on the topic past our last position.

        Reads to the high watermark of every partition, marking in chunks so that memory does
        not grow with the length of the topic (the first lease on a database without positions
        reads it all). Raises ``KafkaTimeoutError`` if the broker does not let it get there.
        """
        if self._reader is None:
            self._reader = await started(make_consumer(self._settings, group_id=None), self._settings)
        reader = self._reader
        partitions = await _partitions(reader, self._topic)
        stored = {
            row["partition"]: row["next_offset"]
            for row in await on_lease(connection.fetch(READ_POSITIONS, self._topic))
        }
        tps = [TopicPartition(self._topic, p) for p in partitions]
        reader.assign(tps)
        deadline = time.monotonic() + READ_BACK_TIMEOUT_S
        unrecorded: dict[UUID, tuple[int, int]] = {}
        hits, ends = await self._scan(connection, reader, tps, stored, stop, deadline, unrecorded)
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
            more, new_ends = await self._scan(
                connection, reader, again, {}, stop, deadline, unrecorded
            )
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
            await on_lease(connection.execute(
                SET_POSITIONS, self._topic, list(ends), list(ends.values())
            ))
        if hits:
            log.warning("publisher: read-back found %d pending notification(s) already sent", hits)
            self._metrics.inc("milestones_readback_hits_total", hits)

    async def _scan(
        self,
        connection: asyncpg.Connection,
        reader: AIOKafkaConsumer,
        tps: list[TopicPartition],
        starts: dict[int, int],
        stop: asyncio.Event,
        deadline: float,
        unrecorded: dict[UUID, tuple[int, int]],
    ) -> tuple[int, dict[int, int]]:
        """Read ``tps`` from ``starts`` (the beginning where absent) to their high watermarks,
        marking what is found; return the rows marked and the watermarks reached."""
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
                hits += await _mark_found(connection, found, unrecorded)
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
        hits += await _mark_found(connection, found, unrecorded)
        return hits, ends

    async def settle_recorded_again(
        self, connection: asyncpg.Connection, sendable: list[tuple[asyncpg.Record, Any]]
    ) -> list[tuple[asyncpg.Record, Any]]:
        """Mark published the rows the read-back saw on the topic before they were recorded;
        return the others, to be sent."""
        if not self._on_topic_unrecorded:
            return sendable
        seen = {row["id"]: self._on_topic_unrecorded[row["id"]] for row, _ in sendable
                if row["id"] in self._on_topic_unrecorded}
        if not seen:
            return sendable
        ids = list(seen)
        rows = await on_lease(connection.fetch(
            MARK_PUBLISHED, ids, [seen[i][0] for i in ids], [seen[i][1] for i in ids]
        ))
        for nid in ids:
            del self._on_topic_unrecorded[nid]
        if rows:
            log.warning("publisher: %d notification(s) recorded again were already on the topic;"
                        " marked published, not sent", len(rows))
            self._metrics.inc("milestones_readback_hits_total", len(rows))
        return [(row, message) for row, message in sendable if row["id"] not in seen]


async def _mark_found(
    connection: asyncpg.Connection,
    found: dict[UUID, tuple[int, int]],
    unrecorded: dict[UUID, tuple[int, int]],
) -> int:
    """Mark the pending rows among ``found``; add the ids without a row to ``unrecorded``."""
    if not found:
        return 0
    ids = list(found)
    rows = await on_lease(connection.fetch(
        MARK_PUBLISHED, ids, [found[i][0] for i in ids], [found[i][1] for i in ids]
    ))
    recorded = await on_lease(connection.fetch(RECORDED_AMONG, ids))
    known = {row["id"] for row in recorded}
    unrecorded.update((nid, where) for nid, where in found.items() if nid not in known)
    return len(rows)


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
