"""``milestones migrate``, ``grant`` and ``prune``: the operator's schema and data tools."""

from __future__ import annotations

import logging
import time

from consumer.commands.common import current_year, table
from consumer.ops.progress import Progress
from consumer.runtime import command_pool, open_pool
from consumer.settings import Settings, SettingsError
from consumer.store.catalog import estimated_rows
from consumer.store.migrate import migrate
from consumer.store.retention import (
    PrunePlan,
    close_years,
    delete_closed_sessions,
    delete_old_tombstones,
    plan_prune,
)

log = logging.getLogger(__name__)


async def migrate_command(settings: Settings) -> int:
    pool = await open_pool(settings, max_size=1, statement_timeouts=False)
    try:
        async with pool.acquire() as connection:
            applied = await migrate(connection)
    finally:
        await pool.close()
    print(f"applied {len(applied)} migration(s)" + (": " + ", ".join(applied) if applied else ""))
    return 0


async def grant_command(settings: Settings, *, role: str, dry_run: bool) -> int:
    """Print, and unless ``dry_run`` apply in one transaction, the GRANTs of
    :mod:`consumer.store.grants` for ``role``."""
    import asyncpg

    from consumer.store.errors import MigrationRequired
    from consumer.store.grants import apply_grants, current_schema, grant_statements, role_exists
    from consumer.store.migrate import pending_migrations

    pool = await open_pool(settings, max_size=1, statement_timeouts=False)
    try:
        async with pool.acquire() as connection:
            if await pending_migrations(connection):
                raise MigrationRequired("schema migrations are pending: run `milestones migrate`"
                                        " first, then grant")
            if not await role_exists(connection, role):
                raise SettingsError(f"role {role!r} does not exist: create it first"
                                    f" (CREATE ROLE ... LOGIN PASSWORD '...')")
            statements = grant_statements(role, schema=await current_schema(connection))
            if not dry_run:
                try:
                    await apply_grants(connection, statements)
                except asyncpg.InsufficientPrivilegeError as error:
                    raise SettingsError(
                        f"MILESTONES_DATABASE_URL: this role may not grant on the engine's tables"
                        f" ({error}): run grant as the role that ran migrate"
                    ) from None
    finally:
        await pool.close()
    for statement in statements:
        print(statement + ";")
    print(f"-- {'not applied (--dry-run)' if dry_run else 'applied'}: {len(statements)} statements")
    return 0


async def prune_command(
    settings: Settings, *, before_year: int, tombstone_days: int, dry_run: bool = False
) -> int:
    """Close the years before ``before_year``: drop their ledger rows, ignore them from now on.

    The watermark is recorded (and the database guard installed) before any row is deleted,
    so a duplicate arriving meanwhile can never be counted again. ``annual_summary`` and the
    milestone records of closed years stay: they are the history.
    """
    this_year = current_year(settings)
    if before_year > this_year:
        raise SettingsError(
            f"--before-year {before_year}: would close the current year {this_year} or later"
        )
    if tombstone_days < 0:
        raise SettingsError("--tombstone-days: must be 0 or more")
    started = time.monotonic()
    if dry_run:
        async with command_pool(
            settings, max_size=1, migrate=False, statement_timeouts=False
        ) as pool, pool.acquire() as connection:
            plan = await plan_prune(connection, before_year - 1, tombstone_days)
        _print_prune_plan(plan, before_year, tombstone_days)
        return 0
    async with command_pool(
        settings, max_size=1, statement_timeouts=False
    ) as pool, pool.acquire() as connection:
        watermark = await close_years(connection, before_year - 1)
        if watermark > before_year - 1:
            print(f"years through {watermark} were already closed; the watermark stays there")
        rows = await estimated_rows(connection, "activity_ledger")
        with Progress(f"prune through {watermark}", rows, unit="ledger rows") as progress:
            pruned = await delete_closed_sessions(connection, watermark, on_chunk=progress.advance)
        tombstones = await delete_old_tombstones(connection, tombstone_days)
    log.info("prune: closed through %d, %d ledger row(s) and %d tombstone(s) deleted",
             watermark, pruned.deleted, tombstones)
    print(
        f"closed every year through {watermark}: sessions of those years are ignored from now on;"
        f" deleted {pruned.deleted:,} of {pruned.scanned:,} ledger row(s) and {tombstones:,}"
        f" tombstone(s) older than {tombstone_days} day(s) in {time.monotonic() - started:.2f} s"
    )
    return 0


def _print_prune_plan(plan: PrunePlan, before_year: int, tombstone_days: int) -> None:
    now = "no year is closed" if plan.closed_now is None else f"closed through {plan.closed_now}"
    print(f"prune --before-year {before_year}, dry run: nothing was changed ({now})")
    if plan.closed_now is not None and plan.closed_now >= plan.closed_after:
        print(f"would keep the watermark at {plan.closed_now} (it never goes down)")
    else:
        print(f"would close every year through {plan.closed_after}: sessions of those years"
              " would be ignored from then on")
    if plan.sessions_by_year:
        print(table([(str(year), rows) for year, rows in plan.sessions_by_year],
                    ("year", "ledger rows")))
    sessions = sum(rows for _, rows in plan.sessions_by_year)
    print(f"would delete {sessions:,} ledger row(s) and {plan.tombstones:,} tombstone(s) older"
          f" than {tombstone_days} day(s); annual_summary and the milestone records stay")
