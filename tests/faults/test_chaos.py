"""Chaos: 20,000 events over 200 mentors, 10% of them re-deliveries, while two members of one
group are SIGKILLed and restarted at random moments (some restarts also arm a fault point, so
kills land exactly between the steps of the commit order too).

At the end: every mentor's count exact, one record per reached milestone, every expected
``notification_id`` on the topic, none unexpected, none twice. The figures are printed; the
seed too (``MILESTONES_CHAOS_SEED`` replays a run's choices, not its timing).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from dataclasses import dataclass, field

import pytest

from tests.faults.checks import (
    assert_end_state,
    expected_ids,
    notification_ids,
    outputs,
    session_time,
    stop_all,
    until,
    wait_until_counted,
    wait_until_emitted,
    with_duplicates,
)
from tests.support import events
from tests.support.engine import EngineLauncher, EngineProcess
from tests.support.kafka import KafkaHelper
from tests.support.topics import Topics

pytestmark = [pytest.mark.e2e, pytest.mark.chaos]

MENTORS = 200
EVENTS = 20_000
DUPLICATE_SHARE = 0.10
MIN_KILLS = 10
FAULT_POINTS = ("after_db_commit", "after_offset_commit", "after_send_ack", "after_mark_published")


@dataclass
class Member:
    """One slot of the group: the process now in it and every process it has had."""

    name: str
    process: EngineProcess
    history: list[EngineProcess] = field(default_factory=list)


def _session_counts(rng: random.Random, unique: int) -> list[int]:
    """Per mentor, a count in bands below 50, to 100, to 200 and past 200, summing to
    ``unique``."""
    bands = [(20, 49)] * 2 + [(50, 99)] * 5 + [(100, 160)] * 2 + [(200, 215)]
    counts = [rng.randint(*rng.choice(bands)) for _ in range(MENTORS)]
    while (excess := sum(counts) - unique) != 0:
        index = rng.randrange(MENTORS)
        step = 1 if excess < 0 else -1
        if 20 <= counts[index] + step <= 215:
            counts[index] += step
    return counts


@pytest.mark.timeout(300)
@pytest.mark.parametrize("topics", [{"activity": 8}], indirect=True)
async def test_random_kills_under_load_change_no_count_and_emit_each_notification_once(
    kafka: KafkaHelper,
    topics: Topics,
    database_url: str,
    engine_process: EngineLauncher,
) -> None:
    seed = int(os.environ.get("MILESTONES_CHAOS_SEED") or random.randrange(1 << 30))
    rng = random.Random(seed)
    started = time.monotonic()
    occurred_at, year = session_time()

    duplicates = round(EVENTS * DUPLICATE_SHARE)
    unique_events = EVENTS - duplicates
    mentors = [events.new_id() for _ in range(MENTORS)]
    counts = dict(zip(mentors, _session_counts(rng, unique_events), strict=True))
    originals = [events.logged(m, occurred_at=occurred_at) for m, n in counts.items()
                 for _ in range(n)]
    rng.shuffle(originals)
    stream = with_duplicates(originals, duplicates, rng)

    members = [Member(name, engine_process()) for name in ("a", "b")]
    for member in members:
        member.history.append(member.process)
    await members[0].process.wait_ready(timeout_s=60)

    kills = 0
    self_kills = 0
    chaos_on = True

    def everyone() -> list[EngineProcess]:
        return [process for member in members for process in member.history]

    def restart(member: Member) -> None:
        extra: dict[str, str] = {}
        if chaos_on and rng.random() < 0.5:
            extra = {"MILESTONES_FAULT_POINT": rng.choice(FAULT_POINTS),
                     "MILESTONES_FAULT_AFTER": str(rng.randint(1, 3))}
        member.process = engine_process(extra)
        member.history.append(member.process)

    async def live(member: Member) -> None:
        """Kill the member at a random moment once it is at work; restart it at once. A
        process that dies by itself (at its fault point) is restarted too."""
        nonlocal kills, self_kills
        while True:
            process = member.process
            killed_by_us = False
            with contextlib.suppress(AssertionError):  # died before it was ready
                await process.wait_ready(timeout_s=60)
            if chaos_on:
                await until(lambda: not process.running(), rng.uniform(0.2, 2.5), 0.05)  # noqa: B023
                if process.running() and chaos_on:
                    process.kill()
                    killed_by_us = True
                    kills += 1
            await until(lambda: not process.running(), interval_s=0.2)  # noqa: B023
            if process.returncode == -9 and not killed_by_us:
                self_kills += 1
            restart(member)

    async def produce() -> None:
        # About 20 s of traffic, so that kills land while batches are in hand.
        chunk = 250
        for start in range(0, len(stream), chunk):
            await kafka.produce_json_many(topics.activity, stream[start : start + chunk])
            await asyncio.sleep(rng.uniform(0.05, 0.4))

    lives = [asyncio.ensure_future(live(member)) for member in members]
    try:
        await produce()
        await until(lambda: kills >= MIN_KILLS, interval_s=0.2)
        chaos_on = False  # restarts carry no fault point now; an armed one may still fire
        await wait_until_counted(database_url, counts, year, timeout_s=150,
                                 describe=lambda: outputs(everyone(), tail=1500))
        await wait_until_emitted(kafka, topics, database_url, expected_ids(counts, year),
                                 timeout_s=90, describe=lambda: outputs(everyone(), tail=1500))
    finally:
        chaos_on = False
        for task in lives:
            task.cancel()
        await asyncio.gather(*lives, return_exceptions=True)
    for member in members:
        # A member restarted a moment ago may still be importing, before its SIGTERM handler
        # exists; stop it once it is up (or let it be, if it died at its armed fault point).
        if member.process.running():
            with contextlib.suppress(AssertionError):
                await member.process.wait_ready(timeout_s=60)
    rss_mb = [_rss_mb(member.process.pid) for member in members if member.process.running()]
    await stop_all([member.process for member in members])

    on_topic = notification_ids(await kafka.read_all(topics.notifications, timeout_s=30))
    emitted_twice = sum(n - 1 for n in on_topic.values() if n > 1)
    seconds = time.monotonic() - started
    print(
        f"\nchaos (seed {seed}): {len(stream)} events ({duplicates} duplicates) over {MENTORS}"
        f" mentors; {kills} SIGKILLs + {self_kills} kills at fault points;"
        f" {len(everyone())} processes; {len(expected_ids(counts, year))} notifications,"
        f" {emitted_twice} duplicate emissions; {seconds:.0f} s;"
        f" RSS at the end {', '.join(f'{mb:.0f}' for mb in rss_mb)} MB"
    )
    await assert_end_state(kafka, topics, database_url, counts, year)
    assert kills >= MIN_KILLS


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0
