"""Helpers shared by the operator-command tests (replay, sweep, reconcile, prune, status).

The commands are awaited in this process where that is enough (their entry points take a
Settings object), and ``run`` is started as a real process when the test is about running
beside it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar
from uuid import UUID

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from asyncpg.transaction import Transaction
from pydantic import TypeAdapter

from consumer.domain.batch import Envelope, Event
from consumer.ops.metrics import Metrics
from consumer.runtime import batch_options
from consumer.settings import Settings
from consumer.store.migrate import migrate
from consumer.store.postgres import PostgresBatchStore
from consumer.stream.writer import BatchWriter
from schemas.events import InputEvent

T = TypeVar("T")
EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(InputEvent)


def settings_from(env: Mapping[str, str], **overrides: Any) -> Settings:
    """The Settings a ``milestones`` process would build from ``env`` (the engine_env fixture)."""
    values: dict[str, Any] = {
        key.removeprefix("MILESTONES_").lower(): value
        for key, value in env.items()
        if key.startswith("MILESTONES_")
    }
    values.update(overrides)
    return Settings(**values)


async def connect(database_url: str) -> asyncpg.Connection:
    connection = await asyncpg.connect(database_url)
    await migrate(connection)
    return connection


async def write_events(
    settings: Settings, events: Sequence[Mapping[str, Any]], *, timestamp_ms: int | None = None,
    suppress_before_ms: int | None = None,
) -> None:
    """Write events through the engine's own BatchWriter (no broker), one batch."""
    pool = await asyncpg.create_pool(settings.require_database(), min_size=1, max_size=2)
    try:
        async with pool.acquire() as connection:
            await migrate(connection)
        writer = BatchWriter(
            PostgresBatchStore(pool), batch_options(settings, suppress_before_ms=suppress_before_ms),
            Metrics(),
            counted_types=settings.counted_activity_types,
        )
        outcome = await writer.write(envelopes_of(events, timestamp_ms=timestamp_ms))
        assert not outcome.refused
    finally:
        await pool.close()


def envelopes_of(
    events: Sequence[Mapping[str, Any]], *, timestamp_ms: int | None = None
) -> list[Envelope]:
    """The events as one batch of decoded envelopes (topic ``t``, partition 0)."""
    stamp = timestamp_ms if timestamp_ms is not None else int(time.time() * 1000)
    return [
        Envelope(EVENT_ADAPTER.validate_json(json.dumps(event)), position, "t", 0, position, stamp)
        for position, event in enumerate(events)
    ]


async def summary(connection: asyncpg.Connection) -> dict[tuple[str, int], int]:
    rows = await connection.fetch("SELECT user_id, year, session_count FROM annual_summary")
    return {(str(row["user_id"]), row["year"]): row["session_count"] for row in rows}


async def statuses(connection: asyncpg.Connection) -> dict[tuple[str, int, int], str]:
    rows = await connection.fetch(
        "SELECT user_id, year, milestone_value, status FROM scenario_notifications"
    )
    return {(str(r["user_id"]), r["year"], r["milestone_value"]): r["status"] for r in rows}


async def snapshot(connection: asyncpg.Connection) -> dict[str, list[dict[str, Any]]]:
    """Every row a replay could change, in a stable order."""
    tables = {
        "annual_summary": "user_id, year",
        "scenario_notifications": "id",
        "activity_ledger": "activity_id",
        "mentor_preferences": "mentor_id",
    }
    return {
        name: [dict(row) for row in await connection.fetch(f"SELECT * FROM {name} ORDER BY {key}")]
        for name, key in tables.items()
    }


async def eventually(
    probe: Callable[[], Awaitable[T]], accept: Callable[[T], bool], timeout_s: float = 30.0
) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = await probe()
        if accept(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached in {timeout_s} s; last value: {value!r}")
        await asyncio.sleep(0.1)


async def commit_at_end(broker: str, group_id: str, topics: Iterable[str]) -> None:
    """Commit ``group_id`` at the high watermark of every partition of ``topics``: as if the
    service had read everything there (e.g. before its database was lost)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=broker, group_id=group_id, enable_auto_commit=False
    )
    await consumer.start()
    try:
        await consumer.topics()
        tps = [
            TopicPartition(topic, partition)
            for topic in topics
            for partition in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        consumer.assign(tps)
        for tp in tps:
            await consumer.seek_to_beginning(tp)
        deadline = time.monotonic() + 15
        while any(consumer.highwater(tp) is None for tp in tps):
            assert time.monotonic() < deadline, "no high watermark from the broker"
            await consumer.getmany(timeout_ms=200)
        await consumer.commit({tp: consumer.highwater(tp) for tp in tps})
    finally:
        await consumer.stop()


@asynccontextmanager
async def writer_in_transaction(
    database_url: str,
) -> AsyncIterator[tuple[asyncpg.Connection, Transaction, asyncpg.Pool]]:
    """Another writer's connection inside an open transaction (commit it with the returned
    transaction), and a small pool for the code under test; both closed afterwards."""
    writer = await asyncpg.connect(database_url)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        transaction = writer.transaction()
        await transaction.start()
        yield writer, transaction, pool
    finally:
        await pool.close()
        await writer.close()


def uuid(text: str | UUID) -> UUID:
    return text if isinstance(text, UUID) else UUID(text)
