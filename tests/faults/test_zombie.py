"""A member frozen past its session timeout wakes up still believing it owns its partitions.

Two instances share one group. The first one's database link is slowed down (a proxy adds
latency) so that it spends most of its time inside a batch transaction, and it is frozen with
SIGSTOP while it works; the other one takes its partitions over while events keep arriving.
When the zombie resumes, it finishes its stale batch against the same mentors the new owner is
counting: the database decides (ledger key, row locks, the records' unique key), and its offset
commit is refused and skipped. Counts stay exact and every notification is emitted once.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from tests.faults.checks import (
    assert_end_state,
    expected_ids,
    metric,
    outputs,
    session_time,
    sessions,
    stop_all,
    wait_until_counted,
    wait_until_emitted,
)
from tests.faults.conftest import ProxiedDatabase
from tests.support import events
from tests.support.engine import EngineLauncher
from tests.support.kafka import KafkaHelper
from tests.support.topics import Topics

pytestmark = pytest.mark.e2e

# Frozen for three session timeouts: surely expelled, the partitions surely moved.
FROZEN_SESSIONS = 3


@pytest.mark.parametrize(
    "freeze_at",
    [
        # inside its batch transaction, row locks held, publisher lease held: on waking, the
        # revocation deadline abandons the batch (nothing committed to the group)
        pytest.param(b"BEGIN", id="mid-transaction"),
        # its batch committed to Postgres, its offsets not yet to the group: on waking, the
        # stale offset commit is refused, or abandoned with its batch, and skipped
        pytest.param(b"COMMIT", id="between-db-and-offset-commit"),
    ],
)
async def test_member_frozen_past_its_session_timeout_changes_no_count_and_emits_once(
    freeze_at: bytes,
    kafka: KafkaHelper,
    topics: Topics,
    database_url: str,
    proxied_database: ProxiedDatabase,
    engine_process: EngineLauncher,
) -> None:
    frozen_s = FROZEN_SESSIONS * int(engine_process.base_env["MILESTONES_KAFKA_SESSION_TIMEOUT_MS"]) / 1000
    rng = random.Random(7)
    occurred_at, year = session_time()
    mentors = [events.new_id() for _ in range(24)]
    # 60 sessions each (crosses 50), a few to 110 (crosses 100 as well).
    totals = {mentor: (110 if index < 4 else 60) for index, mentor in enumerate(mentors)}
    phases = [{m: 20 for m in mentors}, {m: 25 for m in mentors}]
    phases.append({m: totals[m] - 45 for m in mentors})

    if freeze_at == b"BEGIN":
        # The zombie starts first and holds the publisher lease while it is frozen.
        zombie = engine_process(proxied_database.env())
        await zombie.wait_ready(timeout_s=60)
        owner = engine_process()
        await owner.wait_ready(timeout_s=60)
    else:
        # The owner holds the lease: every COMMIT on the zombie's link is a batch's.
        owner = engine_process()
        await owner.wait_ready(timeout_s=60)
        zombie = engine_process(proxied_database.env())
        await zombie.wait_ready(timeout_s=60)
    proxied_database.proxy.latency_s = 0.05

    async def produce(counts: dict[str, int], chunks: int) -> None:
        batch = [event for m, n in counts.items() for event in sessions(m, n, occurred_at)]
        rng.shuffle(batch)
        size = -(-len(batch) // chunks)
        for start in range(0, len(batch), size):
            await kafka.produce_json_many(topics.activity, batch[start : start + size])
            await asyncio.sleep(frozen_s / chunks)

    transaction = proxied_database.proxy.watch(freeze_at)
    await produce(phases[0], chunks=2)
    await asyncio.wait_for(transaction.wait(), 30)
    if freeze_at == b"BEGIN":
        await asyncio.sleep(0.3)  # a few statements in: the zombie holds row locks
    zombie.freeze()  # COMMIT: its answer is still on the way (latency), offsets not committed
    try:
        await produce(phases[1], chunks=6)  # the owner takes over meanwhile
    finally:
        zombie.thaw()
    await produce(phases[2], chunks=2)

    both = [zombie, owner]
    await wait_until_counted(database_url, totals, year, timeout_s=90,
                             describe=lambda: outputs(both))
    await wait_until_emitted(kafka, topics, database_url, expected_ids(totals, year),
                             timeout_s=60, describe=lambda: outputs(both))
    zombie_metrics = await zombie.metrics()
    assert zombie.running(), outputs(both)
    assert owner.running(), outputs(both)
    await stop_all(both)

    on_topic = await assert_end_state(kafka, topics, database_url, totals, year)
    # The zombie's offsets for its stale batch never reached the group.
    assert metric(zombie_metrics, "milestones_abandoned_batches_total") + metric(
        zombie_metrics, "milestones_offset_commit_failures_total") >= 1, outputs(both)
    print(
        f"\nzombie: {len(on_topic)} notifications once each; zombie skipped"
        f" {metric(zombie_metrics, 'milestones_offset_commit_failures_total'):g} offset"
        f" commit(s), abandoned {metric(zombie_metrics, 'milestones_abandoned_batches_total'):g}"
        " batch(es)"
    )
