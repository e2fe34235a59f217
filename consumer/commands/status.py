"""``milestones status``: counts, the outbox, the consumer lag and today's dead letters; its exit
status says whether a limit the operator set is crossed, so it can drive a health check.

Read-only. The lag is what the Kafka consumer group has committed against the high watermark a
fetch reports (not ListOffsets "latest", which some brokers answer wrongly); the fetch uses the
engine's group id without joining the group, so it never triggers a rebalance of ``run``.
Everything that waits on the broker shares one bound, ``MILESTONES_STATUS_TIMEOUT_S``: a broker
that refuses or never answers is reported as unreachable, not waited for.

Exit statuses: 0 every limit respected, 1 a limit crossed (``EXIT_LIMIT``), 2 a bad setting, a
database unreachable or without the schema (raised as :class:`SettingsError`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import KafkaTimeoutError

from consumer.commands.common import current_year, table, write_out
from consumer.runtime import command_pool
from consumer.settings import ENV_PREFIX, Settings
from consumer.store import status_sql
from consumer.stream.kafka import broker_trouble, make_consumer, verify_kafka_access
from consumer.stream.topic_reader import TopicMissing, topic_records

log = logging.getLogger(__name__)

PENDING_SHOWN = 5
EXIT_OK = 0
EXIT_LIMIT = 1


@dataclass(frozen=True, slots=True)
class PartitionLag:
    topic: str
    partition: int
    committed: int | None
    high_watermark: int | None

    @property
    def lag(self) -> int | None:
        if self.high_watermark is None:
            return None
        return max(0, self.high_watermark - (self.committed or 0))


@dataclass(frozen=True, slots=True)
class Limits:
    """What the operator set (``None``: not checked)."""

    max_lag: int | None = None
    max_pending_age_s: float | None = None
    max_dead_letters_today: int | None = None
    broker_required: bool = True

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(settings.status_max_lag, settings.status_max_pending_age_s,
                   settings.status_max_dead_letters_today, settings.status_broker_required)


@dataclass(slots=True)
class BrokerView:
    """What the broker told within the bound; ``error`` says why it told nothing."""

    configured: bool = True
    error: str | None = None
    partitions: list[PartitionLag] = field(default_factory=list)
    dead_letters_today: int | None = None
    dead_letters_complete: bool = True

    @property
    def total_lag(self) -> int | None:
        if self.error is not None or any(item.lag is None for item in self.partitions):
            return None
        return sum(item.lag or 0 for item in self.partitions)


@dataclass(slots=True)
class StatusReport:
    year: int
    timezone: str
    counts: dict[str, int | None]
    notifications: dict[str, dict[str, int]]
    oldest_pending: list[dict[str, Any]]
    broker: BrokerView

    @property
    def oldest_pending_age_s(self) -> float | None:
        return self.oldest_pending[0]["age_s"] if self.oldest_pending else None


def crossed_limits(report: StatusReport, limits: Limits) -> list[str]:
    """One line per limit crossed; empty when all is well (pure, so it is tested alone)."""
    crossed = []
    broker = report.broker
    if limits.broker_required and not broker.configured:
        crossed.append(f"broker: {ENV_PREFIX}KAFKA_BOOTSTRAP_SERVERS is not set")
    elif limits.broker_required and broker.error is not None:
        crossed.append(f"broker unreachable: {broker.error}")
    if limits.max_lag is not None and broker.configured and broker.error is None:
        total = broker.total_lag
        if total is None:
            crossed.append("lag unknown: a partition's high watermark was not read in time")
        elif total > limits.max_lag:
            crossed.append(f"lag {total} > {limits.max_lag} (max lag)")
    age = report.oldest_pending_age_s
    if limits.max_pending_age_s is not None and age is not None and age > limits.max_pending_age_s:
        crossed.append(f"oldest pending notification waits {age:.0f} s >"
                       f" {limits.max_pending_age_s:g} s (max pending age)")
    today = broker.dead_letters_today
    if limits.max_dead_letters_today is not None and today is not None \
            and today > limits.max_dead_letters_today:
        crossed.append(f"dead letters today {today} > {limits.max_dead_letters_today}"
                       " (max dead letters today)")
    return crossed


async def consumer_lag(
    settings: Settings, group_id: str, *, timeout_s: float | None = None
) -> list[PartitionLag]:
    """Committed offset and fetch high watermark of every input partition for ``group_id``.

    Waits at most ``timeout_s`` (default ``MILESTONES_STATUS_TIMEOUT_S``) for the high
    watermarks; one not read by then is ``None``.
    """
    deadline = time.monotonic() + (timeout_s or settings.status_timeout_s)
    consumer = make_consumer(settings, group_id=group_id)
    try:
        await verify_kafka_access(settings)  # refused credentials: exit 2, not "unreachable"
        await consumer.start()
        tps: list[TopicPartition] = []
        for topic in (settings.preferences_topic, settings.activity_topic):
            partitions = consumer.partitions_for_topic(topic)
            if partitions is None:
                await consumer.topics()  # refresh the metadata once
                partitions = consumer.partitions_for_topic(topic)
            tps.extend(TopicPartition(topic, p) for p in sorted(partitions or ()))
        if not tps:
            return []
        consumer.assign(tps)
        committed = {tp: await consumer.committed(tp) for tp in tps}
        for tp in tps:
            if committed[tp] is not None:
                consumer.seek(tp, committed[tp])
            else:
                await consumer.seek_to_beginning(tp)
        # One fetch per partition is enough for the high watermark; records are ignored.
        while time.monotonic() < deadline and any(consumer.highwater(tp) is None for tp in tps):
            await consumer.getmany(timeout_ms=200, max_records=1)
        return [
            PartitionLag(tp.topic, tp.partition, committed[tp], consumer.highwater(tp))
            for tp in tps
        ]
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(consumer.stop(), 5)


def start_of_today_ms(settings: Settings) -> int:
    now = datetime.now(UTC).astimezone(settings.tz)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    return int(midnight.timestamp() * 1000)


async def count_dead_letters(
    settings: Settings, *, since_ms: int, timeout_s: float
) -> tuple[int, bool]:
    """How many records the dead-letter topic holds since ``since_ms``, and whether the count
    is complete (False: the time bound stopped it; there are more)."""
    count = 0
    try:
        async with topic_records(settings, settings.dlq_topic, since_ms=since_ms,
                                 timeout_s=timeout_s, start_timeout_s=timeout_s) as records:
            async for _ in records:
                count += 1
    except TopicMissing:  # nothing was ever rejected
        return 0, True
    except KafkaTimeoutError:  # the broker answers, but there is more than the bound allows
        return count, False
    return count, True


async def read_broker(settings: Settings) -> BrokerView:
    """The lag and today's dead letters, both within ``MILESTONES_STATUS_TIMEOUT_S``."""
    if not settings.kafka_bootstrap_servers:
        return BrokerView(configured=False)
    timeout_s = settings.status_timeout_s
    # The lag's fetches stop a little early so that its answer beats the outer bound.
    lag = asyncio.ensure_future(consumer_lag(settings, settings.group_id, timeout_s=timeout_s * 0.8))
    letters = asyncio.ensure_future(count_dead_letters(
        settings, since_ms=start_of_today_ms(settings), timeout_s=timeout_s * 0.8
    ))
    view = BrokerView()
    # aiokafka logs every refused connection as an ERROR; the report says it once.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        async with asyncio.timeout(timeout_s):
            view.partitions = await lag
            view.dead_letters_today, view.dead_letters_complete = await letters
    except Exception as error:
        if not broker_trouble(error):
            raise
        view.error = (f"no answer within {timeout_s:g} s" if isinstance(error, TimeoutError)
                      else str(error) or type(error).__name__)
    finally:
        for task in (lag, letters):
            task.cancel()
        await asyncio.gather(lag, letters, return_exceptions=True)
    return view


