"""The store port in memory: the contract's storage rules, written as plainly as they read.

This is the executable statement of what the Postgres adapter's statements do
(``consumer/store/batch_sql.py``): ``tests/integration/test_store_contract.py`` runs the same
cases over both adapters, and the unit property ``tests/unit/test_batch_property.py`` holds
it to the contract applied one event at a time. The engine's loop can run on it without a
database. Production code never imports it.

Deciding which milestones a mentor-year reached is the pure core's (``tally`` and ``decide``),
the same for both adapters; a store supplies what ``decide`` reads (the count, the
organization, its thresholds, the opt-out, what is on record, the clock for the grace rule)
and keeps what it decides, once.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from uuid import UUID

from consumer.domain.batch import BatchPlan, LogRow, PreferenceRow, Removed, rejudge_repeats, tally
from consumer.domain.calendar import is_late
from consumer.domain.milestones import MilestoneRecord, decide, stored_thresholds
from consumer.store.port import BatchOptions, BatchResult

Clock = Callable[[], datetime]


@dataclass
class LedgerRow:
    """One ``activity_id``: its first log, and whether it counts. ``mentor_id`` None: a delete
    seen before its log (a tombstone), which that log fills in without counting."""

    mentor_id: UUID | None
    organization_id: UUID | None
    year: int | None
    occurred_at: datetime | None
    activity_type: str | None
    counted: bool
    deleted: bool


@dataclass
class Summary:
    """A mentor-year: its count, and the organization of its latest counted session."""

    count: int
    organization_id: UUID | None


@dataclass
class Tables:
    ledger: dict[UUID, LedgerRow] = field(default_factory=dict)
    preferences: dict[UUID, PreferenceRow] = field(default_factory=dict)
    summaries: dict[tuple[UUID, int], Summary] = field(default_factory=dict)
    # the unique key (mentor, year, milestone): a milestone is recorded once, ever. A record
    # kept here has its reached_at filled in (the clock's, when no session crossed).
    records: dict[tuple[UUID, int, int], MilestoneRecord] = field(default_factory=dict)
    # an organization's own thresholds row, as stored (an empty one: no milestones)
    thresholds: dict[UUID, Sequence[object]] = field(default_factory=dict)


class MemoryStore:
    """The :class:`consumer.store.port.BatchStore` port in dictionaries.

    A batch is one transaction: it works on a copy of the tables, which replaces them only
    when the whole batch succeeded. ``clock`` is the database clock (the grace rule, and
    ``created_at``).
    """

    def __init__(self, *, clock: Clock = lambda: datetime.now(UTC)) -> None:
        self.tables = Tables()
        self.clock = clock
        self.closed_through: int | None = None

    # --- the port ------------------------------------------------------------------------
    async def closed_through_year(self) -> int | None:
        return self.closed_through

    async def apply(self, plan: BatchPlan, options: BatchOptions) -> BatchResult:
        tables = copy.deepcopy(self.tables)
        result = _Batch(tables, self.closed_through, self.clock(), options).apply(plan)
        self.tables = tables
        return result

    # --- what an operator or a test sets ---------------------------------------------------
    def set_thresholds(self, organization_id: UUID, thresholds: Sequence[object]) -> None:
        self.tables.thresholds[organization_id] = list(thresholds)

    def close_years(self, through_year: int) -> None:
        """``milestones prune``'s watermark: logs of years at or below it are skipped."""
        self.closed_through = max(self.closed_through or through_year, through_year)


