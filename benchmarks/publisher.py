"""The outbox publisher alone: how many notifications per second it sends and marks.

``python -m benchmarks.publisher [--rows N] [--rounds R] [--analyze]``: per round a fresh
database with ``N`` pending records written in one statement (as a sweep leaves them: no
statistics yet, unless ``--analyze``), a fresh 8-partition topic, and one publisher on uvloop
in this process (the service's publisher, lease and read-back included) until none is pending.
The figure is the wall time from the publisher's start to the last record marked.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import asyncpg
import uvloop

from benchmarks.infra import Broker, Databases, create_topics
from benchmarks.run import DEFAULT_POSTGRES
from consumer.faults import FaultInjector
from consumer.ops.metrics import Metrics
from consumer.settings import load_settings
from consumer.store.migrate import migrate
from consumer.stream.outbox import Publisher


async def _one_round(broker: Broker, databases: Databases, index: int, rows: int,
                     analyze: bool) -> float:
    topic = f"notifications-{os.getpid()}-{index}"
    await create_topics(broker.bootstrap_servers, [topic], 8)
    url = databases.url(await databases.create(f"r{index}"))
    connection = await asyncpg.connect(url)
    try:
        await migrate(connection)
        await connection.execute(
            "INSERT INTO scenario_notifications (id, user_id, organization_id, year,"
            " milestone_value, session_count, reached_at)"
            " SELECT gen_random_uuid(), gen_random_uuid(), gen_random_uuid(), 2026, 50, 50, now()"
            " FROM generate_series(1, $1)", rows)
        if analyze:
            await connection.execute("ANALYZE scenario_notifications")
        settings = load_settings(kafka_bootstrap_servers=broker.bootstrap_servers,
                                 database_url=url, notification_topic=topic)
        publisher = Publisher(settings, url, Metrics(), FaultInjector(None))
        stop = asyncio.Event()
        started = time.perf_counter()
        task = asyncio.ensure_future(publisher.run(stop))
        while True:
            pending = await connection.fetchval(
                "SELECT count(*) FROM scenario_notifications WHERE status = 'pending'")
            if not pending:
                break
            await asyncio.sleep(0.05)
        seconds = time.perf_counter() - started
        stop.set()
        publisher.wake()
        await task
        await publisher.close()
        return seconds
    finally:
        await connection.close()


async def run(rows: int, rounds: int, analyze: bool, admin_url: str) -> None:
    databases = Databases(admin_url, f"benchpub{os.getpid()}")
    broker = Broker.start()
    try:
        for index in range(rounds):
            seconds = await _one_round(broker, databases, index, rows, analyze)
            print(f"publisher: {rows:,} notifications sent and marked in {seconds:.2f} s"
                  f" ({rows / seconds:,.0f}/s)", flush=True)
    finally:
        await databases.drop_all()
        broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.publisher")
    parser.add_argument("--rows", type=int, default=160_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--analyze", action="store_true",
                        help="ANALYZE the records before publishing (statistics up to date)")
    parser.add_argument("--postgres", default=os.environ.get("BENCH_POSTGRES_URL", DEFAULT_POSTGRES))
    args = parser.parse_args()
    uvloop.run(run(args.rows, args.rounds, args.analyze, args.postgres))


if __name__ == "__main__":
    main()
