"""The Postgres adapter: connecting with retries, and one batch as one transaction."""

from __future__ import annotations

import logging
import ssl
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from operator import attrgetter
from typing import Any
from uuid import UUID

import asyncpg

from consumer.domain.batch import (
    BatchPlan,
    Removed,
    YearChange,
    rejudge_repeats,
    tally,
    thresholds_for,
)
from consumer.domain.calendar import is_late
from consumer.domain.milestones import MilestoneRecord, decide, stored_thresholds
from consumer.retry import Backoff
from consumer.store import batch_sql
from consumer.store.errors import DatabaseRefused, StoreError, StoreUnavailable, classify
from consumer.store.port import EVENT_OUTCOMES, BatchOptions, BatchResult
from consumer.store.retention import read_closed_through_year

log = logging.getLogger(__name__)


# Session settings, sent in the startup packet: asyncpg's pool runs RESET ALL whenever a
# connection goes back to the pool, which undid the SET of an init callback after the first
# batch (a test pins this). Startup values are what RESET ALL returns to.
#
# Timeouts turn a stuck server into a retriable error instead of a hang.
#
# Custom plans: asyncpg prepares every statement once per connection, and after five runs
# Postgres may keep a generic plan, which cannot see the size of the batch's arrays (it assumes
# 10 rows) and keeps the statistics of the moment it is made. Made while scenario_notifications
# is nearly empty, such a plan scans the whole table once per summary row, so batches slow down
# as milestones accumulate (measured with autovacuum off: 900 ms per 4,500-row batch after
# 6,000 milestones against 77 ms with custom plans; 0.3 s per summary statement with 100,000
# mentors). Planning every run costs well under a millisecond per statement.
SERVER_SETTINGS = {
    "statement_timeout": "30s",
    "lock_timeout": "20s",
    "plan_cache_mode": "force_custom_plan",
}
# For the operator commands whose single statements may rightly run long on a big ledger
# (migrate, prune, reconcile, status): custom plans, no timeouts.
UNBOUNDED_SETTINGS = {"plan_cache_mode": "force_custom_plan"}


async def connect_pool(
    dsn: str, *, timeout_s: float, min_size: int = 1, max_size: int = 4,
    statement_timeouts: bool = True,
) -> asyncpg.Pool:
    """Open a pool, retrying for ``timeout_s`` so a database still starting is waited for."""
    backoff = Backoff(0.2, 2.0, jitter=False, give_up_after_s=timeout_s)
    while True:
        try:
            return await asyncpg.create_pool(
                dsn,
                min_size=min_size,
                max_size=max_size,
                server_settings=SERVER_SETTINGS if statement_timeouts else UNBOUNDED_SETTINGS,
                timeout=min(5.0, timeout_s),
                # The client-side bound matches the server's: none for the long statements.
                command_timeout=60 if statement_timeouts else None,
            )
        except (TimeoutError, OSError, asyncpg.PostgresError,
                asyncpg.exceptions.ClientConfigurationError) as error:
            refusal = _refusal(error)
            if refusal is not None:
                raise DatabaseRefused(refusal) from None
            if not await backoff.wait():
                reason = str(error) or type(error).__name__  # a timeout has no text
                raise StoreUnavailable(f"database unreachable: {reason}") from None


