"""``milestones reconcile``: the task card's COUNT fallback, as an operator's check and repair.

The per-batch path never counts rows; this command recounts each mentor-year from the ledger,
lists every ``annual_summary`` row that differs and, with ``--fix``, repairs it beside a live
``run`` (see :mod:`consumer.store.reconcile_sql`: the count takes no lock, the repair holds
its row locks for one short statement per chunk). ``--rebuild`` first recomputes each
session's year and counted flag under the current settings (time zone, counted types), for a
rule change that a replay cannot apply: the ledger keeps the first delivery of every
``activity_id``, so replaying the topic again changes nothing.

Years at or below the closed-years watermark (``prune``) have no ledger rows left; they are
neither compared nor rebuilt. Exit status: 0 when the summary agrees (or was repaired), 1 when
differences were found and left as they are.
"""

from __future__ import annotations

import logging
import time

from consumer.commands.common import table
from consumer.ops.progress import Progress
from consumer.runtime import command_pool
from consumer.settings import Settings
from consumer.store.catalog import estimated_rows
from consumer.store.reconcile_sql import (
    Drift,
    find_drift,
    fix_drift,
    rebuild_ledger,
    repair_lock,
)
from consumer.store.retention import read_closed_through_year

log = logging.getLogger(__name__)

SHOWN_ROWS = 50
EXIT_DIFFERENCES = 1


async def reconcile_command(settings: Settings, *, year: int | None, fix: bool, rebuild: bool) -> int:
    # Only comparing changes nothing, so it does not migrate either (a schema behind: exit 2).
    async with command_pool(settings, migrate=fix or rebuild, statement_timeouts=False) as pool:
        closed = await read_closed_through_year(pool)
        if year is not None and closed is not None and year <= closed:
            print(f"{year} is a closed year (pruned through {closed}): its ledger rows are gone,"
                  " there is nothing to compare")
            return 0
        if not (fix or rebuild):
            async with pool.acquire() as connection:
                drift = await find_drift(connection, year, closed)
            _show(drift, year)
            if not drift:
                return 0
            print("run again with --fix to set them to the ledger's count")
            return EXIT_DIFFERENCES
        async with repair_lock(pool):
            if rebuild:
                rows = await estimated_rows(pool, "activity_ledger")
                with Progress("rebuild", rows, unit="ledger rows") as progress:
                    rebuilt = await rebuild_ledger(
                        pool, timezone=settings.timezone,
                        counted_types=settings.counted_activity_types,
                        closed_through_year=closed, on_chunk=progress.advance,
                    )
                print(
                    f"rebuild under time zone {settings.timezone} and counted types "
                    f"{_types(settings.counted_activity_types)}: {rebuilt.scanned:,} ledger"
                    f" row(s) read, {rebuilt.changed:,} changed, {rebuilt.summaries:,} summary"
                    " row(s) moved"
                )
            counting = time.monotonic()
            async with pool.acquire() as connection:
                drift = await find_drift(connection, year, closed)
            counted_s = time.monotonic() - counting
            _show(drift, year)
            print(f"counted in {counted_s * 1000:.0f} ms without row locks")
            if not drift:
                return 0
            with Progress("fix", len(drift), unit="mentor-years") as progress:
                fixed = await fix_drift(pool, drift, on_chunk=progress.advance)
        log.info("reconcile: %d row(s) in %d chunk(s), longest chunk %.1f ms",
                 fixed.rows, fixed.chunks, fixed.longest_chunk_s * 1000)
        print(f"fixed {fixed.rows:,} row(s) in {fixed.chunks:,} chunk(s); the longest held its"
              f" row locks {fixed.longest_chunk_s * 1000:.0f} ms; run `milestones sweep` to"
              " record any milestone the new counts reach")
        return 0


def _show(drift: list[Drift], year: int | None) -> None:
    scope = f"{year}" if year is not None else "every open year"
    if not drift:
        print(f"annual_summary agrees with the ledger for {scope}")
        return
    print(f"annual_summary differs from the ledger for {len(drift):,} mentor-year(s) ({scope}):")
    shown = [
        (str(item.mentor_id), str(item.year), item.summary_count, item.ledger_count,
         item.difference)
        for item in drift[:SHOWN_ROWS]
    ]
    print(table(shown, ("mentor", "year", "summary", "ledger", "difference")))
    if len(drift) > SHOWN_ROWS:
        print(f"... and {len(drift) - SHOWN_ROWS:,} more")


def _types(types: frozenset[str] | None) -> str:
    return "all" if types is None else ", ".join(sorted(types))