async def read_database(settings: Settings, year: int) -> tuple[Any, list[Any], list[Any]]:
    bounded = settings.model_copy(update={
        "database_connect_timeout_s": min(settings.database_connect_timeout_s,
                                          settings.status_timeout_s),
    })
    async with command_pool(
        bounded, max_size=1, migrate=False, statement_timeouts=False
    ) as pool:
        counts = await pool.fetchrow(status_sql.COUNTS, year)
        notifications = await pool.fetch(status_sql.NOTIFICATIONS, year)
        oldest = await pool.fetch(status_sql.OLDEST_PENDING, PENDING_SHOWN)
    return counts, notifications, oldest


async def gather_status(settings: Settings) -> StatusReport:
    year = current_year(settings)
    # The database first: without it (or its schema) there is no status to give.
    counts, notifications, oldest = await read_database(settings, year)
    broker = await read_broker(settings)
    assert counts is not None
    by_status = {row["status"]: row for row in notifications}
    return StatusReport(
        year=year,
        timezone=settings.timezone,
        counts={name: counts[name] for name in
                ("mentors", "sessions", "ledger_rows", "closed_through_year")},
        notifications={
            status: {"this_year": by_status[status]["this_year"] if status in by_status else 0,
                     "total": by_status[status]["total"] if status in by_status else 0}
            for status in ("pending", "published", "suppressed")
        },
        oldest_pending=[
            {"id": str(row["id"]), "mentor_id": str(row["user_id"]), "year": row["year"],
             "milestone_value": row["milestone_value"], "age_s": row["age"].total_seconds()}
            for row in oldest
        ],
        broker=broker,
    )


