"""``milestones replay``: re-read the input topics through the engine's own path, then exit.

Backfill for a new deployment and recovery after an incident. The replay is the live engine in
a different harness: the same :class:`Engine` loop, :class:`BatchWriter` and batch transaction,
so the ledger's unique key makes every session count once whoever reads it first, ``run`` or a
replay, and a second replay changes nothing. The command, step by step:

1. The survey, before anything is read: where every input partition begins, where it ends
   (the high watermark of a fetch: Tansu's ListOffsets answer is not the end), and the replay
   group's committed offsets. The ends bound the whole replay: records produced after this
   moment belong to ``run``, so a replay beside producers that never pause still finishes.
2. The checks: a warning for every partition that no longer starts at offset 0 (retention
   removed history no replay can rebuild); and, when resuming from the group's offsets
   (no ``--from-beginning``), a refusal (exit 2) if this database holds less than those
   offsets imply (a fresh or restored database: table ``replay_positions``).
3. Before reading the input: what the batches depend on that is not in the input topics is
   put in place here: the organizations' thresholds, from their compacted topic.
4. The preferences topic up to its ends, then the activity topic up to its ends, with its own
   consumer group (``<group>-replay``) so that the service's offsets stay as they are. After
   each batch's transaction the positions it reached are written to ``replay_positions``, and
   then its offsets are committed to the group.
5. Wait (up to a minute) until the notifications it recorded are sent, print a summary.

Rejected messages are not dead-lettered again (the live service did so when it first read
them); the log says so and the summary counts them. ``--no-notify`` passes the command's start
time to the batch (``suppress_before_ms``): what sessions older than that reach is recorded as
suppressed, a session produced since (a mentor crossing a milestone live) congratulates as usual.

A replay cannot apply a changed rule (time zone, counted types): the ledger keeps the first
delivery of each ``activity_id``. ``milestones reconcile --rebuild`` does that.

Exit status 0 once every partition reached its end; 1 when stopped (SIGINT/SIGTERM) before,
and a plain ``replay`` continues from there; 2 for the refusal of step 2.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

import asyncpg
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from consumer.domain.batch import Envelope, Event
from consumer.faults import FaultInjector
from consumer.ops.metrics import Metrics
from consumer.ops.progress import Progress
from consumer.runtime import (
    batch_options,
    batch_writer,
    command_pool,
    engine_for,
    install_stop_signals,
    publisher_running,
    started_consumer,
    tune_garbage_collector,
    wait_until_sent,
)
from consumer.settings import ENV_PREFIX, Settings, SettingsError
from consumer.store.errors import classify
from consumer.store.replay_positions import read_positions, save_positions
from consumer.stream.decode import ACTIVITY_EVENTS, PREFERENCE_EVENTS
from consumer.stream.engine import Batch, Engine
from consumer.stream.kafka import high_watermarks
from consumer.stream.outbox import Publisher
from consumer.stream.thresholds_topic import restore_thresholds
from consumer.stream.writer import BatchWriter, WriteOutcome

log = logging.getLogger(__name__)

GROUP_SUFFIX = "-replay"
SURVEY_TIMEOUT_S = 30.0


def replay_group(settings: Settings) -> str:
    return settings.group_id + GROUP_SUFFIX


@dataclass(frozen=True, slots=True)
class StartingPoint:
    """Where each partition starts: the group's offsets, the beginning, or a time."""

    mode: Literal["committed", "beginning", "timestamp"]
    timestamp_ms: int = 0

    @classmethod
    def from_flags(cls, *, from_beginning: bool, from_timestamp: str | None) -> StartingPoint:
        if from_timestamp is None:
            return cls("beginning" if from_beginning else "committed")
        try:
            moment = datetime.fromisoformat(from_timestamp)
        except ValueError:
            raise SettingsError(f"--from-timestamp: not an ISO 8601 time: {from_timestamp!r}") from None
        if moment.tzinfo is None:
            raise SettingsError(
                f"--from-timestamp: {from_timestamp!r} has no offset (e.g. 2026-01-01T00:00:00+01:00)"
            )
        # Record timestamps count from 1970 and cannot be negative (the broker's lookup
        # refuses one): an earlier moment is before every record, so it starts at the first.
        return cls("timestamp", max(0, int(moment.timestamp() * 1000)))


