"""Driving ``milestones run`` as real processes and watching them from the outside.

Progress is the consumer group's committed offsets (what an operator's lag tool sees), polled
every ``POLL_S``; the moment an instance starts working is its ``assigned N partition(s)`` log
line. CPU shares come from /proc, so the figures say which process was busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition

from benchmarks.infra import LOCALHOST, die_with_parent

REPO = Path(__file__).resolve().parents[1]
POLL_S = 0.05
_ASSIGNED = re.compile(r"assigned (\d+) partition")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            fields = file.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def _status_mib(pid: int, field: str) -> float:
    """A memory line of /proc/PID/status, in MiB (0 once the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as file:
            for line in file:
                if line.startswith(field):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def peak_rss_mb(pid: int) -> float:
    """VmHWM, the process's peak resident set, in MiB (0 once it is gone)."""
    return _status_mib(pid, "VmHWM:")


def rss_mb(pid: int) -> float:
    """VmRSS, the process's resident set now, in MiB (0 once it is gone)."""
    return _status_mib(pid, "VmRSS:")


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot."""
    with open("/proc/stat") as file:
        values = [int(part) for part in file.readline().split()[1:]]
    idle = values[3] + values[4]
    total = sum(values[:8])
    return (total - idle) / _CLOCK_TICKS, total / _CLOCK_TICKS


class EngineProcess:
    """One ``python -m consumer run``; its log is read line by line as it arrives."""

    def __init__(self, name: str, env: Mapping[str, str]) -> None:
        self.name = name
        self.env = dict(env)
        self.process: asyncio.subprocess.Process | None = None
        self.spawned_at = 0.0
        self.assignments: list[tuple[float, int]] = []
        self.tail: deque[str] = deque(maxlen=40)
        self.assigned = asyncio.Event()  # set at the first non-empty assignment (or at exit)
        self._reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self, extra_args: Sequence[str] = ()) -> None:
        env = {**os.environ, **self.env}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        self.spawned_at = time.time()
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, *extra_args, "-m", "consumer", "run",
            env=env, cwd=REPO, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            preexec_fn=die_with_parent,
        )
        self._reader = asyncio.ensure_future(self._read_log())

    async def _read_log(self) -> None:
        assert self.process is not None
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.tail.append(line)
            match = _ASSIGNED.search(line)
            if match:
                self.assignments.append((time.time(), int(match.group(1))))
                if int(match.group(1)):
                    self.assigned.set()
        self.assigned.set()  # the log ended: the process is gone; waiters look at ``exited``

    @property
    def exited(self) -> bool:
        return self.process is not None and self.process.returncode is not None

    def first_assignment(self) -> float | None:
        return next((t for t, n in self.assignments if n > 0), None)

    async def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, as an operator stops it; SIGKILL after ``timeout_s``. Returns the status."""
        process = self.process
        if process is None:
            return None
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), timeout_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 5)
        return process.returncode

    def log_tail(self) -> str:
        return "\n".join(self.tail)

    async def metrics(self) -> dict[str, float]:
        """The engine's /metrics, unlabelled series summed by name (empty when it is off)."""
        port = int(self.env.get("MILESTONES_METRICS_PORT", "0"))
        if not port:
            return {}
        try:
            reader, writer = await asyncio.open_connection(LOCALHOST, port)
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")
            body = (await asyncio.wait_for(reader.read(), 5)).decode(errors="replace")
            writer.close()
        except (OSError, TimeoutError):
            return {}
        values: dict[str, float] = {}
        for line in body.split("\r\n\r\n", 1)[-1].splitlines():
            if line and not line.startswith("#"):
                name, _, number = line.rpartition(" ")
                key = name.split("{", 1)[0] + (name[name.find("{"):] if "outcome" in name else "")
                values[key] = values.get(key, 0.0) + float(number)
        return values


def engine_env(
    *,
    bootstrap: str,
    database_url: str,
    group_id: str,
    topics: Mapping[str, str],
    session_timeout_ms: int = 2000,
    metrics_port: int = 0,
) -> dict[str, str]:
    return {
        "MILESTONES_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "MILESTONES_DATABASE_URL": database_url,
        "MILESTONES_GROUP_ID": group_id,
        "MILESTONES_ACTIVITY_TOPIC": topics["activity"],
        "MILESTONES_PREFERENCES_TOPIC": topics["preferences"],
        "MILESTONES_NOTIFICATION_TOPIC": topics["notifications"],
        "MILESTONES_DLQ_TOPIC": topics["dlq"],
        "MILESTONES_KAFKA_SESSION_TIMEOUT_MS": str(session_timeout_ms),
        "MILESTONES_METRICS_PORT": str(metrics_port),
        "MILESTONES_LOG_LEVEL": "INFO",
    }


class PostgresCpu:
    """CPU of the server processes working for one database: its backends and the shared
    writers (WAL writer, checkpointer, background writer), found in pg_stat_activity."""

    REFRESH_S = 1.0

    def __init__(self, url: str, database: str) -> None:
        self._url = url
        self._database = database
        self._seen: dict[int, float] = {}  # pid -> its CPU seconds when last read
        self._refreshed = 0.0
        self._connection: asyncpg.Connection | None = None

    async def __aenter__(self) -> PostgresCpu:
        self._connection = await asyncpg.connect(self._url, timeout=15)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._connection is not None:
            await self._connection.close()

    async def cpu_s(self) -> float:
        if self._connection is not None and time.monotonic() - self._refreshed > self.REFRESH_S:
            self._refreshed = time.monotonic()
            rows = await self._connection.fetch(
                "SELECT pid FROM pg_stat_activity WHERE (datname = $1 AND pid <> pg_backend_pid())"
                " OR backend_type IN ('walwriter', 'checkpointer', 'background writer')",
                self._database,
            )
            for row in rows:
                self._seen.setdefault(row["pid"], 0.0)
        for pid in self._seen:  # a process that is gone keeps its last reading
            self._seen[pid] = max(self._seen[pid], process_cpu_s(pid))
        return sum(self._seen.values())

    async def sample_until(self, done: asyncio.Future[Any], interval_s: float = 0.25) -> float:
        """Sample until ``done`` completes; the CPU seconds used meanwhile."""
        start = await self.cpu_s()
        while not done.done():
            await asyncio.wait({done}, timeout=interval_s)
            await self.cpu_s()
        return await self.cpu_s() - start


