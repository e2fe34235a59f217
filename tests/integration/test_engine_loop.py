"""The engine's consume loop in this process, over the real broker and the in-memory store.

No database: the store port's in-memory adapter (tests/support/memory_store.py) stands in for
Postgres, so the loop's own work (fetch, order preferences first, decode, dead-letter, write,
commit offsets, wake the publisher) is tested in a couple of seconds. What Postgres adds is
the store contract suite's (tests/integration/test_store_contract.py) and the e2e tests'.
"""

from __future__ import annotations

import asyncio
import secrets
from uuid import UUID

from consumer.faults import FaultInjector
from consumer.ops.metrics import Metrics
from consumer.runtime import batch_options
from consumer.settings import Settings
from consumer.stream.decode import ACTIVITY_EVENTS, PREFERENCE_EVENTS
from consumer.stream.engine import Engine
from consumer.stream.kafka import make_consumer, make_producer
from consumer.stream.writer import BatchWriter
from tests.support import events
from tests.support.kafka import KafkaHelper
from tests.support.memory_store import MemoryStore
from tests.support.topics import Topics


async def test_the_loop_counts_dead_letters_and_commits_over_the_in_memory_store(
    broker: str, topics: Topics, kafka: KafkaHelper
) -> None:
    mentor = events.new_id()
    sessions = [events.logged(mentor) for _ in range(3)]
    await kafka.produce_json_many(topics.activity, [
        *sessions, sessions[0],  # a redelivery counts once
        events.deleted(mentor, sessions[2]["activity_id"]),
    ])
    poison = await kafka.produce(topics.activity, b"{not json", key=mentor.encode())

    settings = Settings(
        kafka_bootstrap_servers=broker, group_id=f"loop-{secrets.token_hex(4)}",
        kafka_session_timeout_ms=2000, thresholds="2,3", **{
            key.removeprefix("MILESTONES_").lower(): value for key, value in topics.env().items()
        },
    )
    metrics = Metrics()
    store = MemoryStore()
    woken: list[int] = []
    consumer = make_consumer(settings, group_id=settings.group_id)
    producer = make_producer(settings)
    await consumer.start()
    await producer.start()
    try:
        engine = Engine(
            consumer, producer,
            BatchWriter(store, batch_options(settings), metrics, counted_types=None),
            metrics, FaultInjector(None),
            accepts={topics.activity: ACTIVITY_EVENTS, topics.preferences: PREFERENCE_EVENTS},
            dlq_topic=topics.dlq, poll_timeout_ms=200, max_records=500, revoke_deadline_s=1.0,
            after_commit=woken.append,
        )
        consumer.subscribe([topics.activity, topics.preferences], listener=engine.listener)
        await asyncio.wait_for(
            engine.run(asyncio.Event(), shutdown_timeout_s=5.0, until_caught_up=True), 30
        )
        committed = {
            tp: await consumer.committed(tp) for tp in consumer.assignment()
        }
        high = {tp: consumer.highwater(tp) for tp in consumer.assignment()}
    finally:
        await consumer.stop()
        await producer.stop()

    mentor_id = UUID(mentor)
    assert {key: s.count for key, s in store.tables.summaries.items()} == {(mentor_id, 2026): 2}
    assert {
        (r.milestone_value, r.status, str(r.activity_id)) for r in store.tables.records.values()
    } == {
        (2, "pending", sessions[1]["activity_id"]),
        (3, "pending", sessions[2]["activity_id"]),  # reached, then deleted: recorded still
    }
    # Step 1: the poison message is on the dead-letter topic, byte for byte, with its position.
    [letter] = await kafka.read_all(topics.dlq)
    assert letter.value == b"{not json"
    assert letter.header("source_offset") == str(poison.offset)
    # Step 3: every partition committed up to its end; step 4: the publisher was woken.
    assert {tp: offset for tp, offset in committed.items() if high[tp]} == {
        tp: end for tp, end in high.items() if end
    }
    assert any(high.values())
    assert sum(woken) == 2  # the two pending records
