"""Each measurement, run in a fresh process (a worker or the engine) and a fresh database."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from benchmarks import infra, profiling
from benchmarks.engines import (
    REPO,
    EngineProcess,
    OffsetWatcher,
    PostgresCpu,
    cpu_shares,
    engine_env,
    peak_rss_mb,
    watch,
    window_start,
)
from benchmarks.run import Run
from benchmarks.workload import Workload, make_mentors, make_workload


class BenchmarkError(Exception):
    """A scenario could not produce its figure (a process failed, a check did not hold)."""


# --------------------------------------------------------------------------- producing


async def produce_all(bootstrap: str, topic: str, workload: Workload) -> float:
    """Produce the workload as fast as the client allows, batch by batch per partition."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5,
                                max_batch_size=1 << 20, request_timeout_ms=60_000)
    await producer.start()
    try:
        started = time.perf_counter()
        batches: dict[int, Any] = {}
        sent = []
        for event in workload.events:
            now_ms = int(time.time() * 1000)
            batch = batches.get(event.partition)
            if batch is None:
                batch = batches[event.partition] = producer.create_batch()
            if batch.append(key=event.key, value=event.value, timestamp=now_ms) is None:
                sent.append(await producer.send_batch(batch, topic, partition=event.partition))
                batch = batches[event.partition] = producer.create_batch()
                batch.append(key=event.key, value=event.value, timestamp=now_ms)
        for partition, batch in batches.items():
            sent.append(await producer.send_batch(batch, topic, partition=partition))
        await asyncio.gather(*sent)
        return len(workload.events) / (time.perf_counter() - started)
    finally:
        await producer.stop()


# --------------------------------------------------------------------------- workers


