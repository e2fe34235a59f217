"""The batch writer isolates a record whose handling raises, against the real Postgres.

An exception in the transaction's own work (the evaluator, a conversion) that is not the
database being away halves the batch like a refused value until the record is alone; it is
dead-lettered as ``unprocessable`` and the rest of the batch is committed.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from consumer.domain.batch import Envelope
from consumer.ops.metrics import Metrics
from consumer.store import postgres as postgres_module
from consumer.store.migrate import migrate
from consumer.store.postgres import BatchOptions
from consumer.stream.writer import BatchWriter
from tests.integration.operations import EVENT_ADAPTER, summary
from tests.support import events

OPTIONS = BatchOptions(tz=ZoneInfo("Europe/Oslo"), default_thresholds=(2,), grace_days=31)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    async with pool.acquire() as connection:
        await migrate(connection)
    try:
        yield pool
    finally:
        await pool.close()


def envelopes(messages: list[dict[str, Any]]) -> list[Envelope]:
    stamp = int(time.time() * 1000)
    return [
        Envelope(EVENT_ADAPTER.validate_json(json.dumps(message)), position, "t", 0, position, stamp)
        for position, message in enumerate(messages)
    ]


async def test_a_record_whose_evaluation_raises_is_isolated_and_the_rest_committed(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    mentors = [events.new_id() for _ in range(5)]
    poison_mentor = mentors[2]
    original = postgres_module.decide

    def decide(**kwargs: Any) -> Any:
        if str(kwargs["mentor_id"]) == poison_mentor:
            raise ArithmeticError("injected in the evaluator")
        return original(**kwargs)

    monkeypatch.setattr(postgres_module, "decide", decide)
    messages = [events.logged(mentor) for mentor in mentors for _ in range(2)]
    writer = BatchWriter(pool, OPTIONS, Metrics(), counted_types=None)
    outcome = await writer.write(envelopes(messages))

    assert [(e.position, kind) for e, _, kind in outcome.refused] == [
        (4, "unprocessable"), (5, "unprocessable")
    ]
    assert all(
        reason == "unprocessable: ArithmeticError: injected in the evaluator"
        for _, reason, _ in outcome.refused
    )
    async with pool.acquire() as connection:
        counts = await summary(connection)
        recorded = await connection.fetchval("SELECT count(*) FROM scenario_notifications")
    assert counts == {(mentor, 2026): 2 for mentor in mentors if mentor != poison_mentor}
    assert recorded == 4


async def test_an_unclassified_database_error_stops_instead_of_dead_lettering(
    pool: asyncpg.Pool,
) -> None:
    # A missing table concerns every record: dead-lettering them all would empty the stream.
    async with pool.acquire() as connection:
        await connection.execute("DROP TABLE scenario_notifications")
    writer = BatchWriter(pool, OPTIONS, Metrics(), counted_types=None)
    mentor = events.new_id()
    with pytest.raises(asyncpg.UndefinedTableError):
        await writer.write(envelopes([events.logged(mentor), events.logged(mentor)]))
