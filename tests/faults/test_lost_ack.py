"""A lost acknowledgement: the broker writes the notification, its answer never comes back.

The proxy forwards the publisher's Produce request for the notification topic and swallows the
response, holding the connection open. A publisher that re-sends on a timeout (as aiokafka does
by itself after a retriable error) would write the notification twice; ours gives the send up
as "in doubt", reads the topic back, finds the record and marks it published.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.faults.checks import (
    assert_end_state,
    expected_ids,
    metric,
    outputs,
    session_time,
    sessions,
    stop_all,
    wait_until_emitted,
)
from tests.faults.conftest import ProxiedBroker
from tests.support import events
from tests.support.engine import EngineLauncher
from tests.support.kafka import KafkaHelper
from tests.support.topics import Topics

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize(
    "reset_after_s",
    [
        # held open: the send times out (MILESTONES_KAFKA_REQUEST_TIMEOUT_MS)
        pytest.param(None, id="connection-held-open"),
        # reset soon after: a retriable error; aiokafka would re-send the batch by itself
        pytest.param(0.5, id="connection-reset"),
    ],
)
async def test_lost_produce_acknowledgement_is_read_back_not_resent(
    reset_after_s: float | None,
    proxied_broker: ProxiedBroker,
    proxied_kafka: KafkaHelper,
    topics: Topics,
    database_url: str,
    engine_process: EngineLauncher,
) -> None:
    occurred_at, year = session_time()
    first, second = events.new_id(), events.new_id()
    swallowed = proxied_broker.proxy.drop_response_to_produce(
        topics.notifications, reset_after_s=reset_after_s
    )
    engine = engine_process({
        **proxied_broker.env(),
        "MILESTONES_KAFKA_REQUEST_TIMEOUT_MS": "3000",
    })
    await engine.wait_ready(timeout_s=60)

    await proxied_kafka.produce_json_many(topics.activity, sessions(first, 50, occurred_at))
    await asyncio.wait_for(swallowed.wait(), 60)
    # The record is on the topic now; the engine does not know it yet.
    await wait_until_emitted(
        proxied_kafka, topics, database_url, expected_ids({first: 50}, year), timeout_s=60,
        describe=lambda: outputs([engine]),
    )
    # The publisher still works after the doubt is settled.
    await proxied_kafka.produce_json_many(topics.activity, sessions(second, 50, occurred_at))
    counts = {first: 50, second: 50}
    await wait_until_emitted(
        proxied_kafka, topics, database_url, expected_ids(counts, year), timeout_s=60,
        describe=lambda: outputs([engine]),
    )
    body = await engine.metrics()
    log = engine.output()
    await stop_all([engine])

    await assert_end_state(proxied_kafka, topics, database_url, counts, year)
    assert "outcome in doubt" in log or "broker trouble" in log, log
    assert metric(body, "milestones_readback_hits_total") == 1
    assert metric(body, "milestones_published_total") == 1


async def test_lost_dead_letter_acknowledgement_is_retried_and_consuming_goes_on(
    proxied_broker: ProxiedBroker,
    proxied_kafka: KafkaHelper,
    topics: Topics,
    database_url: str,
    engine_process: EngineLauncher,
) -> None:
    occurred_at, year = session_time()
    mentor = events.new_id()
    swallowed = proxied_broker.proxy.drop_response_to_produce(topics.dlq)
    engine = engine_process({
        **proxied_broker.env(),
        "MILESTONES_KAFKA_REQUEST_TIMEOUT_MS": "3000",
    })
    await engine.wait_ready(timeout_s=60)

    bad = await proxied_kafka.produce(topics.activity, b"{not json", key=mentor.encode())
    await asyncio.wait_for(swallowed.wait(), 60)
    # The engine retries the dead letter, then goes on with what comes after it.
    await proxied_kafka.produce_json_many(topics.activity, sessions(mentor, 50, occurred_at))
    counts = {mentor: 50}
    await wait_until_emitted(
        proxied_kafka, topics, database_url, expected_ids(counts, year), timeout_s=60,
        describe=lambda: outputs([engine]),
    )
    await stop_all([engine])

    await assert_end_state(proxied_kafka, topics, database_url, counts, year)
    dead = [r for r in await proxied_kafka.read_all(topics.dlq)
            if r.header("source_offset") == str(bad.offset)]
    # At least once: the first send landed, its acknowledgement did not.
    assert 1 <= len(dead) <= 2, dead
    assert all(r.value == b"{not json" for r in dead)
