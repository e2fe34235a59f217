"""The batch writer isolates a record whose handling raises, against the real Postgres.

An exception in the transaction's own work (the evaluator, a conversion) that is not the
database being away halves the batch like a refused value until the record is alone; it is
dead-lettered as ``unprocessable`` and the rest of the batch is committed.
"""

from __future__ import annotations

from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from consumer.ops.metrics import Metrics
from consumer.store import postgres as postgres_module
from consumer.store.migrate import migrate
from consumer.store.postgres import BatchOptions, PostgresBatchStore
from consumer.stream.writer import BatchWriter
from tests.integration.operations import envelopes_of, summary
from tests.support import events

OPTIONS = BatchOptions(tz=ZoneInfo("Europe/Oslo"), default_thresholds=(2,), grace_days=31)


async def test_a_record_whose_evaluation_raises_is_isolated_and_the_rest_committed(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with pool.acquire() as connection:
        await migrate(connection)
    mentors = [events.new_id() for _ in range(5)]
    poison_mentor = mentors[2]
    original = postgres_module.decide

    def decide(**kwargs: Any) -> Any:
        if str(kwargs["mentor_id"]) == poison_mentor:
            raise ArithmeticError("injected in the evaluator")
        return original(**kwargs)

    monkeypatch.setattr(postgres_module, "decide", decide)
    messages = [events.logged(mentor) for mentor in mentors for _ in range(2)]
    writer = BatchWriter(PostgresBatchStore(pool), OPTIONS, Metrics(), counted_types=None)
    outcome = await writer.write(envelopes_of(messages))

    # The evaluator runs only for mentor-years where a record may be due: the poison mentor's
    # first session (count 1, threshold 2) is counted, its second is the one isolated.
    assert [(e.position, kind) for e, _, kind in outcome.refused] == [(5, "unprocessable")]
    assert all(
        reason == "unprocessable: ArithmeticError: injected in the evaluator"
        for _, reason, _ in outcome.refused
    )
    async with pool.acquire() as connection:
        counts = await summary(connection)
        recorded = await connection.fetchval("SELECT count(*) FROM scenario_notifications")
    assert counts == {(mentor, 2026): 2 if mentor != poison_mentor else 1 for mentor in mentors}
    assert recorded == 4


async def test_an_unclassified_database_error_stops_instead_of_dead_lettering(
    pool: asyncpg.Pool,
) -> None:
    # A missing table concerns every record: dead-lettering them all would empty the stream.
    async with pool.acquire() as connection:
        await migrate(connection)
        await connection.execute("DROP TABLE scenario_notifications")
    writer = BatchWriter(PostgresBatchStore(pool), OPTIONS, Metrics(), counted_types=None)
    mentor = events.new_id()
    with pytest.raises(asyncpg.UndefinedTableError):
        await writer.write(envelopes_of([events.logged(mentor), events.logged(mentor)]))
