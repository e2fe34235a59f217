"""What every fault test checks at the end, and the traffic it sends to get there.

The end state is checked in the database (the count of every mentor's year, the records) and on
the notification topic (every expected ``notification_id`` once, nothing else), after the
engines have been stopped, so that a late duplicate cannot slip in after the check.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg

from tests.support import events
from tests.support.engine import EngineProcess
from tests.support.kafka import KafkaHelper, Record
from tests.support.topics import Topics

THRESHOLDS = (50, 100, 200)
OSLO = ZoneInfo("Europe/Oslo")


def session_time() -> tuple[str, int]:
    """An ``occurred_at`` an hour ago (never in the future, never a late year) and its year."""
    moment = datetime.now(UTC) - timedelta(hours=1)
    return moment.isoformat(), moment.astimezone(OSLO).year


def sessions(mentor: str, count: int, occurred_at: str) -> list[dict[str, Any]]:
    """``count`` distinct sessions of one mentor."""
    return [events.logged(mentor, occurred_at=occurred_at) for _ in range(count)]


def with_duplicates(items: Sequence[dict[str, Any]], count: int,
                    rng: random.Random) -> list[dict[str, Any]]:
    """``items`` plus ``count`` re-deliveries of some of them (the same event, byte for byte),
    each placed somewhere after its original so that it is a true redelivery."""
    keyed = [(float(index), item) for index, item in enumerate(items)]
    for index in rng.choices(range(len(items)), k=count):
        keyed.append((rng.uniform(index + 0.5, len(items)), items[index]))
    keyed.sort(key=lambda pair: pair[0])
    return [item for _, item in keyed]


def expected_ids(counts: Mapping[str, int], year: int) -> set[str]:
    return {
        events.notification_id(mentor, year, value)
        for mentor, count in counts.items()
        for value in THRESHOLDS
        if count >= value
    }


def notification_ids(records: Iterable[Record]) -> Counter[str]:
    found: Counter[str] = Counter()
    for record in records:
        found[record.header("notification_id") or record.json()["notification_id"]] += 1
    return found


async def until(predicate: Callable[[], bool], timeout_s: float | None = None,
                interval_s: float = 0.1) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout_s`` has passed (False)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while not predicate():
        if deadline is not None and time.monotonic() > deadline:
            return False
        await asyncio.sleep(interval_s)
    return True


async def _fetch(dsn: str, query: str, *args: Any) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        rows: list[asyncpg.Record] = await connection.fetch(query, *args)
        return rows
    finally:
        await connection.close()


async def pending_rows(dsn: str) -> int:
    try:
        rows = await _fetch(dsn, "SELECT count(*) AS n FROM scenario_notifications"
                                 " WHERE status = 'pending'")
    except asyncpg.UndefinedTableError:  # the engine has not migrated yet
        return -1
    return int(rows[0]["n"])


async def wait_until_emitted(
    kafka: KafkaHelper,
    topics: Topics,
    dsn: str,
    expected: set[str],
    *,
    timeout_s: float,
    describe: Callable[[], str] = lambda: "",
) -> None:
    """Until every expected id is on the topic and no record is still pending."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = await kafka.read_all(topics.notifications, timeout_s=30)
        seen = set(notification_ids(records))
        pending = await pending_rows(dsn)
        if expected <= seen and pending == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"after {timeout_s:g} s: {len(expected - seen)} of {len(expected)} expected"
                f" notifications missing, {pending} pending record(s)\n{describe()}"
            )
        await asyncio.sleep(0.5)


async def wait_until_counted(dsn: str, counts: Mapping[str, int], year: int, *,
                             timeout_s: float, describe: Callable[[], str] = lambda: "") -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            actual = await summary_counts(dsn, year)
        except asyncpg.UndefinedTableError:
            actual = {}
        if all(actual.get(mentor, 0) == count for mentor, count in counts.items()):
            return
        if time.monotonic() > deadline:
            wrong = {m: (actual.get(m, 0), c) for m, c in counts.items() if actual.get(m, 0) != c}
            raise AssertionError(
                f"after {timeout_s:g} s, {len(wrong)} mentor(s) not at their count"
                f" (actual, expected), e.g. {list(wrong.items())[:3]}\n{describe()}"
            )
        await asyncio.sleep(0.5)


