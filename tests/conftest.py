"""Fixtures: a real broker and a real PostgreSQL for the session, and per test its own topics,
its own database, a Kafka client and the engine as a process. Each fixture removes what it made.

Environment:
- ``MILESTONES_TEST_KAFKA_BOOTSTRAP_SERVERS``: use this broker instead of an embedded Tansu.
- ``MILESTONES_TEST_DATABASE_URL``: a superuser ``postgresql://`` URL used to create and drop
  the per-test databases; without it, the local server on 127.0.0.1:5432 if it answers, else an
  embedded PostgreSQL. ``embedded`` forces the embedded one.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from devstack.broker import start_broker
from devstack.postgres import start_postgres
from devstack.processes import free_port
from tests.support.engine import EngineLauncher
from tests.support.kafka import KafkaHelper
from tests.support.postgres import (
    LOCAL_ADMIN_DSN,
    can_connect,
    create_database,
    drop_database,
    run_in_thread,
)
from tests.support.topics import Topics

TopicsFactory = Callable[..., Awaitable[Topics]]
EMBEDDED = "embedded"


@pytest.fixture(scope="session")
def broker() -> Iterator[str]:
    """Bootstrap servers ``host:port`` of the session's broker."""
    configured = os.environ.get("MILESTONES_TEST_KAFKA_BOOTSTRAP_SERVERS", "")
    if configured and configured != EMBEDDED:
        yield configured
        return
    embedded = start_broker()
    try:
        yield embedded.bootstrap_servers
    finally:
        embedded.stop()


@pytest.fixture(scope="session")
def postgres_admin_dsn() -> Iterator[str]:
    """A superuser DSN on the session's PostgreSQL server (its ``postgres`` database)."""
    configured = os.environ.get("MILESTONES_TEST_DATABASE_URL", "")
    if configured and configured != EMBEDDED:
        yield configured
        return
    if configured != EMBEDDED and run_in_thread(lambda: can_connect(LOCAL_ADMIN_DSN)):
        yield LOCAL_ADMIN_DSN
        return
    embedded = start_postgres()
    try:
        yield embedded.dsn
    finally:
        embedded.stop()


@pytest.fixture
async def database_url(postgres_admin_dsn: str) -> AsyncIterator[str]:
    """A fresh, empty database ``ms_test_<random>`` for this test, dropped afterwards."""
    name, dsn = await create_database(postgres_admin_dsn)
    try:
        yield dsn
    finally:
        await drop_database(postgres_admin_dsn, name)


@pytest.fixture
async def kafka(broker: str) -> AsyncIterator[KafkaHelper]:
    helper = KafkaHelper(broker)
    try:
        yield helper
    finally:
        await helper.close()


@pytest.fixture
async def topics_factory(broker: str) -> AsyncIterator[TopicsFactory]:
    """``await topics_factory(activity=8, dlq=2)``: another set of unique, created topics."""
    made: list[Topics] = []
    helper = KafkaHelper(broker)

    async def make(**partitions: int) -> Topics:
        topics = Topics.unique(partitions)
        await helper.create_topics_with_counts(topics.partitions_by_name())
        made.append(topics)
        return topics

    try:
        yield make
    finally:
        await helper.delete_topics([name for topics in made for name in topics.names])
        await helper.close()


@pytest.fixture
async def topics(request: pytest.FixtureRequest, topics_factory: TopicsFactory) -> Topics:
    """This test's four topics (partitions: activity 4, preferences 2, notifications 2, dlq 1).
    Other counts: ``@pytest.mark.parametrize("topics", [{"activity": 8}], indirect=True)``."""
    partitions: dict[str, int] = getattr(request, "param", None) or {}
    return await topics_factory(**partitions)


@pytest.fixture
def engine_env(broker: str, database_url: str, topics: Topics) -> dict[str, str]:
    """The environment of a ``milestones`` process for this test's broker, database and topics.

    Inherited ``MILESTONES_*`` variables are dropped so a developer's shell cannot change what
    a test sees."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("MILESTONES_")}
    env.update(topics.env())
    env.update(
        {
            "MILESTONES_KAFKA_BOOTSTRAP_SERVERS": broker,
            "MILESTONES_DATABASE_URL": database_url,
            "MILESTONES_GROUP_ID": f"ms-test-{secrets.token_hex(4)}",
            # Tansu accepts a short session (a join waits about half of it); a real Kafka
            # refuses anything under its group.min.session.timeout.ms (6 s by default).
            "MILESTONES_KAFKA_SESSION_TIMEOUT_MS": (
                "6000" if os.environ.get("MILESTONES_TEST_KAFKA_BOOTSTRAP_SERVERS") else "2000"
            ),
            "MILESTONES_METRICS_PORT": str(free_port()),
            "MILESTONES_SHUTDOWN_TIMEOUT_S": "5",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


@pytest.fixture
def engine_process(engine_env: dict[str, str], tmp_path: Path) -> Iterator[EngineLauncher]:
    """``engine_process(extra_env=None, args=("run",))`` starts ``python -m consumer *args``."""
    launcher = EngineLauncher(engine_env, tmp_path)
    try:
        yield launcher
    finally:
        launcher.kill_all()
