"""The measurements that run as plain Python workers, each in a fresh process.

``python -m benchmarks.worker SCENARIO SPEC_JSON`` runs one scenario and prints one JSON line:
  bare_consumer   (a) aiokafka reads and discards the events, with the engine's fetch settings
  batch_writer    (b) the engine's BatchWriter fed from memory, batches of the engine's size
  per_event       (d) consume -> one transaction -> commit offset, one event at a time

The engine's own code does the work wherever there is engine code to do it (decode, plan, the
batch transaction, the consumer's settings), so an optimization there shows up here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import pickle
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiokafka import TopicPartition

from consumer import runtime
from consumer.ops.metrics import Metrics
from consumer.settings import Settings, load_settings
from consumer.store.postgres import connect_pool
from consumer.stream.decode import ACTIVITY_EVENTS, Decoded, decode
from consumer.stream.kafka import make_consumer
from consumer.stream.writer import BatchWriter


@dataclass(frozen=True, slots=True)
class MemoryRecord:
    """What the engine reads of an aiokafka ConsumerRecord, built from memory."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes
    value: bytes


def peak_rss_mb() -> float:
    """This process's peak resident set in MiB: VmHWM, which starts afresh at exec.

    Not ``getrusage().ru_maxrss``: Linux carries that over exec, so a worker forked from the
    harness (which holds the whole workload) would report the harness's size.
    """
    with contextlib.suppress(OSError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: KiB there


def _load_events(path: str) -> list[tuple[int, bytes, bytes]]:
    with open(path, "rb") as file:
        events: list[tuple[int, bytes, bytes]] = pickle.load(file)
    return events


def _settings(spec: dict[str, Any]) -> Settings:
    return load_settings(
        kafka_bootstrap_servers=spec.get("bootstrap"),
        database_url=spec.get("database_url"),
    )


def _writer(settings: Settings, pool: Any) -> BatchWriter:
    # As the service builds it: (b) is the engine's own writer.
    return runtime.batch_writer(settings, pool, Metrics(), writer_class=BatchWriter)


async def bare_consumer(spec: dict[str, Any]) -> dict[str, Any]:
    """(a) The broker side's ceiling: fetch everything, touch nothing."""
    settings = _settings(spec)
    consumer = make_consumer(settings, group_id=None)
    await consumer.start()
    try:
        tps = [TopicPartition(spec["topic"], p) for p in range(spec["partitions"])]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        total, received = spec["events"], 0
        cpu0, started = time.process_time(), time.perf_counter()
        while received < total:
            batch = await consumer.getmany(
                timeout_ms=settings.poll_timeout_ms, max_records=settings.batch_max_records
            )
            received += sum(len(records) for records in batch.values())
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu0
    finally:
        await consumer.stop()
    return {"events": received, "seconds": elapsed, "cpu_seconds": cpu}


async def batch_writer(spec: dict[str, Any]) -> dict[str, Any]:
    """(b) The database side's ceiling: the engine's batch transaction, no Kafka.

    Batches are cut as a consumer draining the backlog gets them (partition by partition), so
    the mentors per batch match the engine's. Decoding happens outside the timed writes and is
    timed on its own.
    """
    settings = _settings(spec)
    events = await asyncio.to_thread(_load_events, spec["events_file"])
    events.sort(key=lambda event: event[0])
    now_ms = int(time.time() * 1000)
    offsets: dict[int, int] = {}
    records = []
    for partition, key, value in events:
        offset = offsets.get(partition, 0)
        offsets[partition] = offset + 1
        records.append(MemoryRecord(spec["topic"], partition, offset, now_ms, key, value))
    del events
    size = settings.batch_max_records
    pool = await connect_pool(settings.require_database(), timeout_s=15, max_size=4)
    try:
        writer = _writer(settings, pool)
        decode_s = write_s = 0.0
        cpu0 = time.process_time()
        for start in range(0, len(records), size):
            chunk = records[start:start + size]
            began = time.perf_counter()
            envelopes = []
            for position, record in enumerate(chunk):
                result = decode(record, accepts=ACTIVITY_EVENTS, now_ms=now_ms, position=position)
                if isinstance(result, Decoded):
                    envelopes.append(result.envelope)
            decoded = time.perf_counter()
            await writer.write(envelopes)
            decode_s += decoded - began
            write_s += time.perf_counter() - decoded
        cpu = time.process_time() - cpu0
    finally:
        await pool.close()
    return {
        "events": len(records), "seconds": write_s, "decode_seconds": decode_s,
        "batches": -(-len(records) // size), "batch_size": size, "cpu_seconds": cpu,
    }


async def per_event(spec: dict[str, Any]) -> dict[str, Any]:
    """(d) The naive design, time-boxed: each event its own transaction and offset commit."""
    settings = _settings(spec)
    consumer = make_consumer(settings, group_id=spec["group_id"])
    pool = await connect_pool(settings.require_database(), timeout_s=15, max_size=2)
    await consumer.start()
    try:
        writer = _writer(settings, pool)
        tps = [TopicPartition(spec["topic"], p) for p in range(spec["partitions"])]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        done = 0
        started = time.perf_counter()
        deadline = started + spec["seconds"]
        while (now := time.perf_counter()) < deadline:
            # One record per poll: aiokafka serves it from its prefetch buffer.
            batch = await consumer.getmany(timeout_ms=settings.poll_timeout_ms, max_records=1)
            for tp, records in batch.items():
                for record in records:
                    result = decode(record, accepts=ACTIVITY_EVENTS, position=0)
                    if isinstance(result, Decoded):
                        await writer.write([result.envelope])
                    await consumer.commit({tp: record.offset + 1})
                    done += 1
        elapsed = now - started
    finally:
        await consumer.stop()
        await pool.close()
    return {"events": done, "seconds": elapsed}


SCENARIOS: dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] = {
    "bare_consumer": bare_consumer,
    "batch_writer": batch_writer,
    "per_event": per_event,
}


def main(argv: list[str]) -> int:
    scenario, spec = argv[0], json.loads(argv[1])
    coroutine = SCENARIOS[scenario](spec)
    try:
        import uvloop  # the engine's CLI runs on uvloop when it is installed; so do we
    except ImportError:
        result = asyncio.run(coroutine)
    else:
        result = uvloop.run(coroutine)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
