"""``sweep``, ``reconcile`` and ``prune`` report their progress: without a terminal, a final log
line with the work done of the total each set out to do (the line format itself is pinned in
tests/unit/test_progress.py)."""

from __future__ import annotations

import logging

import asyncpg
import pytest

from consumer.commands.common import current_year
from consumer.commands.maintenance import prune_command
from consumer.commands.reconcile import reconcile_command
from consumer.commands.sweep import sweep_command
from tests.integration.operations import settings_from, uuid, write_events
from tests.support import events


async def test_sweep_reconcile_and_prune_log_their_progress(
    db: asyncpg.Connection, engine_env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="consumer.ops.progress")
    settings = settings_from(engine_env, thresholds="2")
    year = current_year(settings)
    mentors = [events.new_id() for _ in range(3)]
    await write_events(settings, [
        *(events.logged(m, occurred_at=f"{year}-02-0{n}T10:00:00+01:00")
          for m in mentors for n in (1, 2)),
        events.logged(mentors[0], occurred_at=f"{year - 2}-02-01T10:00:00+01:00"),
    ])
    await db.execute("UPDATE annual_summary SET session_count = 9 WHERE user_id = $1 AND year = $2",
                     uuid(mentors[1]), year)
    await db.execute("ANALYZE activity_ledger")  # the estimate prune and rebuild show as total

    assert await reconcile_command(settings, year=year, fix=True, rebuild=False) == 0
    assert await sweep_command(settings, year=year, organization=None) == 0
    assert await reconcile_command(settings, year=None, fix=False, rebuild=True) == 0
    assert await prune_command(settings, before_year=year - 1, tombstone_days=400) == 0

    lines = [r.getMessage() for r in caplog.records if r.name == "consumer.ops.progress"]
    assert [line.split(", ")[0] for line in lines] == [
        "fix: 1 of 1 mentor-years (100%)",
        f"sweep {year}: 3 of 3 mentor-years (100%)",
        "rebuild: 7 of 7 ledger rows (100%)",
        f"prune through {year - 2}: 7 of 7 ledger rows (100%)",
    ]
    assert all("done in" in line for line in lines)
