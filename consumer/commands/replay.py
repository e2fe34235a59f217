"""``milestones replay``: re-read the input topics through the engine's own path, then exit.

Backfill for a new deployment and recovery after an incident. The replay is the live engine in
a different harness: the same :class:`Engine` loop, :class:`BatchWriter` and batch transaction,
so the ledger's unique key makes every session count once whoever reads it first, ``run`` or a
replay, and a second replay changes nothing. What differs:

- its own consumer group (``<group>-replay``), so the service's committed offsets stay as they
  are; without a flag it resumes where the last replay stopped (a new group: the beginning);
- the preferences topic first, up to its high watermark, then the activity topic, so that
  opt-outs are known before the sessions that would congratulate;
- "caught up" is ``position >= high watermark`` (from the fetch) on every assigned partition;
- rejected messages are not dead-lettered again (the live service did so when it first read
  them); they are counted in the summary;
- ``--no-notify`` passes the command's start time to the batch (``suppress_before_ms``): what
  sessions older than that reach is recorded as suppressed, a session produced since (a mentor
  crossing a milestone live) congratulates as usual.

A replay cannot apply a changed rule (time zone, counted types): the ledger keeps the first
delivery of each ``activity_id``. ``milestones reconcile --rebuild`` does that.

Exit status 0 once caught up; 1 when stopped (SIGINT/SIGTERM) before, and a plain ``replay``
continues from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any, Literal
from uuid import UUID

import asyncpg
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from consumer.commands.common import command_pool, wait_until_sent
from consumer.domain.batch import Envelope, Event
from consumer.faults import FaultInjector
from consumer.ops.metrics import Metrics
from consumer.ops.progress import format_duration
from consumer.service import (
    batch_options,
    install_stop_signals,
    publisher_running,
    start_client,
    tune_garbage_collector,
)
from consumer.settings import Settings, SettingsError
from consumer.stream.decode import ACTIVITY_EVENTS, PREFERENCE_EVENTS
from consumer.stream.engine import Engine
from consumer.stream.kafka import make_consumer
from consumer.stream.outbox import Publisher
from consumer.stream.thresholds_topic import restore_thresholds
from consumer.stream.writer import BatchWriter, WriteOutcome

log = logging.getLogger(__name__)

GROUP_SUFFIX = "-replay"
PROGRESS_TTY_INTERVAL_S = 0.5
PROGRESS_LOG_INTERVAL_S = 10.0
HISTORY_CHECK_TIMEOUT_S = 5.0

# The oldest trace the database keeps of what it has counted (prune keeps annual_summary).
_DATABASE_SINCE = """
SELECT least((SELECT min(recorded_at) FROM activity_ledger),
             (SELECT min(updated_at) FROM annual_summary),
             (SELECT min(updated_at) FROM mentor_preferences))
"""


def replay_group(settings: Settings) -> str:
    return settings.group_id + GROUP_SUFFIX


@dataclass(frozen=True, slots=True)
class StartingPoint:
    """Where each partition starts the first time this replay is assigned it."""

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
        return cls("timestamp", int(moment.timestamp() * 1000))


class _StartAt(ConsumerRebalanceListener):  # type: ignore[misc]
    """Seeks each partition to the starting point on its first assignment, then lets the
    engine's own listener run. A partition assigned again after a rebalance continues from
    the replay group's committed offset instead of starting over."""

    def __init__(self, inner: Any, consumer: AIOKafkaConsumer, start: StartingPoint) -> None:
        self._inner = inner
        self._consumer = consumer
        self._start = start
        self._started: set[TopicPartition] = set()

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._inner.on_partitions_revoked(revoked)

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        assigned = set(assigned)
        fresh = sorted(assigned - self._started)
        if fresh and self._start.mode == "beginning":
            await self._consumer.seek_to_beginning(*fresh)
        elif fresh and self._start.mode == "timestamp":
            # Some brokers (Tansu) answer the first offset whatever the time: replaying more
            # than asked is harmless, the ledger makes it a no-op.
            found = await self._consumer.offsets_for_times(
                {tp: self._start.timestamp_ms for tp in fresh}
            )
            for tp in fresh:
                hit = found.get(tp)
                if hit is None:
                    await self._consumer.seek_to_end(tp)
                else:
                    self._consumer.seek(tp, hit.offset)
        self._started.update(fresh)
        await self._inner.on_partitions_assigned(assigned)


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


