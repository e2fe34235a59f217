"""The operator commands at scale: ``milestones sweep`` and ``milestones replay``.

``python -m benchmarks.operations`` (``--quick`` for a small smoke run):
  1. sweep: 100,000 mentors with a session count in the current year (0 to 250, uniform), the
     three default thresholds and no records yet; ``milestones sweep`` runs as a real process,
     records every reached milestone (the time it reports for that part is printed too) and
     waits until its publisher has sent them all;
  2. replay: 1,000,000 ``activity.logged`` events (the main harness's workload) on the broker,
     ``milestones replay --from-beginning --no-notify`` into an empty database, as a real
     process, until caught up; the counts are checked against the workload.
Each figure is the wall time of the command, start-up included, and is printed with its rate.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import asyncpg

from benchmarks.infra import Broker, Databases, create_topics
from benchmarks.run import DEFAULT_POSTGRES
from benchmarks.scenarios import produce_all
from benchmarks.workload import make_mentors, make_workload


def _milestones(args: list[str], env: dict[str, str], timeout_s: float) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "consumer", *args], env={**os.environ, **env},
        capture_output=True, text=True, timeout=timeout_s, check=False,
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"milestones {' '.join(args)} exited {done.returncode}:\n"
                           f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return seconds, done.stdout


async def run(mentors: int, events: int, admin_url: str) -> None:
    databases = Databases(admin_url, f"benchops{os.getpid()}")
    broker = Broker.start()
    suffix = str(os.getpid())
    topics = {
        "activity": f"activity-{suffix}", "preferences": f"preferences-{suffix}",
        "notifications": f"notifications-{suffix}", "dlq": f"dlq-{suffix}",
    }
    try:
        await create_topics(broker.bootstrap_servers, list(topics.values()), 8)
        year = datetime.now(UTC).astimezone(ZoneInfo("Europe/Oslo")).year

        def env(database: str, group: str) -> dict[str, str]:
            return {
                "MILESTONES_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
                "MILESTONES_DATABASE_URL": databases.url(database),
                "MILESTONES_GROUP_ID": group,
                "MILESTONES_ACTIVITY_TOPIC": topics["activity"],
                "MILESTONES_PREFERENCES_TOPIC": topics["preferences"],
                "MILESTONES_NOTIFICATION_TOPIC": topics["notifications"],
                "MILESTONES_DLQ_TOPIC": topics["dlq"],
                "MILESTONES_KAFKA_SESSION_TIMEOUT_MS": "2000",
                "MILESTONES_METRICS_PORT": "0",
                "MILESTONES_LOG_LEVEL": "WARNING",
            }

        # 1. sweep
        sweep_db = await databases.create("sweep")
        _milestones(["migrate"], env(sweep_db, "ops-sweep"), 120)
        connection = await asyncpg.connect(databases.url(sweep_db))
        try:
            await connection.execute(
                "INSERT INTO annual_summary (user_id, year, session_count, organization_id)"
                " SELECT gen_random_uuid(), $1, (random() * 250)::int, gen_random_uuid()"
                " FROM generate_series(1, $2)", year, mentors)
            await connection.execute("ANALYZE annual_summary")
            expected = await connection.fetchval(
                "SELECT sum((session_count >= 50)::int + (session_count >= 100)::int"
                " + (session_count >= 200)::int) FROM annual_summary")
            seconds, output = _milestones(["sweep", "--year", str(year)],
                                          env(sweep_db, "ops-sweep"), 1800)
            recorded = await connection.fetchval("SELECT count(*) FROM scenario_notifications")
            published = await connection.fetchval(
                "SELECT count(*) FROM scenario_notifications WHERE status = 'published'")
        finally:
            await connection.close()
        # The sweep waits a bounded time for its publisher; what is left pending is sent by the
        # next publisher (``run``), so the check is on what was recorded.
        check = "ok" if recorded == expected else f"MISMATCH (expected {expected:,})"
        # The recording part, as the command measured it (without start-up and the sends).
        found = re.search(r"evaluated in \d+ chunk\(s\), ([0-9.]+) s", output)
        recording = f"recorded in {float(found.group(1)):.2f} s, " if found else ""
        print(f"sweep: {mentors:,} mentors, 3 thresholds: {recorded:,} milestones {recording}"
              f"{published:,} of them sent before the command exited, in {seconds:.1f} s"
              f" ({mentors / seconds:,.0f} mentors/s, {published / seconds:,.0f} sent/s),"
              f" check {check}", flush=True)

        # 2. replay
        workload = make_workload(events=events, mentors=make_mentors(10_000, 1), partitions=8,
                                 seed=1)
        await produce_all(broker.bootstrap_servers, topics["activity"], workload)
        replay_db = await databases.create("replay")
        _milestones(["migrate"], env(replay_db, "ops-replay"), 120)
        seconds, _ = _milestones(["replay", "--from-beginning", "--no-notify"],
                                 env(replay_db, "ops-replay"), 3600)
        connection = await asyncpg.connect(databases.url(replay_db))
        try:
            counted = await connection.fetchval("SELECT coalesce(sum(session_count), 0)"
                                                " FROM annual_summary")
        finally:
            await connection.close()
        check = "ok" if counted == workload.distinct else f"MISMATCH ({counted:,})"
        print(f"replay --from-beginning --no-notify: {events:,} events"
              f" ({workload.duplicates:,} re-deliveries) in {seconds:.1f} s"
              f" ({events / seconds:,.0f} events/s, start and group join included),"
              f" check {check}", flush=True)
    finally:
        await databases.drop_all()
        broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.operations")
    parser.add_argument("--mentors", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true", help="2,000 mentors, 20,000 events")
    parser.add_argument("--postgres", default=os.environ.get("BENCH_POSTGRES_URL", DEFAULT_POSTGRES))
    args = parser.parse_args()
    mentors, events = (2_000, 20_000) if args.quick else (args.mentors, args.events)
    asyncio.run(run(mentors, events, args.postgres))


if __name__ == "__main__":
    main()
