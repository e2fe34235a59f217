"""Finding a PostgreSQL server for the test session, and one fresh database per test."""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg

LOCAL_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
DATABASE_PREFIX = "ms_test_"

T = TypeVar("T")


def with_database(dsn: str, database: str) -> str:
    """``dsn`` (a ``postgresql://`` URL) pointing at ``database`` instead."""
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ValueError(f"expected a postgresql:// URL, got {parts.scheme!r}")
    return urlunsplit(parts._replace(path=f"/{database}"))


def run_in_thread(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion on a private loop in another thread, for session fixtures
    that must not touch the event loops pytest-asyncio manages."""
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(make()))
        except BaseException as exc:  # handed to the caller
            error.append(exc)

    thread = threading.Thread(target=target, name="test-support-probe")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


async def can_connect(dsn: str, timeout_s: float = 3.0) -> bool:
    try:
        connection = await asyncpg.connect(dsn, timeout=timeout_s)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    try:
        await connection.fetchval("SELECT 1")
        return True
    finally:
        await connection.close()


async def create_database(admin_dsn: str) -> tuple[str, str]:
    """Create ``ms_test_<random>``; return its name and DSN.

    From ``template0``: nobody is ever connected to it, so parallel creations cannot collide
    on a busy template."""
    name = f"{DATABASE_PREFIX}{secrets.token_hex(6)}"
    connection = await asyncpg.connect(admin_dsn)
    try:
        await connection.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    finally:
        await connection.close()
    return name, with_database(admin_dsn, name)


async def drop_database(admin_dsn: str, name: str) -> None:
    """Drop it, ending its sessions first (a test's engine process may still hold some)."""
    connection = await asyncpg.connect(admin_dsn)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


async def database_exists(admin_dsn: str, name: str) -> bool:
    connection = await asyncpg.connect(admin_dsn)
    try:
        found = await connection.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        return bool(found)
    finally:
        await connection.close()
