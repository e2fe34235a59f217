"""Step 2 of the publisher: the read-back, which settles sends whose outcome is unknown.

A send whose outcome is unknown (an error or a timeout after the request may have reached the
broker) puts the publisher "in doubt". Before it sends anything else, and whenever it takes the
lease, it reads the notification topic forward from the positions recorded in
``publisher_positions`` to the high watermark and marks every pending row found there as
published (the metric ``milestones_readback_hits_total`` counts them). The read-back:
- works in chunks of ``READ_BACK_CHUNK`` records, each settled in one transaction together
  with the positions it reached, so that memory does not grow with the topic and a read-back
  cut short (a crash, the broker away, a shutdown) goes on from where it was, not from the
  start: after a restore the first read-back may have a long topic to read;
- has no deadline: it goes on while it makes progress, and gives up (still in doubt, to be
  retried) only when no record arrived for ``READ_BACK_STALL_S`` seconds;
- keeps the notifications it finds that have no record at all (the database was restored from
  a backup older than the topic) in ``publisher_unrecorded``: recorded again by a replay, they
  are marked published from there instead of being sent a second time;
- sets the positions lower too: a partition that ends before its recorded position was deleted
  and created again, and is read again from its start;
- does not settle a row an operator set back to ``pending`` (``awaiting_resend``) with the
  copy it finds: that copy is the earlier emission, and the operator asked for another.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from uuid import UUID

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaTimeoutError

from consumer.ops.metrics import Metrics
from consumer.retry import Backoff
from consumer.settings import Settings
from consumer.store.outbox_sql import READ_POSITIONS, SET_POSITIONS, SETTLE_FOUND
from consumer.stream.kafka import make_consumer, started
from consumer.stream.publisher_lease import on_lease
from consumer.stream.teardown import within

log = logging.getLogger(__name__)

HEADER = "notification_id"
READ_BACK_CHUNK = 5_000  # records per settling transaction
READ_BACK_STALL_S = 30.0  # no record for this long before the high watermark: give up, retry
READ_BACK_REPORT_S = 10.0  # a progress line this often while a long read-back runs


def notification_id_of(headers: Sequence[tuple[str, bytes]], value: bytes | None) -> UUID | None:
    for name, raw in headers or ():
        if name == HEADER:
            with contextlib.suppress(ValueError):
                return UUID(raw.decode())
    if value:
        # Any bytes another producer wrote: not ours. An exception here ended every read-back
        # at the same record, and the publisher, in doubt, never sent again.
        with contextlib.suppress(ValueError, TypeError, KeyError, RecursionError):
            found = json.loads(value)["notification_id"]
            return UUID(found) if isinstance(found, str) else None
    return None


class ReadBack:
    """The publisher's reader of its own topic."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        *,
        chunk: int = READ_BACK_CHUNK,
        stall_timeout_s: float = READ_BACK_STALL_S,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._topic = settings.notification_topic
        self._chunk = chunk
        self._stall_timeout_s = stall_timeout_s
        self._reader: AIOKafkaConsumer | None = None

    async def close(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            await within(reader.stop(), 5.0, "stopping the publisher's reader")

    async def run(self, connection: asyncpg.Connection, stop: asyncio.Event) -> int:
        """Mark as published every pending row already on the topic past our last position;
        return how many records it read.

        Raises ``KafkaTimeoutError`` when the broker lets it make no progress for
        ``stall_timeout_s``, or at shutdown; what it has read so far stays settled.
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
        tally = _Tally()
        ends = await self._scan(connection, reader, tps, stored, stop, tally)
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
            await self._scan(connection, reader, again, {}, stop, tally)
        if tally.unrecorded:
            log.warning(
                "publisher: %d notification(s) on %s have no record in the database (restored"
                " from a backup?); if recorded again they will be marked published, not sent",
                tally.unrecorded, self._topic,
            )
        if tally.hits:
            log.warning("publisher: read-back found %d pending notification(s) already sent",
                        tally.hits)
            self._metrics.inc("milestones_readback_hits_total", tally.hits)
        return tally.read

    async def _scan(
        self,
        connection: asyncpg.Connection,
        reader: AIOKafkaConsumer,
        tps: list[TopicPartition],
        starts: dict[int, int],
        stop: asyncio.Event,
        tally: _Tally,
    ) -> dict[int, int]:
        """Read ``tps`` from ``starts`` (the beginning where absent) to their high watermarks,
        settling and saving the positions chunk by chunk; return the watermarks reached."""
        for tp in tps:
            if tp.partition in starts:
                reader.seek(tp, starts[tp.partition])
            else:
                await reader.seek_to_beginning(tp)
        found: dict[UUID, tuple[int, int]] = {}
        unsaved = 0  # records read since the positions were last saved
        ends: dict[int, int] = {}
        last_record = last_report = time.monotonic()
        while True:
            batch = await reader.getmany(*tps, timeout_ms=200, max_records=self._chunk)
            for tp, records in batch.items():
                unsaved += len(records)
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
            if caught_up or unsaved >= self._chunk:
                await self._settle(connection, reader, tps, found, tally)
                tally.read += unsaved
                found, unsaved = {}, 0
            if caught_up:
                return ends
            now = time.monotonic()
            if batch:
                last_record = now
            if stop.is_set():
                raise KafkaTimeoutError("read-back interrupted by shutdown")
            if now - last_record > self._stall_timeout_s:
                raise KafkaTimeoutError(
                    f"read-back: no record for {self._stall_timeout_s:g} s before the high"
                    " watermark; what was read is settled, the rest is read next time"
                )
            if now - last_report > READ_BACK_REPORT_S:
                last_report = now
                log.info("publisher: read-back has read %d record(s) of %s so far",
                         tally.read, self._topic)

    async def _settle(
        self,
        connection: asyncpg.Connection,
        reader: AIOKafkaConsumer,
        tps: list[TopicPartition],
        found: dict[UUID, tuple[int, int]],
        tally: _Tally,
    ) -> None:
        """One transaction: mark what ``found`` holds, keep what has no record, and move the
        positions to where the reader is."""
        positions = {tp.partition: await reader.position(tp) for tp in tps}
        ids = list(found)

        async def settle() -> None:
            async with connection.transaction():
                if ids:
                    row = await connection.fetchrow(
                        SETTLE_FOUND, ids, [found[i][0] for i in ids],
                        [found[i][1] for i in ids], self._topic,
                    )
                    tally.hits += row["marked"]
                    tally.unrecorded += row["unrecorded"]
                await connection.execute(
                    SET_POSITIONS, self._topic, list(positions), list(positions.values())
                )

        await on_lease(settle())


@dataclass(slots=True)
class _Tally:
    read: int = 0
    hits: int = 0
    unrecorded: int = 0


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> list[int]:
    backoff = Backoff(0.5, 0.5, jitter=False, give_up_after_s=30)
    while True:
        await consumer.topics()
        found = consumer.partitions_for_topic(topic)
        if found:
            return sorted(found)
        if not await backoff.wait():
            raise KafkaTimeoutError(f"topic {topic} not found")
