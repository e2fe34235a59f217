"""Repairs beside the live service: ``reconcile --fix``, ``sweep`` and ``prune`` as real
processes while ``milestones run`` serves a producer that never pauses.

The ledger is seeded with set-based SQL (``MILESTONES_TEST_REPAIR_LEDGER_ROWS`` rows, 400,000 by
default: 60 % this year, 20 % in each of the two years before), and a third of this year's
summary rows are made to drift. Then, with about 1,500 events/s flowing into ``run``:
``reconcile --fix`` repairs the drift, ``sweep`` records the milestones the repaired counts
reach, ``prune`` closes the two earlier years. Throughout, ``/readyz`` must answer 200, the
engine must never pause and must keep committing batches; at the end every count is exact,
every milestone recorded and emitted once. The figures (the longest time a fix chunk held its
row locks, each command's time, the longest gap between the engine's batches) are printed:
``pytest -s`` shows them; a manual run with a few million rows is in the README.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field

import asyncpg
import pytest

from consumer.store.reconcile_sql import find_drift
from consumer.store.retention import close_years
from tests.faults.checks import (
    assert_end_state,
    metric,
    session_time,
    stop_all,
    wait_until_counted,
)
from tests.integration.operations import connect
from tests.support import events
from tests.support.engine import EngineLauncher, EngineProcess
from tests.support.kafka import KafkaHelper
from tests.support.topics import Topics

LEDGER_ROWS = int(os.environ.get("MILESTONES_TEST_REPAIR_LEDGER_ROWS", "400000"))
ROWS_PER_MENTOR = 150  # about 90 this year (past 50, short of 100), 30 in each earlier year
EVENTS_PER_S = 1_500
BURST = 150
COMMAND_BOUND_S = 120.0 + LEDGER_ROWS / 50_000  # seconds; generous on a busy machine
LONGEST_STALL_S = 10.0  # half the engine's lock_timeout: a batch that waits this long is stuck

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.timeout(240 + LEDGER_ROWS // 10_000),
]

# This year 60 %, the year before 20 %, two years before 20 %; each row of a random mentor.
SEED_LEDGER = """
INSERT INTO activity_ledger (activity_id, mentor_id, organization_id, year, occurred_at,
                             activity_type, counted)
SELECT gen_random_uuid(), mentor, $2, $3 - back,
       make_timestamptz($3 - back, 3, 1, 12, 0, 0, 'UTC'), 'session', true
FROM (SELECT ($1::uuid[])[1 + floor(random() * cardinality($1::uuid[]))::int] AS mentor,
             (ARRAY[0, 0, 0, 1, 2])[1 + floor(random() * 5)::int] AS back
      FROM generate_series(1, $4)) draws
