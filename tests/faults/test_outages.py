"""Outages through the proxy: Postgres and the broker cut, refused for a while, slowed down, and
the broker frozen past the session timeout. After each: exact counts, one record per
milestone, every expected notification on the topic once, and the engine never exited.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.faults.checks import (
    assert_end_state,
    committed_offsets,
    cpu_seconds,
    expected_ids,
    metric,
    outputs,
    session_time,
    sessions,
    stop_all,
    wait_for_status,
    wait_until_counted,
    wait_until_emitted,
)
from tests.faults.conftest import ProxiedBroker, ProxiedDatabase
from tests.support import events
from tests.support.engine import EngineLauncher, EngineProcess
from tests.support.kafka import KafkaHelper
from tests.support.topics import Topics

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

OUTAGE_S = 6.0
# Busy-loop guard: CPU seconds the engine may use per second of outage (it should be near 0;
# generous because two shared cores make any figure noisy).
MAX_CPU_SHARE_IN_OUTAGE = 0.5


def _mentors(count: int) -> list[str]:
    return [events.new_id() for _ in range(count)]


async def _produce(kafka: KafkaHelper, topic: str, counts: dict[str, int], occurred_at: str) -> None:
    await kafka.produce_json_many(
        topic, [event for m, n in counts.items() for event in sessions(m, n, occurred_at)]
    )


def _add(total: dict[str, int], more: dict[str, int]) -> dict[str, int]:
    return {m: total.get(m, 0) + more.get(m, 0) for m in total.keys() | more.keys()}


async def test_database_cut_refused_and_slow_pauses_then_catches_up_exactly(
    kafka: KafkaHelper,
    broker: str,
    topics: Topics,
    database_url: str,
    proxied_database: ProxiedDatabase,
    engine_process: EngineLauncher,
) -> None:
    occurred_at, year = session_time()
    mentors = _mentors(10)
    proxy = proxied_database.proxy
    engine = engine_process({**proxied_database.env(), "MILESTONES_RETRY_BACKOFF_MAX_S": "2"})
    await engine.wait_ready(timeout_s=60)
    describe = lambda: outputs([engine]) + "\n" + proxy.describe()  # noqa: E731

    before = {m: 30 for m in mentors}
    await _produce(kafka, topics.activity, before, occurred_at)
    await wait_until_counted(database_url, before, year, timeout_s=60, describe=describe)
    committed_before = await _settled_offsets(broker, engine, topics)

    # Away: every connection reset, new ones refused. Sessions that cross 50 arrive meanwhile.
    await proxy.refuse()
    proxy.cut()
    away_since = time.monotonic()
    crossing = {m: 25 for m in mentors}
    await _produce(kafka, topics.activity, crossing, occurred_at)
    await engine.wait_for_output("fetching paused", timeout_s=30)
    await wait_for_status(engine, "/readyz", 503, timeout_s=20)
    cpu_before = cpu_seconds(engine.pid)
    while time.monotonic() - away_since < OUTAGE_S:
        status, _ = await engine.get("/healthz")
        assert status == 200
        await asyncio.sleep(0.5)
    cpu_used = cpu_seconds(engine.pid) - cpu_before
    # Nothing of the batch in hand is committed while its transaction cannot be.
    assert await committed_offsets(broker, engine.env["MILESTONES_GROUP_ID"],
                                   topics.activity) == committed_before
    assert engine.running(), describe()

    await proxy.accept()
    await wait_for_status(engine, "/readyz", 200, timeout_s=30)
    total = _add(before, crossing)
    await wait_until_counted(database_url, total, year, timeout_s=60, describe=describe)

    # Slow: 50 ms each way on every chunk. Sessions that cross 100 (and a second cut).
    proxy.latency_s = 0.05
    more = {m: 50 for m in mentors}
    await _produce(kafka, topics.activity, more, occurred_at)
    await asyncio.sleep(0.5)
    proxy.cut()  # mid-transaction, most likely: the retry must not count anything twice
    total = _add(total, more)
    await wait_until_counted(database_url, total, year, timeout_s=90, describe=describe)
    await wait_until_emitted(kafka, topics, database_url, expected_ids(total, year),
                             timeout_s=60, describe=describe)
    proxy.latency_s = 0.0
    body = await engine.metrics()
    await stop_all([engine])

    await assert_end_state(kafka, topics, database_url, total, year)
    assert metric(body, "milestones_batch_retries_total") >= 1
    assert metric(body, "milestones_paused") == 0
    print(f"\ndatabase outage: {cpu_used:.2f} CPU s in {OUTAGE_S:g} s away;"
          f" {metric(body, 'milestones_batch_retries_total'):g} batch retries")
    assert cpu_used < MAX_CPU_SHARE_IN_OUTAGE * OUTAGE_S


async def _settled_offsets(broker: str, engine: EngineProcess, topics: Topics) -> dict[int, int]:
    """The committed offsets once they stop moving (the last commit follows the last batch)."""
    previous: dict[int, int] | None = None
    for _ in range(50):
        current = await committed_offsets(broker, engine.env["MILESTONES_GROUP_ID"],
                                          topics.activity)
        if current == previous:
            return current
        previous = current
        await asyncio.sleep(0.2)
    raise AssertionError(f"committed offsets still moving: {previous}")


async def test_sigterm_while_the_database_is_away_exits_0_within_the_shutdown_timeout(
    kafka: KafkaHelper,
    topics: Topics,
    database_url: str,
    proxied_database: ProxiedDatabase,
    engine_process: EngineLauncher,
) -> None:
    occurred_at, year = session_time()
    mentor = events.new_id()
    engine = engine_process(proxied_database.env())
    await engine.wait_ready(timeout_s=60)
    await proxied_database.proxy.refuse()
    proxied_database.proxy.cut()
    await kafka.produce_json_many(topics.activity, sessions(mentor, 50, occurred_at))
    await engine.wait_for_output("database unavailable", timeout_s=30)

    started = time.monotonic()
    engine.terminate()
    code = await engine.wait(30)
    took = time.monotonic() - started
    timeout_s = float(engine.env["MILESTONES_SHUTDOWN_TIMEOUT_S"])
    assert code == 0, engine.output()
    assert took < timeout_s + 1.5, f"exit took {took:.1f} s (timeout {timeout_s:g} s)"

    # The abandoned batch was not committed anywhere: a restart does it, exactly once.
    await proxied_database.proxy.accept()
    survivor = engine_process()
    await survivor.wait_ready(timeout_s=60)
    counts = {mentor: 50}
    await wait_until_emitted(kafka, topics, database_url, expected_ids(counts, year),
                             timeout_s=60, describe=lambda: outputs([engine, survivor]))
    await stop_all([survivor])
    await assert_end_state(kafka, topics, database_url, counts, year)


async def test_broker_cut_refused_and_slow_is_survived_without_a_busy_loop(
    proxied_broker: ProxiedBroker,
    proxied_kafka: KafkaHelper,
    topics: Topics,
    database_url: str,
    engine_process: EngineLauncher,
) -> None:
    occurred_at, year = session_time()
    mentors = _mentors(10)
    proxy = proxied_broker.proxy
    engine = engine_process({**proxied_broker.env(), "MILESTONES_KAFKA_REQUEST_TIMEOUT_MS": "4000",
                             "MILESTONES_RETRY_BACKOFF_MAX_S": "2"})
    await engine.wait_ready(timeout_s=60)
    describe = lambda: outputs([engine]) + "\n" + proxy.describe()  # noqa: E731

    before = {m: 30 for m in mentors}
    await _produce(proxied_kafka, topics.activity, before, occurred_at)
    await wait_until_counted(database_url, before, year, timeout_s=60, describe=describe)
    crossing = {m: 25 for m in mentors}
    await _produce(proxied_kafka, topics.activity, crossing, occurred_at)

    # Away: every connection reset (the publisher is likely sending), new ones refused.
    await proxy.refuse()
    proxy.cut()
    cpu_before = cpu_seconds(engine.pid)
    await asyncio.sleep(OUTAGE_S)
    cpu_used = cpu_seconds(engine.pid) - cpu_before
    assert engine.running(), describe()
    status, _ = await engine.get("/healthz")
    assert status == 200
    await proxy.accept()

    total = _add(before, crossing)
    await wait_until_counted(database_url, total, year, timeout_s=90, describe=describe)
    await wait_until_emitted(proxied_kafka, topics, database_url, expected_ids(total, year),
                             timeout_s=90, describe=describe)

    # Slow: 100 ms each way on every chunk, for the consumer, the publisher and this test.
    proxy.latency_s = 0.1
    more = {m: 50 for m in mentors}
    await _produce(proxied_kafka, topics.activity, more, occurred_at)
    total = _add(total, more)
    await wait_until_counted(database_url, total, year, timeout_s=90, describe=describe)
    await wait_until_emitted(proxied_kafka, topics, database_url, expected_ids(total, year),
                             timeout_s=90, describe=describe)
    proxy.latency_s = 0.0
    await stop_all([engine])

    await assert_end_state(proxied_kafka, topics, database_url, total, year)
    print(f"\nbroker outage: {cpu_used:.2f} CPU s in {OUTAGE_S:g} s away")
    assert cpu_used < MAX_CPU_SHARE_IN_OUTAGE * OUTAGE_S


async def test_broker_frozen_past_the_session_timeout_is_survived(
    proxied_broker: ProxiedBroker,
    proxied_kafka: KafkaHelper,
    topics: Topics,
    database_url: str,
    engine_process: EngineLauncher,
) -> None:
    occurred_at, year = session_time()
    mentors = _mentors(10)
    engine = engine_process({**proxied_broker.env(), "MILESTONES_KAFKA_REQUEST_TIMEOUT_MS": "4000",
                             "MILESTONES_RETRY_BACKOFF_MAX_S": "2"})
    await engine.wait_ready(timeout_s=60)
    describe = lambda: outputs([engine])  # noqa: E731

    crossing = {m: 50 for m in mentors}
    await _produce(proxied_kafka, topics.activity, crossing, occurred_at)
    await asyncio.sleep(0.2)  # the engine is consuming, committing or publishing
    proxied_broker.freeze()
    try:
        cpu_before = cpu_seconds(engine.pid)
        await asyncio.sleep(3 * float(engine.env["MILESTONES_KAFKA_SESSION_TIMEOUT_MS"]) / 1000)
        cpu_used = cpu_seconds(engine.pid) - cpu_before
        assert engine.running(), describe()
    finally:
        proxied_broker.thaw()

    more = {m: 50 for m in mentors}
    await _produce(proxied_kafka, topics.activity, more, occurred_at)
    total = _add(crossing, more)
    await wait_until_counted(database_url, total, year, timeout_s=90, describe=describe)
    await wait_until_emitted(proxied_kafka, topics, database_url, expected_ids(total, year),
                             timeout_s=90, describe=describe)
    await stop_all([engine])

    await assert_end_state(proxied_kafka, topics, database_url, total, year)
    print(f"\nbroker frozen: {cpu_used:.2f} CPU s while frozen")


async def test_sigterm_while_the_broker_is_away_exits_0_within_the_shutdown_timeout(
    proxied_broker: ProxiedBroker,
    proxied_kafka: KafkaHelper,
    topics: Topics,
    database_url: str,
    engine_process: EngineLauncher,
) -> None:
    occurred_at, year = session_time()
    mentor = events.new_id()
    engine = engine_process(proxied_broker.env())
    await engine.wait_ready(timeout_s=60)
    await proxied_kafka.produce_json_many(topics.activity, sessions(mentor, 50, occurred_at))
    await wait_until_counted(database_url, {mentor: 50}, year, timeout_s=60,
                             describe=lambda: outputs([engine]))
    # Leaving the group, flushing the producers: every step of the shutdown needs the broker.
    await proxied_broker.proxy.refuse()
    proxied_broker.proxy.cut()
    await asyncio.sleep(1.0)

    started = time.monotonic()
    engine.terminate()
    code = await engine.wait(30)
    took = time.monotonic() - started
    timeout_s = float(engine.env["MILESTONES_SHUTDOWN_TIMEOUT_S"])
    assert code == 0, engine.output()
    assert took < timeout_s + 1.5, f"exit took {took:.1f} s (timeout {timeout_s:g} s)"
