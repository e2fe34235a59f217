"""``milestones status``: counts, the outbox, and the engine's consumer lag.

Read-only. The lag is what the Kafka consumer group has committed against the high watermark a
fetch reports (not ListOffsets "latest", which some brokers answer wrongly); the fetch uses the
engine's group id without joining the group, so it never triggers a rebalance of ``run``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from consumer.commands.common import command_pool, current_year, table
from consumer.settings import Settings
from consumer.store import status_sql
from consumer.stream.kafka import make_consumer

log = logging.getLogger(__name__)

LAG_FETCH_TIMEOUT_S = 5.0
PENDING_SHOWN = 5


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


async def consumer_lag(settings: Settings, group_id: str) -> list[PartitionLag]:
    """Committed offset and fetch high watermark of every input partition for ``group_id``."""
    consumer = make_consumer(settings, group_id=group_id)
    await consumer.start()
    try:
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
        deadline = time.monotonic() + LAG_FETCH_TIMEOUT_S
        while time.monotonic() < deadline and any(consumer.highwater(tp) is None for tp in tps):
            await consumer.getmany(timeout_ms=200, max_records=1)
        return [
            PartitionLag(tp.topic, tp.partition, committed[tp], consumer.highwater(tp))
            for tp in tps
        ]
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(consumer.stop(), 5)


async def status_command(settings: Settings) -> int:
    year = current_year(settings)
    async with command_pool(
        settings, max_size=1, migrate=False, statement_timeouts=False
    ) as pool:
        counts = await pool.fetchrow(status_sql.COUNTS, year)
        notifications = await pool.fetch(status_sql.NOTIFICATIONS, year)
        pending = await pool.fetch(status_sql.OLDEST_PENDING, PENDING_SHOWN)
    assert counts is not None
    closed = counts["closed_through_year"]
    print(f"year {year} ({settings.timezone})")
    print(table(
        [
            ("mentors with sessions", counts["mentors"]),
            ("sessions", counts["sessions"]),
            ("ledger rows (all years)", counts["ledger_rows"]),
            ("closed through year", closed if closed is not None else "none"),
        ],
        ("count", "value"),
    ))
    print()
    by_status = {row["status"]: row for row in notifications}
    print(table(
        [
            (status, by_status[status]["this_year"] if status in by_status else 0,
             by_status[status]["total"] if status in by_status else 0)
            for status in ("pending", "published", "suppressed")
        ],
        ("notifications", f"{year}", "all years"),
    ))
    if pending:
        print()
        print(table(
            [
                (str(row["id"]), str(row["user_id"]), str(row["year"]), row["milestone_value"],
                 f"{row['age'].total_seconds():.0f} s")
                for row in pending
            ],
            ("oldest pending", "mentor", "year", "milestone", "waiting"),
        ))
    print()
    if not settings.kafka_bootstrap_servers:
        print("consumer lag: MILESTONES_KAFKA_BOOTSTRAP_SERVERS is not set")
        return 0
    try:
        lags = await asyncio.wait_for(consumer_lag(settings, settings.group_id), 30)
    except (KafkaError, TimeoutError) as error:
        print(f"consumer lag: broker unreachable ({type(error).__name__})")
        return 0
    rows = [
        (f"{item.topic}[{item.partition}]",
         item.committed if item.committed is not None else "none",
         item.high_watermark if item.high_watermark is not None else "?",
         item.lag if item.lag is not None else "?")
        for item in lags
    ]
    total = sum(item.lag or 0 for item in lags)
    print(table(rows, (f"group {settings.group_id}", "committed", "high watermark", "lag")))
    print(f"total lag {total:,}")
    return 0