def _refusal(error: BaseException) -> str | None:
    """Why the server refused us for good, in words without the URL (it may hold a password);
    None for a failure worth retrying (not up yet, network)."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return (f"the server's certificate is not trusted ({error.verify_message}): check"
                " sslrootcert and the host name in the URL")
    if isinstance(error, ssl.SSLError):
        return f"TLS with the server failed ({error.reason or error})"
    if isinstance(error, asyncpg.exceptions.ClientConfigurationError):
        return f"the URL's options are not usable ({error})"
    state = getattr(error, "sqlstate", "") or ""
    if isinstance(error, asyncpg.InvalidCatalogNameError) or state.startswith("28"):
        return str(error)  # a database that does not exist; a role or password refused
    return None


_LOG_COLUMNS = attrgetter(
    "activity_id", "mentor_id", "organization_id", "year", "occurred_at", "activity_type",
    "counted", "deleted_at",
)


def _year_inputs(
    changes: dict[tuple[UUID, int], YearChange], default_thresholds: Sequence[int]
) -> list[list[Any]]:
    """UPSERT_SUMMARY's arrays: the changes, the mentor-years it must return whatever their
    count (a delete: the count peaked inside the batch; a step under another organization than
    the last: judged under other thresholds), and the default thresholds."""
    mentors, years, deltas, organizations = [], [], [], []
    named_mentors, named_years = [], []
    for (mentor_id, year), change in changes.items():
        mentors.append(mentor_id)
        years.append(year)
        deltas.append(change.delta)
        organizations.append(change.organization_id)
        final = change.organization_id
        steps = change.steps
        if final is None or steps[0].delta < 0 or (len(steps) > 1 and any(
            step.delta < 0 or (step.organization_id is not None and step.organization_id != final)
            for step in steps
        )):
            named_mentors.append(mentor_id)
            named_years.append(year)
    return [mentors, years, deltas, organizations, named_mentors, named_years,
            list(default_thresholds)]


def _record_inputs(records: Sequence[MilestoneRecord]) -> list[list[Any]]:
    columns: list[list[Any]] = [[] for _ in range(10)]
    for record in sorted(records, key=lambda r: (r.mentor_id.int, r.year, r.milestone_value)):
        values = (
            record.id, record.mentor_id, record.organization_id, record.year,
            record.milestone_value, record.session_count, record.status, record.activity_id,
            record.reached_at, record.suppressed_reason,
        )
        for column, value in zip(columns, values, strict=True):
            column.append(value)
    return columns


async def apply_batch(
    connection: asyncpg.Connection, plan: BatchPlan, options: BatchOptions
) -> BatchResult:
    """Write one planned batch in one transaction; raise a :class:`StoreError` on failure.

    Statements, in the lock order: preferences, ledger inserts, ledger deletes, summary (which
    also reads the evaluator's inputs), milestone records. Nothing is written if any fails.
    """
    try:
        async with connection.transaction():
            return await _apply(connection, plan, options)
    except Exception as error:
        mapped = classify(error)
        if mapped is None:
            raise
        raise mapped from error


async def _rejudge_repeats(
    connection: asyncpg.Connection, plan: BatchPlan, conflicted: list[UUID],
    outcomes: Counter[str],
) -> None:
    repeated = {repeat.activity_id for repeat in plan.repeated_logs}
    ids = [activity_id for activity_id in conflicted if activity_id in repeated]
    if not ids:
        return
    rows = await connection.fetch(batch_sql.LEDGER_LOGS, ids)
    duplicates, conflicts = rejudge_repeats(plan.repeated_logs, {
        row["activity_id"]: (row["mentor_id"], row["organization_id"], row["occurred_at"],
                             row["activity_type"])
        for row in rows
    })
    outcomes["duplicate"] += duplicates
    outcomes["conflict"] += conflicts


async def _apply(
    connection: asyncpg.Connection, plan: BatchPlan, options: BatchOptions
) -> BatchResult:
    result = BatchResult()
    outcomes = result.outcomes
    outcomes["duplicate"] = plan.duplicates
    outcomes["conflict"] = plan.conflicts
    outcomes["closed_year"] = plan.closed_year
    outcomes["preference"] = len(plan.preferences) + plan.superseded_preferences
    if plan.preferences:
        await connection.execute(
            batch_sql.UPSERT_PREFERENCES,
            [row.mentor_id for row in plan.preferences],
            [row.milestone_notifications for row in plan.preferences],
            [row.changed_at for row in plan.preferences],
        )
    missed: list[UUID] = []
    planned = 0
    if plan.logs:
        # One C-level pass per row, then a transpose: eight comprehensions cost twice as much.
        rows = await connection.fetch(
            batch_sql.INSERT_LOGS, *zip(*map(_LOG_COLUMNS, plan.logs), strict=True)
        )
        planned = sum(1 for row in plan.logs if row.counted)
        outcomes["not_counted"] = len(plan.logs) - planned
        conflicted: list[UUID] = []
        for row in rows:
            outcome = row["outcome"]
            outcomes[outcome] += 1
            if outcome == "conflict":
                conflicted.append(row["activity_id"])
            if row["planned"]:
                missed.append(row["activity_id"])
            else:
                outcomes["not_counted"] -= 1
        if conflicted and plan.repeated_logs:
            await _rejudge_repeats(connection, plan, conflicted, outcomes)
    removed: list[Removed] = []
    if plan.deletes:
        rows = await connection.fetch(
            batch_sql.APPLY_DELETES,
            [row.activity_id for row in plan.deletes],
            [row.deleted_at for row in plan.deletes],
        )
        removed = [
            Removed(row["activity_id"], row["mentor_id"], row["year"])
            for row in rows if row["removed"]
        ]
        # the others are repeats of a delete of an earlier batch
        repeated = len(rows) - len(removed)
        outcomes["duplicate"] += repeated
        outcomes["nothing_removed"] = len(plan.deletes) - len(removed) - repeated
    outcomes["counted"] = planned - len(missed)
    outcomes["removed"] = len(removed)
    changes = tally(plan, missed, removed)
    if not changes:
        return result
    contexts = await connection.fetch(
        batch_sql.UPSERT_SUMMARY, *_year_inputs(changes, options.default_thresholds)
    )
    other_thresholds = await _thresholds_of_other_organizations(connection, contexts, changes)

    # Every organization's own row seen by this batch; thresholds_for applies the default.
    overrides = {
        organization_id: _usable(organization_id, raw, result)
        for organization_id, raw in other_thresholds.items()
    }
    for context in contexts:
        if context["thresholds"] is not None:
            organization_id = context["organization_id"]
            overrides[organization_id] = _usable(organization_id, context["thresholds"], result)

    def thresholds_of(organization_id: UUID) -> tuple[int, ...]:
        return thresholds_for(organization_id, overrides, options.default_thresholds)

    # Per year, not per row: every row carries the same now() (the transaction's start), and
    # the deadline's time-zone arithmetic cost about 0.2 us per event in the profile.
    late_in: dict[int, bool] = {}
    for context in contexts:
        key = (context["user_id"], context["year"])
        change = changes[key]
        thresholds = thresholds_of(context["organization_id"])
        late = late_in.get(key[1])
        if late is None:
            db_now: datetime = context["db_now"]
            late = late_in[key[1]] = is_late(key[1], db_now, options.tz, options.grace_days)
        result.records.extend(
            decide(
                mentor_id=key[0],
                organization_id=context["organization_id"],
                year=key[1],
                count_after=context["session_count"],
                steps=change.steps,
                thresholds=thresholds,
                recorded=context["recorded"],
                opted_out=context["opted_out"],
                late=late,
                suppress_before_ms=options.suppress_before_ms,
                thresholds_of=thresholds_of,
            )
        )
    if result.records:
        rows = await connection.fetch(batch_sql.INSERT_MILESTONES, *_record_inputs(result.records))
        result.pending = sum(1 for row in rows if row["status"] == "pending")
        written = {row["id"] for row in rows}
        result.records = [record for record in result.records if record.id in written]
    return result


def _usable(organization_id: UUID, raw: Sequence[Any], result: BatchResult) -> tuple[int, ...]:
    """An organization's own thresholds; none (its milestones wait) when its row is unusable.

    Waiting, not the default: an organization with its own row chose other thresholds than the
    default (possibly none at all), and a notification sent cannot be taken back. Once the row
    is fixed, the mentor's next event or ``milestones sweep`` records what was reached meanwhile.
    """
    thresholds = stored_thresholds(raw)
    if thresholds is None:
        result.invalid_thresholds.add(organization_id)
        return ()
    return thresholds


async def _thresholds_of_other_organizations(
    connection: asyncpg.Connection,
    contexts: Sequence[asyncpg.Record],
    changes: dict[tuple[UUID, int], YearChange],
) -> dict[UUID, Sequence[Any]]:
    """Thresholds of organizations a mentor-year had earlier in the batch than its last one.

    Rare (a mentor moving between organizations within one batch), so it costs a statement
    only when it happens.
    """
    others: set[UUID] = set()
    for context in contexts:
        steps = changes[(context["user_id"], context["year"])].steps
        if len(steps) < 2:
            continue  # a single step's organization is the final one
        final_id = context["organization_id"]
        final = final_id.int if final_id is not None else None  # ints: UUID.__eq__ is slow
        for step in steps:
            if step.organization_id is not None and step.organization_id.int != final:
                others.add(step.organization_id)
    if not others:
        return {}
    rows = await connection.fetch(
        "SELECT organization_id, thresholds FROM milestone_thresholds"
        " WHERE organization_id = ANY($1::uuid[])",
        sorted(others),
    )
    return {row["organization_id"]: row["thresholds"] for row in rows}


class PostgresBatchStore:
    """The store port over a pool: each batch on a connection of its own, so the writer's
    concurrent lanes run in concurrent transactions."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def apply(self, plan: BatchPlan, options: BatchOptions) -> BatchResult:
        async with self.pool.acquire(timeout=10) as connection:
            return await apply_batch(connection, plan, options)

    async def closed_through_year(self) -> int | None:
        return await read_closed_through_year(self.pool)


__all__ = [
    "EVENT_OUTCOMES", "BatchOptions", "BatchResult", "PostgresBatchStore", "StoreError",
    "apply_batch", "connect_pool",
]