async def summary_counts(dsn: str, year: int) -> dict[str, int]:
    rows = await _fetch(dsn, "SELECT user_id, session_count FROM annual_summary WHERE year = $1",
                        year)
    return {str(row["user_id"]): row["session_count"] for row in rows}


async def assert_end_state(
    kafka: KafkaHelper,
    topics: Topics,
    dsn: str,
    counts: Mapping[str, int],
    year: int,
) -> Counter[str]:
    """Exact counts, one record per milestone (published), each expected notification on the
    topic exactly once and nothing else. Returns the topic's id counts."""
    actual = await summary_counts(dsn, year)
    wrong = {m: (actual.get(m, 0), c) for m, c in counts.items() if actual.get(m, 0) != c}
    assert not wrong, f"counts differ (actual, expected): {list(wrong.items())[:5]}"
    expected = expected_ids(counts, year)
    rows = await _fetch(dsn, "SELECT id, status FROM scenario_notifications")
    recorded = Counter(str(row["id"]) for row in rows)
    assert set(recorded) == expected, (
        f"records: {len(set(recorded) - expected)} unexpected, "
        f"{len(expected - set(recorded))} missing"
    )
    statuses = Counter(row["status"] for row in rows)
    assert statuses == Counter({"published": len(expected)}), statuses
    on_topic = notification_ids(await kafka.read_all(topics.notifications, timeout_s=30))
    twice = {nid: n for nid, n in on_topic.items() if n > 1}
    assert not twice, f"{len(twice)} notification(s) emitted more than once: {twice}"
    assert set(on_topic) == expected, (
        f"topic: {len(set(on_topic) - expected)} unexpected, "
        f"{len(expected - set(on_topic))} missing"
    )
    return on_topic


async def stop_all(engines: Iterable[EngineProcess], timeout_s: float = 20.0) -> None:
    """SIGTERM every running engine and insist on exit status 0."""
    running = [engine for engine in engines if engine.running()]
    for engine in running:
        engine.thaw()
        engine.terminate()
    for engine in running:
        code = await engine.wait(timeout_s)
        assert code == 0, f"engine exited with {code}; output:\n{engine.output()[-4000:]}"


def outputs(engines: Iterable[EngineProcess], tail: int = 3000) -> str:
    return "\n".join(
        f"--- engine pid {engine.pid} (exit {engine.returncode}) ---\n{engine.output()[-tail:]}"
        for engine in engines
    )


def metric(text: str, name: str) -> float:
    """The sum of a metric's samples in a /metrics body (0 when absent)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, from /proc (Linux)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


async def committed_offsets(bootstrap_servers: str, group_id: str, topic: str) -> dict[int, int]:
    """The consumer group's committed offsets of ``topic``, by partition (as lag tools see them).

    Read with a consumer of the group that never subscribes (so it never joins): the admin
    client's OffsetFetch cannot decode Tansu's answer.
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition

    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers, group_id=group_id,
                              enable_auto_commit=False)
    await reader.start()
    try:
        await reader.topics()
        found: dict[int, int] = {}
        for partition in sorted(reader.partitions_for_topic(topic) or ()):
            offset = await reader.committed(TopicPartition(topic, partition))
            if offset is not None and offset >= 0:
                found[partition] = offset
        return found
    finally:
        await reader.stop()


async def wait_for_status(engine: EngineProcess, path: str, status: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            last, _ = await engine.get(path, timeout_s=2.0)
        except (OSError, TimeoutError) as error:
            last = error
        if last == status:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"{path} did not answer {status} in {timeout_s:g} s (last: {last})\n"
                         + engine.output()[-4000:])