@dataclass
class _Batch:
    tables: Tables
    closed_through: int | None
    now: datetime
    options: BatchOptions
    result: BatchResult = field(default_factory=BatchResult)
    written_now: set[UUID] = field(default_factory=set)  # ledger rows this batch created
    conflicted: list[UUID] = field(default_factory=list)  # logs another earlier log beat

    def apply(self, plan: BatchPlan) -> BatchResult:
        outcomes = self.result.outcomes
        outcomes["duplicate"] = plan.duplicates
        outcomes["conflict"] = plan.conflicts
        outcomes["closed_year"] = plan.closed_year
        outcomes["preference"] = len(plan.preferences) + plan.superseded_preferences
        for change_of_mind in plan.preferences:
            self.prefer(change_of_mind)
        missed = [log.activity_id for log in plan.logs if not self.log(log) and log.counted]
        if plan.repeated_logs:
            duplicates, conflicts = rejudge_repeats(plan.repeated_logs, {
                activity_id: (row.mentor_id, row.organization_id, row.occurred_at,
                              row.activity_type)
                for activity_id in self.conflicted
                if (row := self.tables.ledger[activity_id]).mentor_id is not None
                and row.organization_id is not None and row.occurred_at is not None
                and row.activity_type is not None
            })
            outcomes["duplicate"] += duplicates
            outcomes["conflict"] += conflicts
        removed = [gone for delete in plan.deletes if (gone := self.delete(delete.activity_id))]
        for (mentor_id, year), change in tally(plan, missed, removed).items():
            summary = self.tables.summaries.setdefault((mentor_id, year), Summary(0, None))
            summary.count += change.delta
            summary.organization_id = change.organization_id or summary.organization_id
            assert summary.organization_id is not None  # a mentor-year starts with a session
            thresholds = {
                organization_id: self.thresholds_of(organization_id)
                for organization_id in {summary.organization_id}
                | {step.organization_id for step in change.steps if step.organization_id}
            }
            preference = self.tables.preferences.get(mentor_id)
            decided = decide(
                mentor_id=mentor_id,
                organization_id=summary.organization_id,
                year=year,
                count_after=summary.count,
                steps=change.steps,
                thresholds=thresholds[summary.organization_id],
                recorded=[m for (who, y, m) in self.tables.records if (who, y) == (mentor_id, year)],
                opted_out=preference is not None and not preference.milestone_notifications,
                late=is_late(year, self.now, self.options.tz, self.options.grace_days),
                suppress_before_ms=self.options.suppress_before_ms,
                thresholds_of=thresholds.__getitem__,
            )
            for record in decided:
                self.record(record)
        return self.result

    def prefer(self, new: PreferenceRow) -> None:
        """The latest ``changed_at`` wins; on a tie, opted out wins; none means opted in."""
        old = self.tables.preferences.get(new.mentor_id)
        if old is None or new.changed_at > old.changed_at or (
            new.changed_at == old.changed_at
            and old.milestone_notifications and not new.milestone_notifications
        ):
            self.tables.preferences[new.mentor_id] = new

    def log(self, log: LogRow) -> bool:
        """The first log of an ``activity_id`` wins; True when this one entered the ledger
        (counted when planned so). A remembered delete makes its late log not count."""
        outcomes = self.result.outcomes
        row = self.tables.ledger.get(log.activity_id)
        closed = self.closed_through is not None and log.year <= self.closed_through
        if row is None and not closed:
            self.tables.ledger[log.activity_id] = LedgerRow(
                log.mentor_id, log.organization_id, log.year, log.occurred_at,
                log.activity_type, log.counted, log.deleted_at is not None,
            )
            self.written_now.add(log.activity_id)
            outcomes["counted" if log.counted else "not_counted"] += 1
            return log.counted
        if row is None or (row.mentor_id is None and closed):
            outcomes["closed_year"] += 1  # a closed year takes nothing new
        elif row.mentor_id is None:  # its delete came first: filled in, never counted
            row.mentor_id, row.organization_id, row.year = log.mentor_id, log.organization_id, log.year
            row.occurred_at, row.activity_type = log.occurred_at, log.activity_type
            outcomes["not_counted"] += 1
        elif (row.mentor_id, row.organization_id, row.occurred_at, row.activity_type) == (
            log.mentor_id, log.organization_id, log.occurred_at, log.activity_type
        ):
            outcomes["duplicate"] += 1
        else:
            outcomes["conflict"] += 1  # other fields: the first log stands
            self.conflicted.append(log.activity_id)
        return False

    def delete(self, activity_id: UUID) -> Removed | None:
        """The first delete wins: it takes the session out of the count it was counted in,
        whatever mentor the delete names; a delete before its log is remembered."""
        outcomes = self.result.outcomes
        row = self.tables.ledger.get(activity_id)
        if row is None:
            self.tables.ledger[activity_id] = LedgerRow(None, None, None, None, None, False, True)
            outcomes["nothing_removed"] += 1
        elif not row.deleted:
            row.deleted = True
            if row.counted:
                assert row.mentor_id is not None
                assert row.year is not None
                row.counted = False
                outcomes["removed"] += 1
                return Removed(activity_id, row.mentor_id, row.year)
            outcomes["nothing_removed"] += 1
        elif activity_id in self.written_now:
            outcomes["nothing_removed"] += 1  # this batch's own log already carries it
        else:
            outcomes["duplicate"] += 1  # a repeat of an earlier batch's delete
        return None

    def thresholds_of(self, organization_id: UUID) -> tuple[int, ...]:
        """The organization's own row, else the default. A row the engine cannot use makes
        that organization's milestones wait (none apply), never the default."""
        raw = self.tables.thresholds.get(organization_id)
        if raw is None:
            return self.options.default_thresholds
        usable = stored_thresholds(raw)
        if usable is None:
            self.result.invalid_thresholds.add(organization_id)
            return ()
        return usable

    def record(self, record: MilestoneRecord) -> None:
        """Once per (mentor, year, milestone), ever: a second decision of the same key (a
        concurrent writer's) changes nothing."""
        key = (record.mentor_id, record.year, record.milestone_value)
        if key in self.tables.records:
            return
        self.tables.records[key] = replace(record, reached_at=record.reached_at or self.now)
        self.result.records.append(record)
        if record.status == "pending":
            self.result.pending += 1
