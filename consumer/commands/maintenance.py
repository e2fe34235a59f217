"""``milestones migrate``, ``reconcile`` and ``prune``: the operator's schema and data tools."""

from __future__ import annotations

import logging

from consumer.settings import Settings
from consumer.store.migrate import migrate

log = logging.getLogger(__name__)


async def migrate_command(settings: Settings) -> int:
    from consumer.service import open_pool

    pool = await open_pool(settings, max_size=1)
    try:
        async with pool.acquire() as connection:
            applied = await migrate(connection)
    finally:
        await pool.close()
    print(f"applied {len(applied)} migration(s)" + (": " + ", ".join(applied) if applied else ""))
    return 0


async def reconcile_command(settings: Settings, *, year: int | None, fix: bool,
                            rebuild: bool) -> int:
    raise NotImplementedError


async def prune_command(settings: Settings, *, before_year: int, tombstone_days: int) -> int:
    raise NotImplementedError
