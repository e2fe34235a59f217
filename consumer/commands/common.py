"""Pieces the operator commands share: the current year, waiting for the publisher, lines."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from uuid import UUID

import asyncpg

from consumer.faults import FaultInjector
from consumer.ops.metrics import Metrics
from consumer.service import open_pool, publisher_running
from consumer.settings import Settings, SettingsError
from consumer.store.migrate import ensure_schema
from consumer.stream.outbox import Publisher

log = logging.getLogger(__name__)

# How long a command waits for the notifications it recorded to be sent before it leaves them
# to the running service (they stay pending in the outbox: nothing is lost either way).
PUBLISH_WAIT_S = 60.0

_STILL_PENDING = """
SELECT count(*)::int FROM scenario_notifications WHERE id = ANY($1::uuid[]) AND status = 'pending'
"""


def parse_uuid(text: str, what: str) -> UUID:
    """A command-line id, or a :class:`SettingsError` (one line, exit 2) naming the argument."""
    try:
        return UUID(text)
    except ValueError:
        raise SettingsError(f"{what}: not a UUID: {text!r}") from None


def current_year(settings: Settings) -> int:
    """The year of now in the configured time zone (the sweep's and status's default)."""
    return datetime.now(UTC).astimezone(settings.tz).year


@asynccontextmanager
async def command_pool(
    settings: Settings, *, max_size: int = 4, migrate: bool = True,
    statement_timeouts: bool = True,
) -> AsyncIterator[asyncpg.Pool]:
    """A pool on an up-to-date schema (migrated when this role may, as ``run`` does).

    ``statement_timeouts`` False for commands whose single statements may run long.
    """
    pool = await open_pool(settings, max_size=max_size, statement_timeouts=statement_timeouts)
    try:
        if migrate:
            async with pool.acquire() as connection:
                await ensure_schema(connection)
        yield pool
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(pool.close(), 5)


async def publish_and_wait(
    settings: Settings, pool: asyncpg.Pool, ids: Sequence[UUID], *, timeout_s: float = PUBLISH_WAIT_S
) -> int:
    """Run a publisher until none of ``ids`` is pending (or the timeout); return those left.

    The publisher lease is shared by every process: when ``run`` holds it, ours waits and the
    service sends them; either way this returns once they have left ``pending``.
    """
    if not ids or not await still_pending(pool, ids):  # the running service was quicker
        return 0
    stop = asyncio.Event()
    async with publisher_running(settings, Metrics(), FaultInjector(None), stop) as publisher:
        return await wait_until_sent(pool, ids, publisher, timeout_s=timeout_s)


async def still_pending(pool: asyncpg.Pool, ids: Sequence[UUID]) -> int:
    return int(await pool.fetchval(_STILL_PENDING, list(ids)))


async def wait_until_sent(
    pool: asyncpg.Pool, ids: Sequence[UUID], publisher: Publisher, *, timeout_s: float = PUBLISH_WAIT_S
) -> int:
    """Wake ``publisher`` until none of ``ids`` is pending or the timeout; return those left."""
    deadline = time.monotonic() + timeout_s
    left = await still_pending(pool, ids) if ids else 0
    while left and time.monotonic() < deadline:
        publisher.wake()
        # The check looks up every id still in the list: with 160,000 of them, every 0.2 s it
        # took half of the time the publisher (on the same event loop and database) needed.
        await asyncio.sleep(min(2.0, 0.2 + left / 50_000))
        left = await still_pending(pool, ids)
    if left:
        log.warning(
            "%d notification(s) still pending after %.0f s; the running service will send them",
            left, timeout_s,
        )
    return left


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """A plain text table: left-aligned text, right-aligned numbers."""
    cells = [[str(value) for value in header]] + [[_cell(value) for value in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    numeric = [
        all(isinstance(row[i], int | float) for row in rows) if rows else False
        for i in range(len(header))
    ]
    lines = []
    for index, row in enumerate(cells):
        parts = [
            value.rjust(widths[i]) if numeric[i] else value.ljust(widths[i])
            for i, value in enumerate(row)
        ]
        lines.append("  ".join(parts).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)
