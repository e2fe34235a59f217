"""A crash at each step of the commit order changes nothing: the count stays exact, the milestone
is recorded once and its notification is on the topic exactly once after a restart.

The engine kills itself (SIGKILL, no clean-up) at the named step the first time it gets there,
while it handles the batch that crosses the milestone; a second process, without the fault,
finishes the work.
"""

from __future__ import annotations

import signal

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
from tests.support import events
from tests.support.engine import EngineLauncher
from tests.support.kafka import KafkaHelper
from tests.support.topics import Topics

pytestmark = pytest.mark.e2e

# What the restarted engine must do to finish, per step: redo the batch (the ledger makes it
# a no-op), send, or find the sent notification by reading the topic back.
CRASH_POINTS = [
    pytest.param("after_db_commit", 0, id="after_db_commit"),
    pytest.param("after_offset_commit", 0, id="after_offset_commit"),
    pytest.param("after_send_ack", 1, id="after_send_ack"),
    pytest.param("after_mark_published", 0, id="after_mark_published"),
]


@pytest.mark.parametrize(("fault_point", "read_back_hits"), CRASH_POINTS)
async def test_crash_at_each_step_keeps_the_count_and_emits_once(
    fault_point: str,
    read_back_hits: int,
    kafka: KafkaHelper,
    topics: Topics,
    database_url: str,
    engine_process: EngineLauncher,
) -> None:
    occurred_at, year = session_time()
    mentor, bystander = events.new_id(), events.new_id()
    counts = {mentor: 50, bystander: 7}
    # On the topic before the engine starts (one key, one partition): the first batch crosses.
    await kafka.produce_json_many(topics.activity, sessions(mentor, 50, occurred_at))

    crashing = engine_process({"MILESTONES_FAULT_POINT": fault_point})
    code = await crashing.wait(60)
    assert code == -signal.SIGKILL, f"expected a SIGKILL at {fault_point}, got {code}:\n" + (
        crashing.output()
    )
    log = crashing.output()
    assert f"fault point {fault_point} reached" in log
    assert log.index("milestone 50 recorded") < log.index(f"fault point {fault_point}"), log

    # Work that arrives while the engine is down is picked up too.
    await kafka.produce_json_many(topics.activity, sessions(bystander, 7, occurred_at))
    survivor = engine_process()
    await survivor.wait_ready(timeout_s=60)
    await wait_until_emitted(
        kafka, topics, database_url, expected_ids(counts, year), timeout_s=60,
        describe=lambda: outputs([crashing, survivor]),
    )
    body = await survivor.metrics()
    await stop_all([survivor])

    await assert_end_state(kafka, topics, database_url, counts, year)
    assert metric(body, "milestones_readback_hits_total") == read_back_hits
    assert metric(body, "milestones_published_total") == (
        1 if fault_point in ("after_db_commit", "after_offset_commit") else 0
    )