async def run_worker(scenario: str, spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """``python -m benchmarks.worker`` in a fresh process; its last stdout line is the result."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.worker", scenario, json.dumps(spec),
        cwd=REPO, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        preexec_fn=infra.die_with_parent,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout_s)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise BenchmarkError(f"worker {scenario} did not finish within {timeout_s:.0f} s") from None
    lines = out.decode().strip().splitlines()
    if process.returncode != 0 or not lines:
        tail = err.decode(errors="replace").strip().splitlines()[-15:]
        raise BenchmarkError(f"worker {scenario} failed ({process.returncode}):\n" + "\n".join(tail))
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def _rate(result: dict[str, Any]) -> float:
    return result["events"] / result["seconds"] if result["seconds"] else 0.0


async def bare_consumer(run: Run) -> dict[str, Any]:
    """(a) aiokafka with the engine's fetch settings, reading and discarding every event."""
    spec = {"bootstrap": run.broker.bootstrap_servers, "topic": run.activity_topic,
            "partitions": run.config.partitions, "events": len(run.workload.events)}
    result = await run_worker("bare_consumer", spec, timeout_s=600)
    return {"events_per_s": _rate(result), **result}


async def batch_writer(run: Run) -> dict[str, Any]:
    """(b) BatchWriter.write on batches from memory, against a fresh seeded database."""
    assert run.template is not None
    database = await run.databases.create("b", template=run.template)
    try:
        url = run.databases.url(database)
        spec = {"database_url": url, "topic": run.activity_topic,
                "events_file": str(run.events_file)}
        async with PostgresCpu(url, database) as postgres:
            worker = asyncio.ensure_future(run_worker("batch_writer", spec, timeout_s=1800))
            postgres_s = await postgres.sample_until(worker)
            result = worker.result()
        result["postgres_cpu_seconds"] = postgres_s
        result["check"] = await check_database(run, url, published=False)
    finally:
        await run.databases.drop(database)
    result["events_per_s"] = _rate(result)
    result["decode_events_per_s"] = result["events"] / result["decode_seconds"]
    result["engine_cpu_us_per_event"] = result["cpu_seconds"] / result["events"] * 1e6
    result["postgres_cpu_us_per_event"] = result["postgres_cpu_seconds"] / result["events"] * 1e6
    return result


async def per_event(run: Run) -> dict[str, Any]:
    """(d) consume -> one transaction -> one offset commit, for every event; time-boxed."""
    assert run.template is not None
    database = await run.databases.create("d", template=run.template)
    try:
        spec = {"bootstrap": run.broker.bootstrap_servers, "database_url": run.databases.url(database),
                "topic": run.activity_topic, "partitions": run.config.partitions,
                "group_id": f"{run.prefix}-d-{run.next_serial()}",
                "seconds": run.config.per_event_seconds}
        result = await run_worker("per_event", spec, timeout_s=run.config.per_event_seconds + 120)
    finally:
        await run.databases.drop(database)
    return {"events_per_s": _rate(result), **result}


# --------------------------------------------------------------------------- checks


async def check_database(run: Run, url: str, *, published: bool, timeout_s: float = 60) -> str:
    """'ok', or what differs from the workload's expectations.

    Every distinct session counted once in this year's summary, every reached milestone recorded
    once, and (``published``) every one of them sent by the outbox.
    """
    expected_sessions = run.workload.distinct
    expected_records = run.workload.expected_milestones(run.config.thresholds)
    connection = await asyncpg.connect(url, timeout=15)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            sessions = await connection.fetchval(
                "SELECT coalesce(sum(session_count), 0) FROM annual_summary WHERE year = $1", run.year
            )
            records, sent = await connection.fetchrow(
                "SELECT count(*), count(*) FILTER (WHERE status = 'published')"
                " FROM scenario_notifications WHERE year = $1", run.year,
            )
            done = sessions == expected_sessions and records == expected_records
            if done and (not published or sent == records):
                return "ok"
            if time.monotonic() > deadline:
                return (f"sessions {sessions}/{expected_sessions}, records {records}/{expected_records}, "
                        f"published {sent}/{records}")
            await asyncio.sleep(0.2)
    finally:
        await connection.close()


# --------------------------------------------------------------------------- engines


async def _engine_topics(run: Run, serial: int) -> dict[str, str]:
    topics = {
        "activity": run.activity_topic,
        "preferences": run.preferences_topic,
        "notifications": f"{run.prefix}-notifications-{serial}",
        "dlq": f"{run.prefix}-dlq-{serial}",
    }
    await infra.create_topics(run.broker.bootstrap_servers,
                              [topics["notifications"], topics["dlq"]], run.config.partitions)
    return topics


async def run_engines(run: Run, count: int, label: str, *, profile_to: Path | None = None) -> dict[str, Any]:
    """``count`` engines in one group drain the backlog; timed from the outside."""
    assert run.template is not None
    serial = run.next_serial()
    database = await run.databases.create(label, template=run.template)
    url = run.databases.url(database)
    group = f"{run.prefix}-{label}-{serial}"
    env = engine_env(bootstrap=run.broker.bootstrap_servers, database_url=url, group_id=group,
                     topics=await _engine_topics(run, serial))
    engines = [
        EngineProcess(f"{label}{i}", {**env, "MILESTONES_METRICS_PORT": str(infra.free_port())})
        for i in range(count)
    ]
    tps = [TopicPartition(run.activity_topic, p) for p in range(run.config.partitions)]
    total = len(run.workload.events)
    profiler: profiling.Profiler | None = None
    try:
        async with (
            OffsetWatcher(run.broker.bootstrap_servers, group, tps) as watcher,
            PostgresCpu(url, database) as postgres,
        ):
            for engine in engines:
                await engine.start()
            if profile_to is not None:
                profiler = profiling.Profiler(engines[0], profile_to)
                profiler.start_when_assigned()
            timeline, finished = await watch(
                engines, watcher, total=total, broker_pid=run.broker.process.pid,
                postgres=postgres, timeout_s=max(180.0, total / 1000),
            )
        if profiler is not None:
            await profiler.stop()
        if finished is None:
            tails = "\n".join(f"--- {e.name}\n{e.log_tail()}" for e in engines)
            raise BenchmarkError(f"{label}: the engine did not commit all {total:,} offsets:\n{tails}")
        start = window_start(engines)
        if start is None:
            raise BenchmarkError(f"{label}: no 'assigned N partition(s)' line in the engine's log")
        spawned = min(engine.spawned_at for engine in engines)
        before = timeline.at(start).committed
        result: dict[str, Any] = {
            "events": total,
            "seconds": finished - start,
            "events_per_s": (total - before) / (finished - start),
            "committed_before_window": before,
            "seconds_with_start": finished - spawned,
            "events_per_s_with_start": total / (finished - spawned),
            "join_seconds": start - spawned,
            "cpu": cpu_shares(timeline, start, finished),
            "rss_mb_10_50_90_100": timeline.rss_profile(start, finished),
        }
        done = max(1, total - before)
        cpu = result["cpu"]
        result["engine_cpu_us_per_event"] = sum(cpu["engine_cores"]) * result["seconds"] / done * 1e6
        result["postgres_cpu_us_per_event"] = cpu["postgres_cores"] * result["seconds"] / done * 1e6
        result["check"] = await check_database(run, url, published=True)
        metrics = [await engine.metrics() for engine in engines]
        batches = sum(m.get("milestones_batches_total", 0.0) for m in metrics)
        result["batches"] = int(batches)
        result["mean_batch"] = round(total / batches, 1) if batches else None
        result["peak_rss_mb"] = [round(peak_rss_mb(engine.pid), 1) for engine in engines]
        codes = [await engine.stop() for engine in engines]
        if any(code != 0 for code in codes):
            result["check"] += f"; exit statuses {codes}"
        if profiler is not None:
            result["profile"] = profiler.summary()
        return result
    finally:
        if profiler is not None:
            await profiler.stop()
        for engine in engines:
            await engine.stop()
        await run.databases.drop(database)


async def one_engine(run: Run) -> dict[str, Any]:
    """(c) ``milestones run`` alone."""
    return await run_engines(run, 1, "c")


async def two_engines(run: Run) -> dict[str, Any]:
    """(e) two ``milestones run`` in one group; timed once both hold partitions."""
    return await run_engines(run, 2, "e")


async def profiled_engine(run: Run) -> dict[str, Any]:
    """An extra (c) under py-spy (not part of the medians): where the engine's CPU goes."""
    # Beside the results, so the raw stacks outlive the run (flamegraph.pl reads them as they are).
    result = await run_engines(run, 1, "p", profile_to=Path(run.config.output).parent)
    profile: dict[str, Any] = result.pop("profile", {})
    profile["events_per_s_while_profiled"] = result["events_per_s"]
    profile["cpu"] = result["cpu"]
    return profile


# --------------------------------------------------------------------------- latency

# Statement-level, so one notification per batch transaction; delivered by the server at
# COMMIT, which is the moment a reader could see the new count. The payload is the 32-bit
# transaction id, the ledger rows' xmin.
NOTIFY_TRIGGER = """
CREATE FUNCTION bench_notify_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('bench_commit', (txid_current() % 4294967296)::text);
    RETURN NULL;
END $$;
CREATE TRIGGER bench_notify_commit AFTER INSERT ON activity_ledger
    FOR EACH STATEMENT EXECUTE FUNCTION bench_notify_commit();
"""


def percentile(values: Sequence[float], share: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


async def latency(run: Run) -> dict[str, Any]:
    """(f) a steady ``latency_rate`` events/s into an idle engine; per-event latencies."""
    assert run.template is not None
    config = run.config
    serial = run.next_serial()
    database = await run.databases.create("f", template=run.template)
    url = run.databases.url(database)
    count = int(config.latency_rate * config.latency_seconds)
    mentors = make_mentors(config.latency_mentors, config.seed + serial)
    workload = make_workload(events=count, mentors=mentors, partitions=config.partitions,
                             seed=config.seed + serial, duplicate_share=config.duplicate_share)
    topics = {
        "activity": f"{run.prefix}-latency-activity-{serial}",
        "preferences": f"{run.prefix}-latency-preferences-{serial}",
        "notifications": f"{run.prefix}-latency-notifications-{serial}",
        "dlq": f"{run.prefix}-latency-dlq-{serial}",
    }
    bootstrap = run.broker.bootstrap_servers
    await infra.create_topics(bootstrap, [topics["activity"], topics["notifications"], topics["dlq"]],
                              config.partitions)
    await infra.create_topics(bootstrap, [topics["preferences"]], 1)
    listener = await asyncpg.connect(url, timeout=15)
    engine = EngineProcess("f", engine_env(bootstrap=bootstrap, database_url=url,
                                           group_id=f"{run.prefix}-f-{serial}", topics=topics))
    commits: dict[int, float] = {}
    reached: list[tuple[str, int]] = []  # (activity_id, Kafka timestamp ms)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest")
    reading: asyncio.Task[None] | None = None
    try:
        await listener.execute(NOTIFY_TRIGGER)
        await listener.add_listener(
            "bench_commit", lambda *args: commits.setdefault(int(args[3]), time.time())
        )
        await engine.start()
        if not await infra.wait_for(_assigned(engine), 60):
            raise BenchmarkError(f"f: the engine joined no group:\n{engine.log_tail()}")
        await producer.start()
        await reader.start()
        reader.assign([TopicPartition(topics["notifications"], p) for p in range(config.partitions)])
        reading = asyncio.ensure_future(_read_notifications(reader, reached))
        await asyncio.sleep(run.config.latency_settle_s)
        produced_ms, achieved = await _produce_steadily(producer, topics["activity"], workload,
                                                        config.latency_rate)
        expected = workload.expected_milestones(config.thresholds)
        await infra.wait_for(_summary_reaches(listener, run.year, workload.distinct), 60, 0.1)
        await infra.wait_for(_count_at_least(reached, expected), 60, 0.1)
        rss = peak_rss_mb(engine.pid)
        rows = await listener.fetch(
            "SELECT activity_id::text AS id, xmin::text::bigint AS xid FROM activity_ledger"
            " WHERE recorded_at >= to_timestamp($1)", min(produced_ms.values()) / 1000 - 60,
        )
        to_commit = [
            commits[row["xid"]] * 1000 - produced_ms[row["id"]]
            for row in rows if row["xid"] in commits and row["id"] in produced_ms
        ]
        to_reached = [stamp - produced_ms[a] for a, stamp in reached if a in produced_ms]
        first_ms = min(produced_ms.values())
        slowest = sorted(((stamp - produced_ms[a], (produced_ms[a] - first_ms) / 1000)
                          for a, stamp in reached if a in produced_ms), reverse=True)[:5]
        code = await engine.stop()
    finally:
        if reading is not None:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reading
        for client in (producer, reader):
            with contextlib.suppress(Exception):
                await client.stop()
        await engine.stop()
        await listener.close()
        await run.databases.drop(database)
    check = "ok" if len(to_commit) == workload.distinct and len(to_reached) == expected else (
        f"commits seen for {len(to_commit)}/{workload.distinct} sessions, "
        f"milestones {len(to_reached)}/{expected}")
    if code != 0:
        check += f"; exit status {code}"
    return {
        "events": count, "rate_achieved": achieved,
        "commit_p50_ms": percentile(to_commit, 0.50), "commit_p99_ms": percentile(to_commit, 0.99),
        "commit_max_ms": max(to_commit, default=float("nan")),
        "milestone_p50_ms": percentile(to_reached, 0.50),
        "milestone_p99_ms": percentile(to_reached, 0.99),
        "milestone_max_ms": max(to_reached, default=float("nan")),
        "milestones": len(to_reached), "peak_rss_mb": [round(rss, 1)], "check": check,
        # (latency ms, seconds into the run) of the slowest notifications: a start-up effect or not
        "slowest_milestones": [(round(ms), round(at, 2)) for ms, at in slowest],
        "mean_commit_ms": statistics.fmean(to_commit) if to_commit else float("nan"),
    }


def _assigned(engine: EngineProcess) -> Any:
    async def predicate() -> bool:
        if engine.exited:
            raise BenchmarkError(f"the engine exited at start:\n{engine.log_tail()}")
        return engine.first_assignment() is not None
    return predicate


def _summary_reaches(connection: asyncpg.Connection, year: int, target: int) -> Any:
    async def predicate() -> bool:
        value = await connection.fetchval(
            "SELECT coalesce(sum(session_count), 0) FROM annual_summary WHERE year = $1", year)
        return bool(value >= target)
    return predicate


def _count_at_least(items: list[Any], target: int) -> Any:
    async def predicate() -> bool:
        return len(items) >= target
    return predicate


async def _read_notifications(reader: AIOKafkaConsumer, reached: list[tuple[str, int]]) -> None:
    await reader.seek_to_beginning()
    while True:
        batch = await reader.getmany(timeout_ms=200)
        for records in batch.values():
            for record in records:
                activity_id = json.loads(record.value).get("activity_id")
                if activity_id:
                    reached.append((activity_id, record.timestamp))


async def _produce_steadily(
    producer: AIOKafkaProducer, topic: str, workload: Workload, rate: int
) -> tuple[dict[str, float], float]:
    """Send event i at ``start + i / rate``; return each activity's first producer timestamp."""
    produced: dict[str, float] = {}
    pending = []
    started = time.perf_counter()
    for index, event in enumerate(workload.events):
        delay = started + index / rate - time.perf_counter()
        if delay > 0.002:
            await asyncio.sleep(delay)
        now_ms = int(time.time() * 1000)
        pending.append(await producer.send(topic, event.value, key=event.key,
                                           partition=event.partition, timestamp_ms=now_ms))
        produced.setdefault(event.activity_id, now_ms)
        if len(pending) >= 1000:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)
    return produced, len(workload.events) / (time.perf_counter() - started)



