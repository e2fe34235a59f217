"""``milestones sweep``: record every reached milestone that has no record, for all mentors.

The safety net beside the event path, and the way a threshold added later reaches everyone at
once. The evaluation is set-based SQL in chunks of mentors (see :mod:`consumer.store.sweep_sql`);
what it records is emitted by the same outbox publisher as any other record, and the command
waits (up to a minute) until those rows have left ``pending``.

Safe at any time beside ``run`` and another sweep: the unique key of ``scenario_notifications``
decides who records a milestone, so each is recorded, and emitted, once.

``--dry-run`` evaluates the same chunks without locking or recording and prints how many
milestones it would record per organization and year (and milestone), to send or suppressed.
"""

from __future__ import annotations

import logging
import time
from uuid import UUID

from consumer.commands.common import current_year, table
from consumer.ops.progress import Progress
from consumer.runtime import command_pool, publish_and_wait
from consumer.settings import Settings, SettingsError
from consumer.store.sweep_sql import SweepResult, SweepRules, count_mentor_years, sweep_year

log = logging.getLogger(__name__)

CHUNK_MENTORS = 1_000

async def sweep_command(
    settings: Settings, *, year: int | None, organization: str | None, dry_run: bool = False
) -> int:
    try:
        organization_id = UUID(organization) if organization else None
    except ValueError:
        raise SettingsError(f"--organization: not a UUID: {organization!r}") from None
    rules = SweepRules(
        year=year if year is not None else current_year(settings),
        default_thresholds=settings.thresholds,
        timezone=settings.timezone,
        grace_days=settings.notify_grace_days,
        organization_id=organization_id,
    )
    started = time.monotonic()
    async with command_pool(settings, migrate=not dry_run) as pool:
        total = await count_mentor_years(pool, rules)
        label = f"sweep {rules.year}" + (" (dry run)" if dry_run else "")
        with Progress(label, total, unit="mentor-years") as progress:
            result = await sweep_year(
                pool, rules, chunk_mentors=CHUNK_MENTORS, dry_run=dry_run,
                on_chunk=progress.advance,
            )
        swept_s = time.monotonic() - started
        log.info(
            "sweep %d: %d mentor(s) in %d chunk(s), %d record(s) in %.2f s",
            rules.year, result.mentors, result.chunks, result.recorded, swept_s,
        )
        if dry_run:
            _print_plan(rules, result, swept_s)
            return 0
        left = len(result.pending_ids)
        if result.pending_ids and settings.kafka_bootstrap_servers:
            left = await publish_and_wait(settings, pool, result.pending_ids)
        elif result.pending_ids:
            log.warning("no broker configured: %d record(s) stay pending for `run` to send", left)
    scope = f" of organization {organization_id}" if organization_id else ""
    print(f"sweep of {rules.year}{scope}: {result.mentors:,} mentor-year(s) evaluated"
          f" in {result.chunks} chunk(s), {swept_s:.2f} s")
    if result.recorded:
        rows = [(value, count) for value, count in sorted(result.by_milestone.items())]
        print(table(rows, ("milestone", "recorded")))
    print(
        f"recorded {result.recorded}: {result.by_status['pending']} to send,"
        f" {result.by_status['suppressed']} suppressed;"
        f" sent {len(result.pending_ids) - left}, still pending {left}"
        + (f"; {result.lost_races} recorded meanwhile by another writer" if result.lost_races else "")
    )
    return 0


def _print_plan(rules: SweepRules, result: SweepResult, swept_s: float) -> None:
    """What a dry run found: per organization, year and milestone, to send and suppressed."""
    scope = f" of organization {rules.organization_id}" if rules.organization_id else ""
    print(f"sweep of {rules.year}{scope}, dry run: {result.mentors:,} mentor-year(s) evaluated"
          f" in {swept_s:.2f} s; nothing was recorded")
    keys = sorted({(str(org), value) for org, value, _ in result.planned})
    rows = [
        (org, str(rules.year), value,
         result.planned[(UUID(org), value, "pending")],
         result.planned[(UUID(org), value, "suppressed")])
        for org, value in keys
    ]
    if rows:
        print(table(rows, ("organization", "year", "milestone", "to send", "suppressed")))
    to_send = sum(n for (_, _, status), n in result.planned.items() if status == "pending")
    print(f"would record {sum(result.planned.values())}: {to_send} to send,"
          f" {sum(result.planned.values()) - to_send} suppressed")
