"""The consume loop and its commit order.

One batch, numbered as in :meth:`Engine._handle`:
  1. decode every record (one whose decoding raises is rejected as ``unprocessable``); send
     the rejected ones to the dead-letter topic and await their
     acknowledgements.            fails: broker away -> retry with backoff (polling, partitions
                                  paused for the wait only), nothing committed
  2. the batch's Postgres transactions: its preference changes, then one transaction per
     write lane (each partition whole in one lane; ``MILESTONES_BATCH_LANES=1`` makes the
     batch a single transaction of preferences then sessions). Step 3 waits for all of them.
                                  fails: transient -> pause fetching, back off, keep polling;
                                  deadlock -> retry; refused content, or writing raised
                                  -> halve until the offender is alone, dead-letter it,
                                  commit the rest; a message whose planning raised is
                                  dead-lettered alone after the commit
  3. commit the batch's offsets to the consumer group, for partitions still owned.
                                  fails: rebalance, or no answer in 10 s -> skip; the next
                                  commit or owner redoes the batch and the ledger makes that a
                                  no-op
  4. wake the outbox publisher (its own task).
A crash between any two steps repeats the batch after restart; the ledger's unique key makes
the repeat change nothing.

On revocation the batch in hand gets ``revoke_deadline_s`` (shorter than the rebalance timeout)
to finish and commit; past it the batch is abandoned: its offsets for the revoked partitions are
never committed, and an offset commit still waiting (for a coordinator, typically) is cancelled,
since aiokafka would send it under the next generation. On SIGTERM the batch gets its share of
``MILESTONES_SHUTDOWN_TIMEOUT_S``, then is cancelled uncommitted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from consumer.domain.batch import Envelope, Event
from consumer.faults import FaultInjector
from consumer.ops.logs import fields
from consumer.ops.metrics import Metrics
from consumer.retry import Backoff
from consumer.stream.dead_letters import send_dead_letters
from consumer.stream.decode import Decoded, RawRecord, Rejected, decode, unprocessable
from consumer.stream.kafka import broker_trouble
from consumer.stream.writer import BatchWriter
from schemas.events import PreferencesChanged

log = logging.getLogger(__name__)

Batch = dict[TopicPartition, list[Any]]


@dataclass(slots=True)
class Prepared:
    """A fetched batch, decoded: step 1 done, possibly while the previous batch was in step 2."""

    batch: Batch
    records: list[RawRecord]
    envelopes: list[Envelope]
    rejected: list[Rejected]
    generation: int


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._engine.partitions_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        self._engine.partitions_assigned(set(assigned))


class Engine:
    # How a rejected record is logged; a replay, which does not send it again, says so.
    rejected_label = "dead letter"

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        dlq_producer: AIOKafkaProducer,
        writer: BatchWriter,
        metrics: Metrics,
        faults: FaultInjector,
        *,
        accepts: Mapping[str, tuple[type[Event], ...]],
        dlq_topic: str,
        poll_timeout_ms: int,
        max_records: int,
        revoke_deadline_s: float,
        commit_timeout_s: float = 10.0,
        after_commit: Callable[[int], None] = lambda _: None,
    ) -> None:
        self._consumer = consumer
        self._dlq_producer = dlq_producer
        self._writer = writer
        self._metrics = metrics
        self._faults = faults
        self._accepts = accepts
        # Topics whose records go first in a batch (preferences apply before activities).
        self._preference_topics = {
            topic for topic, kinds in accepts.items() if PreferencesChanged in kinds
        }
        self._dlq_topic = dlq_topic
        self._poll_timeout_ms = poll_timeout_ms
        self._max_records = max_records
        self._revoke_deadline_s = revoke_deadline_s
        self._commit_timeout_s = commit_timeout_s
        self._after_commit = after_commit
        self._inflight: asyncio.Task[None] | None = None
        self._committing: asyncio.Future[None] | None = None
        self._abandon: set[TopicPartition] = set()
        self._carry: Batch = {}
        self._generation = 0  # revocations so far
        self._next_offsets: dict[TopicPartition, int] = {}
        self.assigned_once = False
        self.paused = False
        self.events_done = 0

    @property
    def listener(self) -> ConsumerRebalanceListener:
        return _Rebalance(self)

    # --- rebalance -------------------------------------------------------------------------
    async def partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        """Let the batch in hand finish and commit within the deadline, else abandon it.

        The deadline is shorter than the rebalance timeout, so the group never waits on us
        longer than that. An abandoned batch may still finish its transaction (the ledger makes
        that harmless for the new owner), but its offsets for ``revoked`` are never committed.
        Records fetched meanwhile for revoked partitions are dropped: the next owner reads them
        from the committed offset.
        """
        task = self._inflight
        if task is not None and not task.done():
            done, _ = await asyncio.wait({task}, timeout=self._revoke_deadline_s)
            if not done:
                log.warning("revocation: batch still running after %.1f s; its offsets will not"
                            " be committed", self._revoke_deadline_s)
                self._abandon |= revoked
                self._metrics.inc("milestones_abandoned_batches_total")
                if self._committing is not None:
                    self._committing.cancel()
        for tp in revoked:
            self._carry.pop(tp, None)
            self._next_offsets.pop(tp, None)
            # Its lag is the next owner's to report; a stale series would be summed twice.
            self._metrics.remove("milestones_consumer_lag", topic=tp.topic, partition=str(tp.partition))
        if revoked:
            self._generation += 1  # a batch fetched before now is filtered before it is handled

    def partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.assigned_once = True
        log.info("assigned %d partition(s)", len(assigned))
        if self.paused and assigned:
            self._consumer.pause(*assigned)

    # --- the loop --------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event, *, shutdown_timeout_s: float,
                  until_caught_up: bool = False) -> None:
        """Consume until ``stop`` is set (or, with ``until_caught_up``, until no lag is left).

        While a batch is in its transaction, the next one is fetched and decoded (step 1 of
        the next batch overlaps step 2 of this one: the engine's CPU and the database's work
        in parallel). Its dead letters, transaction and commit still wait for this batch's
        commit, so the commit order is unchanged.
        """
        fetch_backoff = Backoff(0.2, 5.0)
        upcoming: asyncio.Task[Prepared] | None = None
        retired: Prepared | None = None  # the batch just committed, freed by the next prefetch
        try:
            while not stop.is_set():
                try:
                    prepared = await (upcoming or asyncio.ensure_future(self._prepare()))
                except KafkaError as error:
                    upcoming = None
                    log.warning("fetch failed (%s); retrying in %.1f s", error,
                                fetch_backoff.step_s)
                    await fetch_backoff.wait(stop)
                    continue
                upcoming = None
                fetch_backoff.reset()
                if prepared.generation != self._generation:
                    prepared = self._refresh(prepared)  # a rebalance came in between
                if prepared.batch:
                    self._inflight = asyncio.ensure_future(self._handle(prepared))
                    upcoming = asyncio.ensure_future(
                        self._prepare(overlapping=True, retired=retired)
                    )
                    retired = None
                    await self._finish(self._inflight, stop, shutdown_timeout_s)
                    self._inflight = None
                    retired = prepared
                if until_caught_up and not prepared.batch and await self.caught_up():
                    return
        finally:
            if upcoming is not None:
                upcoming.cancel()
                with contextlib.suppress(asyncio.CancelledError, KafkaError):
                    await upcoming

    async def _prepare(
        self, *, overlapping: bool = False, retired: Prepared | None = None
    ) -> Prepared:
        """Step 1 for the next batch: fetch, order (preferences first) and decode.

        ``retired`` is the batch committed last: freeing its tens of thousands of objects takes
        about 7 ms per 5,000 records, which on the engine's critical path would come between one
        commit and the next transaction. Released here, it is freed while the batch in hand is
        in Postgres.
        """
        if overlapping:
            # Let the batch in hand get its first statement to the database before this
            # decoding takes the event loop; otherwise it would precede, not overlap, it.
            for _ in range(3):
                await asyncio.sleep(0)
        del retired
        batch = await self._fetch()
        return self._decoded(batch, self._generation)

    def _decoded(self, batch: Batch, generation: int) -> Prepared:
        records: list[RawRecord] = []
        for tp in sorted(batch, key=lambda tp: (tp.topic not in self._preference_topics, tp)):
            records.extend(batch[tp])
        envelopes, rejected = self._decode(records)
        return Prepared(batch, records, envelopes, rejected, generation)

    def _refresh(self, prepared: Prepared) -> Prepared:
        """A batch fetched before a revocation: keep only the partitions still ours.

        The next owner reads the others from the committed offset. ``records`` stays whole:
        envelope positions index into it.
        """
        owned = self._consumer.assignment()

        def ours(topic: str, partition: int) -> bool:
            return TopicPartition(topic, partition) in owned

        return Prepared(
            {tp: records for tp, records in prepared.batch.items() if tp in owned},
            prepared.records,
            [e for e in prepared.envelopes if ours(e.topic, e.partition)],
            [r for r in prepared.rejected if ours(r.record.topic, r.record.partition)],
            self._generation,
        )

    async def _finish(
        self, task: asyncio.Task[None], stop: asyncio.Event, shutdown_timeout_s: float
    ) -> None:
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                # SIGTERM mid-batch: give the batch until the shutdown deadline.
                done, _ = await asyncio.wait({task}, timeout=shutdown_timeout_s)
                if not done:
                    log.warning("shutdown: abandoning the batch in hand uncommitted")
                    self._metrics.inc("milestones_abandoned_batches_total")
                    # Cancelled, and given a moment to unwind, no more: its transaction rolls
                    # back (or committed already: the ledger makes the redo a no-op).
                    task.cancel()
                    await asyncio.wait({task}, timeout=0.5)
                    return
            task.result()
        finally:
            stopping.cancel()

    async def _fetch(self) -> Batch:
        if self._carry:
            carried, self._carry = self._carry, {}
            return carried
        batch: Batch = await self._consumer.getmany(
            timeout_ms=self._poll_timeout_ms, max_records=self._max_records
        )
        self._update_lag(batch)
        return batch

    async def idle_poll(self, seconds: float) -> None:
        """Wait while staying in the group: poll with every partition paused.

        A partition assigned meanwhile may still return records; they are carried into the
        next batch so that no fetched record is skipped.
        """
        deadline = time.monotonic() + seconds
        try:
            while (left := deadline - time.monotonic()) > 0:
                assignment = self._consumer.assignment()
                if assignment:
                    self._consumer.pause(*assignment)
                try:
                    extra = await self._consumer.getmany(timeout_ms=max(1, int(left * 1000)))
                except KafkaError:
                    await asyncio.sleep(min(left, 0.5))
                    continue
                for tp, records in extra.items():
                    self._carry.setdefault(tp, []).extend(records)
        finally:
            # Paused only for the wait: unless the database is away (then set_paused decides),
            # fetching goes on afterwards. Otherwise a dead-letter retry, which waits here too,
            # would leave every partition paused for good.
            assignment = self._consumer.assignment()
            if not self.paused and assignment:
                self._consumer.resume(*assignment)

    def set_paused(self, paused: bool) -> None:
        if paused == self.paused:
            return
        self.paused = paused
        self._metrics.set("milestones_paused", 1 if paused else 0)
        assignment = self._consumer.assignment()
        if paused:
            log.warning("database unreachable: fetching paused")
            if assignment:
                self._consumer.pause(*assignment)
        else:
            log.info("database reachable again: fetching resumed")
            if assignment:
                self._consumer.resume(*assignment)

    async def caught_up(self) -> bool:
        assignment = self._consumer.assignment()
        if not assignment:
            return False
        for tp in assignment:
            high = self._consumer.highwater(tp)
            if high is None or await self._consumer.position(tp) < high:
                return False
        return True

    def _update_lag(self, batch: Batch) -> None:
        for tp, records in batch.items():
            if records:
                self._next_offsets[tp] = records[-1].offset + 1
        for tp in self._consumer.assignment():
            high = self._consumer.highwater(tp)
            if high is not None and tp in self._next_offsets:
                self._metrics.set(
                    "milestones_consumer_lag", max(0, high - self._next_offsets[tp]),
                    topic=tp.topic, partition=str(tp.partition),
                )

    # --- one batch -------------------------------------------------------------------------
    async def _handle(self, prepared: Prepared) -> None:
        batch, records, envelopes, rejected = (
            prepared.batch, prepared.records, prepared.envelopes, prepared.rejected
        )
        # 1. decoded in _prepare; dead-letter the rejected, acknowledged before any commit
        await self._dead_letter(rejected)
        # 2. one transaction (or, if the database refuses a value, several)
        outcome = await self._writer.write(envelopes)
        if outcome.refused:
            refused = [
                Rejected(records[envelope.position], reason, kind)
                for envelope, reason, kind in outcome.refused
            ]
            for item in refused:
                self._metrics.inc("milestones_dead_letters_total", reason=item.kind)
            await self._dead_letter(refused)
        self._faults.reached("after_db_commit")
        # 3. offsets, only for partitions still ours
        if await self._commit(batch):
            self._observe_counting_latency(batch)
        self._faults.reached("after_offset_commit")
        self.events_done += len(records)
        # 4. the publisher
        self._after_commit(outcome.pending)


    def _decode(self, records: Sequence[RawRecord]) -> tuple[list[Envelope], list[Rejected]]:
        now_ms = int(time.time() * 1000)
        envelopes: list[Envelope] = []
        rejected: list[Rejected] = []
        for position, record in enumerate(records):
            # The per-record guard: whatever decoding one record raises isolates that record
            # (a dead letter of kind ``unprocessable``), never the batch. Free while nothing
            # raises (zero-cost exception handling in CPython 3.11).
            try:
                result = decode(
                    record, accepts=self._accepts.get(record.topic, ()), now_ms=now_ms,
                    position=position,
                )
            except Exception as error:
                log.exception("decoding %s[%d]@%d raised", record.topic, record.partition,
                              record.offset, extra=fields(topic=record.topic,
                                                          partition=record.partition,
                                                          offset=record.offset))
                result = unprocessable(record, error)
            if isinstance(result, Decoded):
                envelopes.append(result.envelope)
                if result.key_mismatch:
                    self._metrics.inc("milestones_key_mismatch_total")
                    log.info("key differs from mentor_id at %s[%d]@%d; the value is used",
                             record.topic, record.partition, record.offset,
                             extra=fields(topic=record.topic, partition=record.partition,
                                          offset=record.offset,
                                          mentor_id=result.envelope.event.mentor_id))
            else:
                rejected.append(result)
                self._metrics.inc("milestones_dead_letters_total", reason=result.kind)
                log.warning("%s %s[%d]@%d: %s", self.rejected_label, record.topic,
                            record.partition, record.offset, result.reason,
                            extra=fields(topic=record.topic, partition=record.partition,
                                         offset=record.offset))
        return envelopes, rejected

    async def _dead_letter(self, rejected: Sequence[Rejected]) -> None:
        backoff = Backoff(0.2, 5.0)
        while rejected:
            try:
                await send_dead_letters(self._dlq_producer, self._dlq_topic, rejected)
                return
            except Exception as error:
                if not broker_trouble(error):
                    raise
                log.warning("dead-letter send failed (%s); retrying in %.1f s", error,
                            backoff.step_s)
                # Waiting by polling the paused partitions keeps the engine in its group.
                await backoff.wait(sleep=self.idle_poll)

    def _observe_counting_latency(self, batch: Batch) -> None:
        """One observation per committed batch: record timestamp to now, for its oldest record.

        The oldest is taken among the first record of each partition (the lowest offset, which
        carries the oldest timestamp unless a producer set them out of order): O(partitions),
        not O(records), on the hot path. As the whole batch commits at once, that record's
        latency bounds every other record's in the batch from above.
        """
        oldest_ms = min(
            (records[0].timestamp for records in batch.values() if records), default=0
        )
        if oldest_ms > 0:
            self._metrics.observe(
                "milestones_counting_latency_seconds", max(0.0, time.time() - oldest_ms / 1000)
            )

    async def _commit(self, batch: Batch) -> bool:
        """Step 3; True when the offsets were committed."""
        owned = self._consumer.assignment()
        offsets = {
            tp: records[-1].offset + 1
            for tp, records in batch.items()
            if records and tp in owned and tp not in self._abandon
        }
        self._abandon.clear()
        if not offsets:
            return False
        # Bounded: aiokafka waits for a coordinator indefinitely while the broker is away. A
        # skipped commit only means the batch is read again; the next commit covers it.
        committing = asyncio.ensure_future(
            asyncio.wait_for(self._consumer.commit(offsets), self._commit_timeout_s)
        )
        self._committing = committing
        try:
            await asyncio.wait({committing})
        except asyncio.CancelledError:
            committing.cancel()
            raise
        finally:
            self._committing = None
        if committing.cancelled():
            # The revocation gave up on this batch while its commit still waited (for a
            # coordinator, typically): sent now, it would carry the next generation.
            self._metrics.inc("milestones_offset_commit_failures_total")
            log.warning("offset commit skipped (batch abandoned at revocation)")
            return False
        error = committing.exception()
        if isinstance(error, AssertionError) or broker_trouble(error):
            # A rebalance took the partitions (or the broker is away): the next owner repeats
            # the batch harmlessly.
            self._metrics.inc("milestones_offset_commit_failures_total")
            log.warning("offset commit skipped (%s)", type(error).__name__)
            return False
        if error is not None:
            raise error
        return True