# --- progress --------------------------------------------------------------------------------
@dataclass(slots=True)
class Progress:
    """Events done, lag left, rate and time left: one rewritten line on a terminal, a log line
    every ten seconds otherwise."""

    label: str
    consumer: AIOKafkaConsumer
    engine: Engine
    stream: IO[str] = field(default_factory=lambda: sys.stderr)
    tty: bool = False
    started: float = field(default_factory=time.monotonic)
    _rate: float = 0.0
    _last: tuple[float, int] = (0.0, 0)
    _width: int = 0

    async def lag(self) -> int | None:
        total, known = 0, False
        for tp in self.consumer.assignment():
            high = self.consumer.highwater(tp)
            if high is None:
                continue
            try:
                position = await asyncio.wait_for(self.consumer.position(tp), 0.2)
            except Exception:  # not positioned yet, or reassigned meanwhile
                continue
            total += max(0, high - position)
            known = True
        return total if known else None

    async def line(self) -> str:
        now = time.monotonic()
        done = self.engine.events_done
        last_at, last_done = self._last
        if last_at and now > last_at:
            instant = (done - last_done) / (now - last_at)
            self._rate = instant if not self._rate else 0.7 * self._rate + 0.3 * instant
        self._last = (now, done)
        lag = await self.lag()
        parts = [f"{self.label}: {done:,} events", f"{lag:,} left" if lag is not None else "lag ?"]
        if self._rate > 0:
            parts.append(f"{self._rate:,.0f}/s")
            if lag:
                parts.append(f"about {format_duration(lag / self._rate)} to go")
        parts.append(f"{format_duration(now - self.started)} so far")
        return ", ".join(parts)

    async def run(self, stop: asyncio.Event) -> None:
        interval = PROGRESS_TTY_INTERVAL_S if self.tty else PROGRESS_LOG_INTERVAL_S
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
            if stop.is_set():
                return
            text = await self.line()
            if self.tty:
                self._width = max(self._width, len(text))
                self.stream.write("\r" + text.ljust(self._width))
                self.stream.flush()
            else:
                log.info("replay progress: %s", text)

    def finish(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r" + text.ljust(self._width) + "\n")
            self.stream.flush()
        else:
            log.info("%s", text)


# --- removed history -------------------------------------------------------------------------
def history_gaps(
    beginnings: dict[TopicPartition, int],
    first_timestamps_ms: dict[TopicPartition, int],
    database_since: datetime | None,
) -> list[TopicPartition]:
    """The partitions whose removed records the database cannot have counted.

    A partition that no longer starts at offset 0 lost records to retention. The database
    holds their counts only if it was already counting before the oldest record still there
    (its oldest ledger row, summary or preference is older than that record).
    """
    gaps = []
    for tp, beginning in sorted(beginnings.items()):
        if beginning <= 0:
            continue
        first_ms = first_timestamps_ms.get(tp)
        if (
            database_since is None
            or first_ms is None
            or database_since >= datetime.fromtimestamp(first_ms / 1000, UTC)
        ):
            gaps.append(tp)
    return gaps


async def input_partitions(settings: Settings) -> dict[str, list[int]]:
    """The partitions of each input topic (an absent topic has none)."""
    consumer = make_consumer(settings, group_id=None)
    await consumer.start()
    try:
        await consumer.topics()
        return {
            topic: sorted(consumer.partitions_for_topic(topic) or ())
            for topic in (settings.preferences_topic, settings.activity_topic)
        }
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(consumer.stop(), 5)


async def warn_about_removed_history(
    settings: Settings, pool: asyncpg.Pool, partitions: dict[str, list[int]]
) -> list[TopicPartition]:
    tps = [TopicPartition(topic, p) for topic, numbers in partitions.items() for p in numbers]
    if not tps:
        return []
    consumer = make_consumer(settings, group_id=None)
    await consumer.start()
    try:
        beginnings: dict[TopicPartition, int] = await consumer.beginning_offsets(tps)
        truncated = [tp for tp in tps if beginnings.get(tp, 0) > 0]
        if not truncated:
            return []
        consumer.assign(truncated)
        for tp in truncated:
            consumer.seek(tp, beginnings[tp])
        first: dict[TopicPartition, int] = {}
        deadline = time.monotonic() + HISTORY_CHECK_TIMEOUT_S
        while len(first) < len(truncated) and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200, max_records=100)
            for tp, records in batch.items():
                if records and tp not in first:
                    first[tp] = records[0].timestamp
                    consumer.pause(tp)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(consumer.stop(), 5)
    since = await pool.fetchval(_DATABASE_SINCE)
    gaps = history_gaps(beginnings, first, since)
    for tp in gaps:
        log.warning(
            "%s[%d] no longer starts at offset 0 (it starts at %d): retention removed records"
            " this database has no counts for; the replay cannot restore them",
            tp.topic, tp.partition, beginnings[tp],
        )
    return gaps