async def status_command(
    settings: Settings, *, as_json: bool = False, limits: Limits | None = None
) -> int:
    limits = limits or Limits.from_settings(settings)
    report = await gather_status(settings)
    crossed = crossed_limits(report, limits)
    text = render_json(report, settings, limits, crossed) if as_json else render_text(
        report, settings, crossed)
    write_out(text)  # a reader that went away (`| head`): the exit status still tells the state
    return EXIT_LIMIT if crossed else EXIT_OK


def render_json(
    report: StatusReport, settings: Settings, limits: Limits, crossed: list[str]
) -> str:
    broker = report.broker
    document = {
        "year": report.year,
        "timezone": report.timezone,
        "counts": report.counts,
        "notifications": report.notifications,
        "oldest_pending": report.oldest_pending,
        "oldest_pending_age_s": report.oldest_pending_age_s,
        "consumer_lag": {
            "group": settings.group_id,
            "reachable": broker.configured and broker.error is None,
            "error": broker.error if broker.configured else
            f"{ENV_PREFIX}KAFKA_BOOTSTRAP_SERVERS is not set",
            "partitions": [
                {"topic": item.topic, "partition": item.partition, "committed": item.committed,
                 "high_watermark": item.high_watermark, "lag": item.lag}
                for item in broker.partitions
            ],
            "total": broker.total_lag,
        },
        "dead_letters_today": {
            "topic": settings.dlq_topic,
            "count": broker.dead_letters_today,
            "complete": broker.dead_letters_complete,
        },
        "limits": asdict(limits),
        "crossed": crossed,
        "ok": not crossed,
    }
    return json.dumps(document, indent=2) + "\n"


def render_text(report: StatusReport, settings: Settings, crossed: list[str]) -> str:
    counts, broker = report.counts, report.broker
    closed = counts["closed_through_year"]
    parts = [f"year {report.year} ({report.timezone})", table(
        [
            ("mentors with sessions", counts["mentors"]),
            ("sessions", counts["sessions"]),
            ("ledger rows (all years)", counts["ledger_rows"]),
            # A year, not a quantity: no thousands separator.
            ("closed through year", str(closed) if closed is not None else "none"),
            ("dead letters today", broker.dead_letters_today
             if broker.dead_letters_today is not None else "?"),
        ],
        ("count", "value"),
    ), ""]
    parts.append(table(
        [(status, row["this_year"], row["total"]) for status, row in report.notifications.items()],
        ("notifications", f"{report.year}", "all years"),
    ))
    if report.oldest_pending:
        parts += ["", table(
            [(row["id"], row["mentor_id"], str(row["year"]), row["milestone_value"],
              f"{row['age_s']:.0f} s") for row in report.oldest_pending],
            ("oldest pending", "mentor", "year", "milestone", "waiting"),
        )]
    parts.append("")
    if not broker.configured:
        parts.append(f"consumer lag: {ENV_PREFIX}KAFKA_BOOTSTRAP_SERVERS is not set")
    elif broker.error is not None:
        parts.append(f"consumer lag: broker unreachable, {broker.error}")
    else:
        rows = [
            (f"{item.topic}[{item.partition}]",
             item.committed if item.committed is not None else "none",
             item.high_watermark if item.high_watermark is not None else "?",
             item.lag if item.lag is not None else "?")
            for item in broker.partitions
        ]
        parts.append(table(rows, (f"group {settings.group_id}", "committed", "high watermark",
                                  "lag")))
        total = broker.total_lag
        parts.append(f"total lag {total:,}" if total is not None else "total lag unknown")
        if not broker.dead_letters_complete:
            parts.append("dead letters today: more than counted (the count stopped at the"
                         f" {settings.status_timeout_s:g} s bound)")
    parts.append("")
    parts += [f"limit crossed: {line}" for line in crossed] or ["limits: ok"]
    return "\n".join(parts) + "\n"
