"""Two engine instances writing the same activities at once, in opposite orders.

The database decides: every activity counts once, every milestone is recorded once, and the
lock order (rows sorted by key in every statement) keeps the transactions from deadlocking
forever (a deadlock would be retried and counted; here none should even happen).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from uuid import UUID, uuid4
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from consumer.domain.batch import Envelope
from consumer.ops.metrics import Metrics
from consumer.store.migrate import migrate
from consumer.store.postgres import BatchOptions, PostgresBatchStore
from consumer.stream.writer import BatchWriter
from schemas.events import ActivityLogged

OPTIONS = BatchOptions(tz=ZoneInfo("Europe/Oslo"), default_thresholds=(50, 100), grace_days=31)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=2, max_size=4)
    async with pool.acquire() as connection:
        await migrate(connection)
    yield pool
    await pool.close()


def envelope(activity: UUID, mentor: UUID, position: int) -> Envelope:
    event = ActivityLogged(
        event_type="activity.logged", schema_version=1, event_id=uuid4(), activity_id=activity,
        mentor_id=mentor, organization_id=mentor, occurred_at=datetime(2026, 5, 1, tzinfo=UTC),
        activity_type="session",
    )
    return Envelope(event, position, "t", 0, position, 1_795_000_000_000)


async def test_two_writers_with_the_same_activities_in_opposite_orders_count_each_once(
    pool: asyncpg.Pool,
) -> None:
    mentors = [uuid4() for _ in range(20)]
    activities = [(uuid4(), mentors[index % 20]) for index in range(2_000)]
    metrics = [Metrics(), Metrics()]
    writers = [
        BatchWriter(PostgresBatchStore(pool), OPTIONS, metrics[index], counted_types=None)
        for index in range(2)
    ]

    async def feed(writer: BatchWriter, items: list[tuple[UUID, UUID]]) -> None:
        for start in range(0, len(items), 250):
            chunk = items[start:start + 250]
            await writer.write([envelope(a, m, i) for i, (a, m) in enumerate(chunk)])

    forward = list(activities)
    # The same chunks at the same time, each in another order: the worst case for lock order.
    backward: list[tuple[UUID, UUID]] = []
    for start in range(0, len(activities), 250):
        chunk = activities[start:start + 250]
        random.Random(start).shuffle(chunk)
        backward.extend(chunk)
    await asyncio.gather(feed(writers[0], forward), feed(writers[1], backward))
    async with pool.acquire() as connection:
        counts = await connection.fetch("SELECT user_id, session_count FROM annual_summary")
        records = await connection.fetchval("SELECT count(*) FROM scenario_notifications")
    assert sorted(row["session_count"] for row in counts) == [100] * 20
    assert records == 40  # 50 and 100 for each mentor, once
    retries = sum(m.value("milestones_batch_retries_total", cause="conflict") for m in metrics)
    assert retries == 0, retries
