"""Helpers for end-to-end tests: the real ``milestones`` process, the real broker and database."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar
from uuid import UUID, uuid5

import asyncpg
import pytest

from tests.support.events import NOTIFICATION_NAMESPACE
from tests.support.kafka import KafkaHelper, Record

T = TypeVar("T")


def nid(mentor: str | UUID, year: int, value: int) -> str:
    """The contract's notification_id, computed independently of the engine's code."""
    return str(uuid5(NOTIFICATION_NAMESPACE, f"{str(mentor).lower()}:{year}:{value}"))


async def eventually(
    probe: Callable[[], Awaitable[T]], accept: Callable[[T], bool], timeout_s: float = 30.0
) -> T:
    """Call ``probe`` until ``accept`` holds for its answer; fail with the last answer."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await probe()
        if accept(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached in {timeout_s} s; last value: {value!r}")
        await asyncio.sleep(0.2)


class Db:
    def __init__(self, connection: asyncpg.Connection) -> None:
        self.connection = connection

    async def counts(self) -> dict[tuple[str, int], int]:
        try:
            rows = await self.connection.fetch("SELECT user_id, year, session_count FROM annual_summary")
        except asyncpg.UndefinedTableError:  # the engine has not migrated yet
            return {}
        return {(str(row["user_id"]), row["year"]): row["session_count"] for row in rows}

    async def records(self) -> list[dict[str, Any]]:
        try:
            rows = await self.connection.fetch(
                "SELECT * FROM scenario_notifications ORDER BY user_id, year, milestone_value"
            )
        except asyncpg.UndefinedTableError:  # the engine has not migrated yet
            return []
        return [dict(row) for row in rows]

    async def statuses(self) -> dict[tuple[str, int, int], str]:
        return {
            (str(row["user_id"]), row["year"], row["milestone_value"]): row["status"]
            for row in await self.records()
        }


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Db]:
    connection = await asyncpg.connect(database_url)
    try:
        yield Db(connection)
    finally:
        await connection.close()


def notification_ids(records: list[Record]) -> list[str]:
    return [record.json()["notification_id"] for record in records]


async def settle_notifications(
    kafka: KafkaHelper, topic: str, expected: set[str], timeout_s: float = 30.0
) -> list[Record]:
    """Wait until every expected notification is on the topic, then a little longer so a
    duplicate or an unexpected one would show up too."""
    await kafka.wait_for(topic, lambda rs: expected <= set(notification_ids(rs)), timeout_s)
    await asyncio.sleep(1.5)
    return await kafka.read_all(topic)


@pytest.fixture
def silent_broker() -> Iterator[str]:
    """A port that accepts connections and never answers: a frozen broker."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield f"127.0.0.1:{listener.getsockname()[1]}"


@pytest.fixture
def stopped_broker() -> str:
    """A port nothing listens on: a stopped broker."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"