"""
SEED_SUMMARY = """
INSERT INTO annual_summary (user_id, year, session_count, organization_id)
SELECT mentor_id, year, count(*), $1 FROM activity_ledger GROUP BY mentor_id, year
"""


@dataclass
class Watch:
    """What the engine showed while the repairs ran, sampled every 100 ms."""

    samples: int = 0
    not_ready: list[str] = field(default_factory=list)
    paused: int = 0
    longest_stall_s: float = 0.0
    longest_batch_s: float = 0.0


async def watch_engine(engine: EngineProcess, stop: asyncio.Event, seen: Watch) -> None:
    batches, last_progress = -1.0, time.monotonic()
    while not stop.is_set():
        try:
            status, body = await engine.get("/readyz", timeout_s=2.0)
            if status != 200:
                seen.not_ready.append(f"{status} {body.strip()[:100]}")
            text = await engine.metrics()
        except (OSError, TimeoutError) as error:
            seen.not_ready.append(f"{type(error).__name__}: {error}")
            text = ""
        now = time.monotonic()
        seen.samples += 1
        seen.paused += int(metric(text, "milestones_paused") > 0)
        seen.longest_batch_s = max(seen.longest_batch_s, metric(text, "milestones_last_batch_seconds"))
        committed = metric(text, "milestones_batches_total")
        seen.longest_stall_s = max(seen.longest_stall_s, now - last_progress)
        if committed > batches:
            batches, last_progress = committed, now
        await asyncio.sleep(0.1)


async def produce_steadily(
    kafka: KafkaHelper, topic: str, mentors: list[str], occurred_at: str, stop: asyncio.Event,
    sent: Counter[str],
) -> None:
    """About EVENTS_PER_S new sessions a second until ``stop``, each of a random mentor."""
    rng = random.Random(11)
    started, produced = time.monotonic(), 0
    while not stop.is_set():
        batch = rng.choices(mentors, k=BURST)
        await kafka.produce_json_many(topic, [events.logged(m, occurred_at=occurred_at) for m in batch])
        sent.update(batch)
        produced += BURST
        ahead_s = started + produced / EVENTS_PER_S - time.monotonic()
        if ahead_s > 0:
            await asyncio.sleep(ahead_s)


async def run_command(engine_process: EngineLauncher, *args: str) -> tuple[float, str]:
    started = time.monotonic()
    process = engine_process({"MILESTONES_METRICS_PORT": "0"}, args)
    code = await process.wait(COMMAND_BOUND_S)
    assert code == 0, f"milestones {' '.join(args)} exited {code}:\n{process.output()[-3000:]}"
    return time.monotonic() - started, process.stdout()


async def test_reconcile_sweep_and_prune_beside_run_under_load_never_pause_it(
    kafka: KafkaHelper, topics: Topics, database_url: str, engine_env: dict[str, str],
    engine_process: EngineLauncher,
) -> None:
    occurred_at, year = session_time()
    mentors = [events.new_id() for _ in range(max(100, LEDGER_ROWS // ROWS_PER_MENTOR))]
    db = await connect(database_url)
    try:
        started = time.monotonic()
        await db.execute(SEED_LEDGER, mentors,
                         events.ORG, year, LEDGER_ROWS)
        await db.execute(SEED_SUMMARY, events.ORG)
        await db.execute("ANALYZE")
        await close_years(db, year - 4)  # a prune of years ago: the guard exists already
        seeded = {str(row["mentor_id"]): row["n"] for row in await db.fetch(
            "SELECT mentor_id, count(*)::int AS n FROM activity_ledger WHERE year = $1"
            " GROUP BY mentor_id", year)}
        seed_s = time.monotonic() - started

        engine = engine_process()
        await engine.wait_ready()
        stop_traffic, stop_watch = asyncio.Event(), asyncio.Event()
        sent: Counter[str] = Counter()
        seen = Watch()
        traffic = asyncio.ensure_future(
            produce_steadily(kafka, topics.activity, mentors, occurred_at, stop_traffic, sent))
        watcher = asyncio.ensure_future(watch_engine(engine, stop_watch, seen))
        try:
            await asyncio.sleep(2.0)  # traffic flows through run before the first repair
            # Drift on a third of this year's rows: counts lowered (a lower count delays a
            # milestone, a higher one would record it for good), and a few rows gone.
            # Rows locked in key order first, as every writer does, so that the tampering
            # itself cannot deadlock with a batch.
            tampered = await db.execute(
                "WITH target AS (SELECT user_id FROM annual_summary WHERE year = $1"
                " AND get_byte(uuid_send(user_id), 15) % 3 = 0 ORDER BY user_id FOR UPDATE)"
                " UPDATE annual_summary s SET session_count = s.session_count - 7"
                " FROM target t WHERE s.user_id = t.user_id AND s.year = $1", year)
            await db.execute(
                "WITH target AS (SELECT user_id FROM annual_summary WHERE year = $1"
                " ORDER BY user_id LIMIT 20 FOR UPDATE)"
                " DELETE FROM annual_summary s USING target t"
                " WHERE s.user_id = t.user_id AND s.year = $1", year)
            produced_before = sum(sent.values())
            repair_started = time.monotonic()
            reconcile_s, reconcile_out = await run_command(engine_process, "reconcile", "--fix")
            sweep_s, sweep_out = await run_command(engine_process, "sweep")
            # A reader in a long transaction (a report, pg_dump) holds the ledger's ACCESS SHARE
            # lock all along the prune: the guard's DDL must not wait for it, or every batch
            # would queue behind the DDL.
            reader = await asyncpg.connect(database_url)
            try:
                async with reader.transaction():
                    await reader.fetchval("SELECT count(*) FROM activity_ledger")
                    prune_s, prune_out = await run_command(
                        engine_process, "prune", "--before-year", str(year))
            finally:
                await reader.close()
            repairs_s = time.monotonic() - repair_started
            produced_during = sum(sent.values()) - produced_before
            await asyncio.sleep(1.0)
        finally:
            stop_traffic.set()
            await traffic
        expected = {mentor: seeded.get(mentor, 0) + sent[mentor] for mentor in mentors}
        await wait_until_counted(database_url, expected, year, timeout_s=60,
                                 describe=engine.output)
        stop_watch.set()
        await watcher

        held = re.search(r"the longest held its row locks (\d+) ms", reconcile_out)
        counted = re.search(r"counted in (\d+) ms without row locks", reconcile_out)
        assert held, reconcile_out
        assert counted, reconcile_out
        print(
            f"\nledger {LEDGER_ROWS:,} rows, {len(mentors):,} mentors (seeded in {seed_s:.1f} s);"
            f" {tampered.split()[-1]} summary rows lowered, 20 deleted;"
            f" {produced_during / repairs_s:,.0f} events/s produced during the repairs\n"
            f"reconcile --fix {reconcile_s:.1f} s: counted in {counted.group(1)} ms without"
            f" locks, longest chunk lock hold {held.group(1)} ms;"
            f" sweep {sweep_s:.1f} s; prune {prune_s:.1f} s\n"
            f"engine: {seen.samples} samples, not ready {len(seen.not_ready)}, paused"
            f" {seen.paused}, longest gap between batches {seen.longest_stall_s:.2f} s,"
            f" longest batch {seen.longest_batch_s:.2f} s\n"
            + "\n".join(line for out in (reconcile_out, sweep_out, prune_out)
                        for line in out.splitlines() if not line.startswith(("-", "0", "1")))
        )
        assert not seen.not_ready, seen.not_ready[:5]
        assert seen.paused == 0
        assert seen.samples > 10
        assert seen.longest_stall_s < LONGEST_STALL_S
        assert "fixed" in reconcile_out
        # The locks are held for the repair of a chunk, not for a count over the ledger.
        assert 2 * int(held.group(1)) < int(counted.group(1)), reconcile_out
        assert "lock timeout" not in engine.output()
        closed = await db.fetchval("SELECT closed_through_year FROM engine_state")
        assert closed == year - 1
        assert await find_drift(db, None, closed) == []
        assert await db.fetchval("SELECT count(*) FROM activity_ledger WHERE year < $1", year) == 0
        await stop_all([engine])
        await assert_end_state(kafka, topics, database_url, expected, year)
    finally:
        await db.close()