# --- the command -----------------------------------------------------------------------------
@dataclass(slots=True)
class ReplayReport:
    events: dict[str, int] = field(default_factory=dict)
    caught_up: bool = False
    seconds: float = 0.0


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
    metrics = Metrics()
    faults = FaultInjector(None)
    report = ReplayReport()
    async with command_pool(settings) as pool:
        await restore_thresholds(settings, pool, strict=True)  # before any session is evaluated
        partitions = await input_partitions(settings)
        await warn_about_removed_history(settings, pool, partitions)
        options = batch_options(settings, suppress_before_ms=started_ms if no_notify else None)
        dead_letters = _SkipDeadLetters()
        # One member for both phases: re-subscribing is a quick rebalance of the same member,
        # where a second consumer would wait for the first one's session to expire.
        consumer = make_consumer(settings, group_id=replay_group(settings))
        await start_client(consumer, settings)
        tune_garbage_collector(settings.batch_max_records)
        try:
            async with publisher_running(settings, metrics, faults, stop) as publisher:
                writer = _RecordingWriter(
                    pool,
                    options,
                    metrics,
                    counted_types=settings.counted_activity_types,
                    conflict_retries=settings.transaction_retries,
                    backoff_max_s=settings.retry_backoff_max_s,
                    lanes=settings.batch_lanes,
                )
                phases: tuple[tuple[str, tuple[type[Event], ...]], ...] = (
                    (settings.preferences_topic, PREFERENCE_EVENTS),
                    (settings.activity_topic, ACTIVITY_EVENTS),
                )
                report.caught_up = True
                for topic, kinds in phases:
                    if not partitions.get(topic):
                        log.warning("topic %s does not exist; nothing to replay there", topic)
                        continue
                    events = await _replay_topic(
                        settings, consumer, topic, kinds, writer, metrics, faults, dead_letters,
                        start, stop, publisher,
                    )
                    if events is None:
                        report.caught_up = False
                        break
                    report.events[topic] = events
                left = 0
                if report.caught_up:
                    left = await wait_until_sent(pool, writer.pending_ids, publisher)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(consumer.stop(), 10)
    report.seconds = time.monotonic() - started
    total = sum(report.events.values())
    if not report.caught_up:
        print(f"replay stopped before it caught up, after {total:,} event(s); run `milestones"
              " replay` again to continue from there", file=sys.stderr)
        return 1
    per_topic = ", ".join(f"{count:,} from {topic}" for topic, count in report.events.items())
    print(
        f"replay caught up in {report.seconds:.1f} s: {total:,} event(s) read"
        + (f" ({per_topic})" if per_topic else "")
        + f"; {writer.new_sessions:,} new session(s), {writer.removed_sessions:,} removed;"
        f" milestones recorded: {len(writer.pending_ids):,} to send"
        f" ({len(writer.pending_ids) - left:,} sent), {writer.suppressed:,} suppressed"
        + (f"; {dead_letters.skipped:,} rejected message(s) skipped (dead-lettered by the"
           " service when it first read them)" if dead_letters.skipped else "")
    )
    return 0


async def _replay_topic(
    settings: Settings,
    consumer: AIOKafkaConsumer,
    topic: str,
    kinds: tuple[type[Event], ...],
    writer: BatchWriter,
    metrics: Metrics,
    faults: FaultInjector,
    dead_letters: _SkipDeadLetters,
    start: StartingPoint,
    stop: asyncio.Event,
    publisher: Publisher,
) -> int | None:
    """Consume ``topic`` until caught up; the number of events read, or None if stopped."""
    engine = Engine(
        consumer,
        dead_letters,
        writer,
        metrics,
        faults,
        accepts={topic: kinds},
        dlq_topic=settings.dlq_topic,
        poll_timeout_ms=settings.poll_timeout_ms,
        max_records=settings.batch_max_records,
        revoke_deadline_s=min(settings.shutdown_timeout_s, settings.kafka_session_timeout_ms / 2000),
        after_commit=lambda pending: publisher.wake() if pending else None,
    )
    # A new subscription has no assignment until the rebalance gives it one, so the engine
    # cannot take the previous topic's partitions for "caught up".
    consumer.subscribe([topic], listener=_StartAt(engine.listener, consumer, start))
    progress = Progress(f"replay {topic}", consumer, engine, tty=sys.stderr.isatty())
    progress_stop = asyncio.Event()
    progress_task = asyncio.ensure_future(progress.run(progress_stop))
    try:
        await engine.run(stop, shutdown_timeout_s=settings.shutdown_timeout_s, until_caught_up=True)
    finally:
        progress_stop.set()
        await progress_task
    if stop.is_set():
        return None
    progress.finish(
        f"replay {topic}: caught up, {engine.events_done:,} events in"
        f" {format_duration(time.monotonic() - progress.started)}"
    )
    return engine.events_done