@dataclass
class Sample:
    at: float
    committed: int
    machine_busy_s: float
    machine_total_s: float
    engine_cpu_s: list[float]
    broker_cpu_s: float
    own_cpu_s: float
    postgres_cpu_s: float
    engine_rss_mb: list[float]


@dataclass
class Timeline:
    samples: list[Sample] = field(default_factory=list)

    def at(self, moment: float) -> Sample:
        """The sample nearest ``moment``, committed offsets interpolated linearly."""
        samples = self.samples
        after = next((i for i, s in enumerate(samples) if s.at >= moment), len(samples) - 1)
        if after == 0:
            return samples[0]
        a, b = samples[after - 1], samples[after]
        if b.at <= a.at:
            return b
        share = min(1.0, max(0.0, (moment - a.at) / (b.at - a.at)))
        nearest = a if share < 0.5 else b
        return Sample(
            moment, round(a.committed + share * (b.committed - a.committed)),
            nearest.machine_busy_s, nearest.machine_total_s, nearest.engine_cpu_s,
            nearest.broker_cpu_s, nearest.own_cpu_s, nearest.postgres_cpu_s, nearest.engine_rss_mb,
        )

    def rss_profile(self, start: float, end: float) -> list[list[float]]:
        """Each engine's resident set at 10 %, 50 % and 90 % of the window and at its end: a
        figure that grows with the events processed is a leak, one that is flat is a buffer."""
        moments = [start + share * (end - start) for share in (0.1, 0.5, 0.9, 1.0)]
        readings = [self.at(moment).engine_rss_mb for moment in moments]
        return [[round(reading[i], 1) for reading in readings] for i in range(len(readings[0]))]


class OffsetWatcher:
    """Reads a group's committed offsets (OffsetFetch) without joining the group."""

    def __init__(self, bootstrap: str, group_id: str, tps: Sequence[TopicPartition]) -> None:
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, group_id=group_id, enable_auto_commit=False
        )
        self._tps = list(tps)

    async def __aenter__(self) -> OffsetWatcher:
        await self._consumer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._consumer.stop()

    async def committed(self) -> int:
        total = 0
        for tp in self._tps:
            offset = await self._consumer.committed(tp)
            total += offset or 0
        return total


async def watch(
    engines: Sequence[EngineProcess],
    watcher: OffsetWatcher,
    *,
    total: int,
    broker_pid: int,
    postgres: PostgresCpu,
    timeout_s: float,
) -> tuple[Timeline, float | None]:
    """Poll until ``total`` offsets are committed; return the timeline and the finishing time."""
    timeline = Timeline()
    deadline = time.monotonic() + timeout_s
    own = os.getpid()
    while time.monotonic() < deadline:
        committed = await watcher.committed()
        busy, all_s = machine_cpu()
        timeline.samples.append(Sample(
            time.time(), committed, busy, all_s,
            [process_cpu_s(engine.pid) for engine in engines],
            process_cpu_s(broker_pid), process_cpu_s(own), await postgres.cpu_s(),
            [rss_mb(engine.pid) for engine in engines],
        ))
        if committed >= total:
            return timeline, timeline.samples[-1].at
        if any(engine.exited for engine in engines):
            return timeline, None
        await asyncio.sleep(POLL_S)
    return timeline, None


def window_start(engines: Sequence[EngineProcess]) -> float | None:
    """The first moment every instance holds partitions: the group is complete from then on."""
    events = sorted(
        (t, index, n) for index, engine in enumerate(engines) for t, n in engine.assignments
    )
    latest = [0] * len(engines)
    for moment, index, count in events:
        latest[index] = count
        if all(latest):
            return moment
    return None


def cpu_shares(timeline: Timeline, start: float, end: float) -> dict[str, Any]:
    """Each component's CPU over the window, in cores (2.0 = both cores of this machine busy)."""
    a, b = timeline.at(start), timeline.at(end)
    seconds = max(1e-9, b.at - a.at)
    machine = (b.machine_busy_s - a.machine_busy_s) / seconds
    engines = [(y - x) / seconds for x, y in zip(a.engine_cpu_s, b.engine_cpu_s, strict=True)]
    broker = (b.broker_cpu_s - a.broker_cpu_s) / seconds
    harness = (b.own_cpu_s - a.own_cpu_s) / seconds
    postgres = (b.postgres_cpu_s - a.postgres_cpu_s) / seconds
    return {
        "machine_cores_busy": round(machine, 2),
        "engine_cores": [round(value, 2) for value in engines],
        "postgres_cores": round(postgres, 2),
        "broker_cores": round(broker, 2),
        "harness_cores": round(harness, 2),
        # Whatever else ran: other tenants of a shared machine, the kernel's own work.
        "other_cores": round(max(0.0, machine - sum(engines) - postgres - broker - harness), 2),
    }
