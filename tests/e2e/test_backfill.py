"""A backfill beside live traffic: ``milestones replay --from-beginning`` of a few thousand
events while a producer keeps producing through the whole replay, then ``run`` for the rest.

The replay must stop at the end each partition had when it started (later records are
``run``'s), so it finishes however busy the topic is; what it counted must be exactly the
records below the offsets it committed; and after ``run`` every count is exact and every
milestone was emitted once, whoever of the two recorded it.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections import Counter

import pytest

from tests.faults.checks import (
    assert_end_state,
    committed_offsets,
    expected_ids,
    outputs,
    session_time,
    stop_all,
    summary_counts,
    wait_until_counted,
    wait_until_emitted,
)
from tests.support import events
from tests.support.engine import EngineLauncher
from tests.support.kafka import KafkaHelper, Produced
from tests.support.topics import Topics

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BACKLOG = 3_000
MENTORS = 40  # 75 sessions each in the backlog: the 50 milestone is the replay's to record
LIVE_BATCH = 100
LIVE_PAUSE_S = 0.1  # at most 1,000 events/s, less when the broker takes its time
REPLAY_BOUND_S = 60.0


async def test_a_replay_beside_a_producer_that_never_pauses_stops_at_the_ends_it_found(
    kafka: KafkaHelper, topics: Topics, database_url: str, broker: str,
    engine_env: dict[str, str], engine_process: EngineLauncher,
) -> None:
    occurred_at, year = session_time()
    rng = random.Random(9)
    mentors = [events.new_id() for _ in range(MENTORS)]
    sent: list[tuple[str, Produced]] = []

    async def produce(batch: list[str]) -> None:
        acknowledged = await kafka.produce_json_many(
            topics.activity, [events.logged(m, occurred_at=occurred_at) for m in batch]
        )
        sent.extend(zip(batch, acknowledged, strict=True))

    await produce([mentors[n % MENTORS] for n in range(BACKLOG)])
    backlog_ends = Counter[int]()
    for _, produced in sent:
        backlog_ends[produced.partition] = max(backlog_ends[produced.partition], produced.offset + 1)
    live_stop = asyncio.Event()

    async def live_traffic() -> None:
        deadline = time.monotonic() + REPLAY_BOUND_S + 30
        while not live_stop.is_set() and time.monotonic() < deadline:
            await produce(rng.choices(mentors, k=LIVE_BATCH))
            await asyncio.sleep(LIVE_PAUSE_S)

    live = asyncio.ensure_future(live_traffic())
    try:
        await asyncio.sleep(1.0)  # traffic is flowing when the replay starts
        live_before = len(sent) - BACKLOG
        started = time.monotonic()
        replay = engine_process(args=("replay", "--from-beginning"))
        code = await replay.wait(REPLAY_BOUND_S)
        replay_s = time.monotonic() - started
        live_during = len(sent) - BACKLOG - live_before
        assert code == 0, replay.output()
        assert not live.done(), "the producer stopped before the replay ended"
    finally:
        live_stop.set()
        await live
    print(f"replay: {replay_s:.1f} s beside {live_during / replay_s:,.0f} live events/s;"
          f" {replay.stdout().strip()}")
    assert live_during / replay_s > 200, "too little live traffic to prove anything"

    # What the replay was meant to read: each partition from 0 to the end it found at start,
    # which is where it committed. It read all of the backlog, and stopped before the end.
    ends = await committed_offsets(broker, engine_env["MILESTONES_GROUP_ID"] + "-replay",
                                   topics.activity)
    assert all(ends.get(p, 0) >= end for p, end in backlog_ends.items()), (ends, backlog_ends)
    last = Counter[int]()
    for _, produced in sent:
        last[produced.partition] = max(last[produced.partition], produced.offset + 1)
    assert all(ends[p] < last[p] for p in last), (ends, last)  # traffic went on past the ends
    read = re.search(r"([\d,]+) event\(s\) read", replay.stdout())
    assert read is not None, replay.output()
    assert int(read.group(1).replace(",", "")) == sum(ends.values())
    below_ends = Counter(m for m, produced in sent if produced.offset < ends[produced.partition])
    assert await summary_counts(database_url, year) == dict(below_ends)

    # The rest is run's: afterwards every count is exact and every milestone emitted once.
    counts = dict(Counter(m for m, _ in sent))
    service = engine_process()
    await service.wait_ready(timeout_s=60)
    await wait_until_counted(database_url, counts, year, timeout_s=60,
                             describe=lambda: outputs([replay, service]))
    await wait_until_emitted(kafka, topics, database_url, expected_ids(counts, year),
                             timeout_s=60, describe=lambda: outputs([replay, service]))
    await stop_all([service])
    await assert_end_state(kafka, topics, database_url, counts, year)