# --- 1. the survey ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Survey:
    """Every input partition as it was when the replay started."""

    beginnings: dict[TopicPartition, int] = field(default_factory=dict)
    ends: dict[TopicPartition, int] = field(default_factory=dict)
    committed: dict[TopicPartition, int | None] = field(default_factory=dict)
    starts: dict[TopicPartition, int] = field(default_factory=dict)

    def has_topic(self, topic: str) -> bool:
        return any(tp.topic == topic for tp in self.ends)

    def to_read(self, topic: str | None = None) -> int:
        """The records between the starts and the ends (of ``topic``, or of every input): the
        total the replay sets out to read."""
        return sum(
            max(0, end - self.starts.get(tp, 0))
            for tp, end in self.ends.items()
            if topic is None or tp.topic == topic
        )


async def survey_inputs(settings: Settings, group_id: str, start: StartingPoint) -> Survey:
    """Step 1: beginnings, ends, the group's offsets and this replay's starts, without joining
    the group (the partitions are assigned by hand)."""
    consumer = await started_consumer(settings, group_id=group_id)
    try:
        await consumer.topics()
        tps = [
            TopicPartition(topic, number)
            for topic in (settings.preferences_topic, settings.activity_topic)
            for number in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        if not tps:
            return Survey()
        consumer.assign(tps)
        beginnings: dict[TopicPartition, int] = await consumer.beginning_offsets(tps)
        committed = {tp: await consumer.committed(tp) for tp in tps}
        ends = await high_watermarks(consumer, tps, timeout_s=SURVEY_TIMEOUT_S)
        found: dict[TopicPartition, Any] = {}
        if start.mode == "timestamp":
            # Some brokers (Tansu) answer the first offset whatever the time: replaying more
            # than asked is harmless, the ledger makes it a no-op.
            found = await consumer.offsets_for_times({tp: start.timestamp_ms for tp in tps})
    except KafkaError as error:
        raise SettingsError(
            f"{ENV_PREFIX}KAFKA_BOOTSTRAP_SERVERS: could not read where the input partitions"
            f" end ({error}); nothing was replayed"
        ) from None
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(consumer.stop(), 5)
    starts: dict[TopicPartition, int] = {}
    for tp in tps:
        if start.mode == "beginning":
            starts[tp] = beginnings[tp]
        elif start.mode == "timestamp":
            hit = found.get(tp)
            starts[tp] = ends[tp] if hit is None else hit.offset
        else:  # the group's offset; a partition it never committed starts at the beginning
            starts[tp] = max(committed[tp] or 0, beginnings[tp])
    return Survey(beginnings, ends, committed, starts)


# --- 2. the checks ---------------------------------------------------------------------------
def removed_history(beginnings: Mapping[TopicPartition, int]) -> list[TopicPartition]:
    """The partitions that no longer start at offset 0: retention removed records there."""
    return [tp for tp, beginning in sorted(beginnings.items()) if beginning > 0]


def warn_about_removed_history(survey: Survey) -> list[TopicPartition]:
    """The contract's warning, every time it applies, whatever the database holds: a topic
    that no longer starts at offset 0 cannot rebuild what retention removed."""
    cut = removed_history(survey.beginnings)
    for topic in sorted({tp.topic for tp in cut}):
        starts = ", ".join(f"[{tp.partition}] at {survey.beginnings[tp]:,}"
                           for tp in cut if tp.topic == topic)
        log.warning(
            "topic %s no longer starts at offset 0 (%s): retention removed records there, and a"
            " replay cannot rebuild what retention removed", topic, starts,
        )
    return cut


def missing_history(
    committed: Mapping[TopicPartition, int | None],
    held: Mapping[TopicPartition, int],
    beginnings: Mapping[TopicPartition, int],
) -> list[TopicPartition]:
    """The partitions where the group has committed past what this database holds.

    ``held`` comes from ``replay_positions``, written after each replay batch's transaction
    and before its offset commit: in a database that has seen every batch it is never below
    the committed offset. A fresh database has no rows; a restored one has the rows of its
    backup, and a backup never holds a position without the effects below it. Records below
    a partition's beginning are gone anyway: resuming there skips nothing that exists.
    """
    return [
        tp for tp, offset in sorted(committed.items())
        if offset is not None and offset > max(held.get(tp, 0), beginnings.get(tp, 0))
    ]


def refuse_partial_history(survey: Survey, held: Mapping[TopicPartition, int], group: str) -> None:
    missing = missing_history(survey.committed, held, survey.beginnings)
    if not missing:
        return
    first = missing[0]
    more = f" and {len(missing) - 1} more partition(s)" if len(missing) > 1 else ""
    raise SettingsError(
        f"replay: this database holds less than the replay group {group} has committed"
        f" ({first.topic}[{first.partition}]: committed {survey.committed[first]:,}, held"
        f" {held.get(first, 0):,}{more}), as a fresh or restored database does; resuming would"
        " rebuild only part of the history: add --from-beginning"
    )


# --- 4. reading ------------------------------------------------------------------------------
class _StartAt(ConsumerRebalanceListener):  # type: ignore[misc]
    """Seeks each partition to the survey's start on its first assignment, then lets the
    engine's own listener run. A partition assigned again after a rebalance continues from
    the replay group's committed offset instead of starting over. Resuming from the group's
    offsets needs no seek: the consumer starts there by itself."""

    def __init__(
        self, inner: Any, consumer: AIOKafkaConsumer, starts: Mapping[TopicPartition, int] | None
    ) -> None:
        self._inner = inner
        self._consumer = consumer
        self._starts = starts
        self._started: set[TopicPartition] = set()

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._inner.on_partitions_revoked(revoked)

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        assigned = set(assigned)
        fresh = sorted(assigned - self._started)
        if self._starts is not None:
            for tp in fresh:
                if tp in self._starts:
                    self._consumer.seek(tp, self._starts[tp])
                else:  # created since the survey: everything there is later than the ends
                    await self._consumer.seek_to_end(tp)
        self._started.update(fresh)
        await self._inner.on_partitions_assigned(assigned)


class _Positions:
    """Writes ``replay_positions`` after a batch's transaction, before its offset commit.

    Only for the partitions this replay holds from their start (``covered``): every partition
    of a replay from the beginning or of a resumed one (step 2 checked it), but not one that a
    ``--from-timestamp`` replay started past what the database held.
    """

    def __init__(self, pool: asyncpg.Pool, group: str, covered: set[TopicPartition]) -> None:
        self._pool = pool
        self._group = group
        self._covered = covered

    async def save(self, batch: Batch) -> bool:
        """Whether the positions are saved (or nothing needed saving)."""
        reached = {
            (tp.topic, tp.partition): records[-1].offset + 1
            for tp, records in batch.items()
            if records and tp in self._covered
        }
        if not reached:
            return True
        try:
            await save_positions(self._pool, self._group, reached)
        except Exception as error:
            if classify(error) is None:
                raise
            log.warning("could not save the replay's positions (%s); this batch's offsets are"
                        " not committed, the next commit covers them", error)
            return False
        return True


class _ReplayEngine(Engine):
    """The live engine, bounded by the survey's ends: records at or past a partition's end are
    dropped from a fetch (they belong to ``run``), the partition is paused once it reaches its
    end, and "caught up" means every assigned partition has reached it."""

    rejected_label = "rejected (not dead-lettered again: the service did when it first read it)"

    def __init__(
        self, *args: Any, ends: Mapping[TopicPartition, int], positions: _Positions, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._ends = ends
        self._positions = positions
        self._reached: set[TopicPartition] = set()

    async def partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self._reached -= revoked  # assigned again, it continues from the committed offset
        await super().partitions_revoked(revoked)

    async def _fetch(self) -> Batch:
        # Held paused here as well: the engine resumes every partition after a pause of its own.
        held = self._reached & self._consumer.assignment()
        if held:
            self._consumer.pause(*held)
        bounded: Batch = {}
        for tp, records in (await super()._fetch()).items():
            end = self._ends.get(tp, 0)  # a partition created since the survey: all later
            if records and records[-1].offset + 1 >= end:
                self._reached.add(tp)
                self._consumer.pause(tp)
                records = [record for record in records if record.offset < end]
            if records:
                bounded[tp] = records
        return bounded

    async def caught_up(self) -> bool:
        assignment = self._consumer.assignment()
        if not assignment:
            return False
        for tp in assignment:
            if tp not in self._reached and await self._consumer.position(tp) < self._ends.get(tp, 0):
                return False
        return True

    async def _commit(self, batch: Batch) -> bool:
        return await self._positions.save(batch) and await super()._commit(batch)


class _RecordingWriter(BatchWriter):
    """The engine's writer, remembering what this replay recorded (for the summary and for
    waiting until its notifications are sent)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pending_ids: list[UUID] = []
        self.suppressed = 0
        self.new_sessions = 0
        self.removed_sessions = 0

    async def write(self, envelopes: Sequence[Envelope]) -> WriteOutcome:
        outcome = await super().write(envelopes)
        for result in outcome.results:
            self.new_sessions += result.new_sessions
            self.removed_sessions += result.removed_sessions
            for record in result.records:
                if record.status == "pending":
                    self.pending_ids.append(record.id)
                else:
                    self.suppressed += 1
        return outcome


class _SkipDeadLetters:
    """Stands in for the dead-letter producer: the live service already dead-lettered every
    rejected input message when it first read it; sending them again would only duplicate."""

    def __init__(self) -> None:
        self.skipped = 0

    async def send(self, topic: str, **_: Any) -> asyncio.Future[None]:
        self.skipped += 1
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


@dataclass(slots=True)
class _Reading:
    """What one replay shares between its topics."""

    settings: Settings
    consumer: AIOKafkaConsumer
    survey: Survey
    starts: Mapping[TopicPartition, int] | None
    writer: _RecordingWriter
    positions: _Positions
    dead_letters: _SkipDeadLetters
    publisher: Publisher
    progress: Progress
    stop: asyncio.Event
    metrics: Metrics = field(default_factory=Metrics)
    events: dict[str, int] = field(default_factory=dict)

    async def topic(self, topic: str, kinds: tuple[type[Event], ...]) -> bool:
        """Consume ``topic`` up to the survey's ends; False if stopped before."""
        settings = self.settings
        done_before = self.progress.done

        def after_commit(pending: int) -> None:
            self.progress.update(done_before + engine.events_done)
            if pending:
                self.publisher.wake()

        engine = engine_for(
            settings, self.consumer, self.dead_letters, self.writer, self.metrics,
            FaultInjector(None), after_commit=after_commit, accepts={topic: kinds},
            engine_class=_ReplayEngine, ends=self.survey.ends, positions=self.positions,
        )
        # A new subscription has no assignment until the rebalance gives it one, so the engine
        # cannot take the previous topic's partitions for "caught up".
        self.consumer.subscribe([topic], listener=_StartAt(engine.listener, self.consumer,
                                                           self.starts))
        await engine.run(self.stop, shutdown_timeout_s=settings.shutdown_timeout_s,
                         until_caught_up=True)
        self.events[topic] = engine.events_done
        return not self.stop.is_set()


# --- the command -----------------------------------------------------------------------------
async def replay_command(
    settings: Settings,
    *,
    from_beginning: bool,
    from_timestamp: str | None,
    no_notify: bool,
    install_signals: bool = True,
    stop: asyncio.Event | None = None,
) -> int:
    started_ms = int(time.time() * 1000)
    started = time.monotonic()
    start = StartingPoint.from_flags(from_beginning=from_beginning, from_timestamp=from_timestamp)
    settings.require_kafka()
    stop = stop or asyncio.Event()
    if install_signals:
        install_stop_signals(stop)
    group = replay_group(settings)
    async with command_pool(settings) as pool:
        # 1. the survey
        survey = await survey_inputs(settings, group, start)
        # 2. the checks
        warn_about_removed_history(survey)
        held = {
            TopicPartition(topic, partition): offset
            for (topic, partition), offset in (await read_positions(pool, group)).items()
        }
        if start.mode == "committed":
            refuse_partial_history(survey, held, group)
        covered = {
            tp for tp, first in survey.starts.items()
            if first <= max(held.get(tp, 0), survey.beginnings[tp])
        }
        # 3. before reading the input: what the batches depend on beyond the input topics
        await restore_thresholds(settings, pool, strict=True)  # before any session is evaluated
        # 4. reading, up to the survey's ends
        log.info("replay: %s event(s) to read, up to where each input partition ended at start",
                 f"{survey.to_read():,}")
        consumer = await started_consumer(settings, group_id=group)
        tune_garbage_collector(settings.batch_max_records)
        dead_letters = _SkipDeadLetters()
        options = batch_options(settings, suppress_before_ms=started_ms if no_notify else None)
        metrics = Metrics()
        caught_up = True
        try:
            async with publisher_running(settings, metrics, FaultInjector(None)) as publisher:
                writer = batch_writer(
                    settings, pool, metrics, options=options, writer_class=_RecordingWriter
                )
                with Progress("replay", survey.to_read(), unit="events") as progress:
                    # One member for both topics: re-subscribing is a quick rebalance of the
                    # same member, where a second consumer would wait for the first one's
                    # session to expire.
                    reading = _Reading(
                        settings, consumer, survey,
                        None if start.mode == "committed" else survey.starts,
                        writer, _Positions(pool, group, covered), dead_letters, publisher,
                        progress, stop, metrics,
                    )
                    for topic, kinds in (
                        (settings.preferences_topic, PREFERENCE_EVENTS),
                        (settings.activity_topic, ACTIVITY_EVENTS),
                    ):
                        if not survey.has_topic(topic):
                            log.warning("topic %s does not exist; nothing to replay there", topic)
                        elif not survey.to_read(topic):  # no group join for nothing
                            reading.events[topic] = 0
                        elif not await reading.topic(topic, kinds):
                            caught_up = False
                            break
                # 5. the notifications it recorded, sent
                left = await wait_until_sent(pool, writer.pending_ids, publisher) if caught_up else 0
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(consumer.stop(), 10)
    total = sum(reading.events.values())
    if not caught_up:
        print(f"replay stopped before it caught up, after {total:,} event(s); run `milestones"
              " replay` again to continue from there", file=sys.stderr)
        return 1
    seconds = time.monotonic() - started
    per_topic = ", ".join(f"{count:,} from {topic}" for topic, count in reading.events.items())
    print(
        f"replay caught up in {seconds:.1f} s: {total:,} event(s) read"
        + (f" ({per_topic})" if per_topic else "")
        + f"; {writer.new_sessions:,} new session(s), {writer.removed_sessions:,} removed;"
        f" milestones recorded: {len(writer.pending_ids):,} to send"
        f" ({len(writer.pending_ids) - left:,} sent), {writer.suppressed:,} suppressed"
        + (f"; {dead_letters.skipped:,} rejected message(s) skipped (dead-lettered by the"
           " service when it first read them)" if dead_letters.skipped else "")
    )
    return 0
