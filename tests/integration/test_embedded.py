"""``devstack/``: the throwaway broker and PostgreSQL leave nothing behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from consumer.stream.admin import create_topics
from devstack.broker import async_embedded_broker, embedded_broker
from devstack.postgres import async_embedded_postgres

REPO_ROOT = Path(__file__).resolve().parents[2]


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def _eventually(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_embedded_broker_stops_and_frees_its_port() -> None:
    with embedded_broker() as broker:
        port, pid, workdir = broker.port, broker.pid, broker.workdir
        assert _listening(port)
        assert broker.bootstrap_servers == f"127.0.0.1:{port}"
    assert not _listening(port)
    assert not _alive(pid)
    assert not workdir.exists()


async def test_embedded_postgres_serves_and_is_removed() -> None:
    async with async_embedded_postgres() as pg:
        port, pid, workdir = pg.port, pg.pid, pg.workdir
        connection = await asyncpg.connect(pg.dsn)
        try:
            assert await connection.fetchval("SELECT current_user") == "postgres"
        finally:
            await connection.close()
    assert not _listening(port)
    assert not _alive(pid)
    assert not workdir.exists()


async def test_create_topics_leaves_existing_topics_alone() -> None:
    async with async_embedded_broker() as broker:
        await create_topics(broker.bootstrap_servers, ["a", "b"], {"a": 3})
        await create_topics(broker.bootstrap_servers, ["a", "b", "c"], 5)
        admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
        await admin.start()
        try:
            described = await admin.describe_topics(["a", "b", "c"])
        finally:
            await admin.close()
    counts = {topic["topic"]: len(topic["partitions"]) for topic in described}
    assert counts == {"a": 3, "b": 1, "c": 5}


_PARENT = """
import sys, time
from devstack.broker import embedded_broker
from devstack.postgres import embedded_postgres
with embedded_broker() as broker, embedded_postgres() as pg:
    print(broker.port, broker.pid, pg.port, pg.pid, flush=True)
    time.sleep(120)
"""


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_servers_end_with_their_parent(signum: signal.Signals) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=REPO_ROOT,
        text=True,
    )
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        broker_port, broker_pid, pg_port, pg_pid = (int(word) for word in line.split())
        parent.send_signal(signum)
        parent.wait(30)

        assert _eventually(lambda: not _listening(broker_port) and not _listening(pg_port))
        assert _eventually(lambda: not _alive(broker_pid) and not _alive(pg_pid))
    finally:
        parent.kill()
        parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
