"""Planning a batch: what the one database transaction must write, decided in plain Python.

A batch is the messages one fetch returned, in processing order (partition by partition, offset
order within each). Planning collapses it so that every ``activity_id`` and every mentor appears
at most once per statement, sorted by key: that is what lets the transaction be a few
set-based statements and take its row locks in one order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from uuid import UUID
from zoneinfo import ZoneInfo

from consumer.domain.calendar import session_year
from consumer.domain.milestones import Step
from schemas.events import ActivityDeleted, ActivityLogged, PreferencesChanged

Event = ActivityLogged | ActivityDeleted | PreferencesChanged


@dataclass(frozen=True, slots=True)
class Envelope:
    """A decoded message and where it came from; ``position`` is its place in the batch."""

    event: Event
    position: int
    topic: str
    partition: int
    offset: int
    timestamp_ms: int


@dataclass(frozen=True, slots=True)
class LogRow:
    activity_id: UUID
    mentor_id: UUID
    organization_id: UUID
    year: int
    occurred_at: datetime
    activity_type: str
    counted: bool  # enters the count if new: a counted type, not deleted earlier in the batch
    deleted_at: datetime | None  # set when a delete came before the log in this batch
    position: int
    timestamp_ms: int


@dataclass(frozen=True, slots=True)
class DeleteRow:
    activity_id: UUID
    deleted_at: datetime
    position: int
    timestamp_ms: int


@dataclass(frozen=True, slots=True)
class PreferenceRow:
    mentor_id: UUID
    milestone_notifications: bool
    changed_at: datetime


@dataclass(slots=True)
class BatchPlan:
    preferences: list[PreferenceRow] = field(default_factory=list)
    logs: list[LogRow] = field(default_factory=list)
    deletes: list[DeleteRow] = field(default_factory=list)
    duplicates: int = 0
    conflicts: int = 0
    closed_year: int = 0
    envelopes: list[Envelope] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.preferences or self.logs or self.deletes)


def preference_wins(new: PreferenceRow, old: PreferenceRow) -> bool:
    """Latest ``changed_at`` wins; on a tie, opted out wins."""
    if new.changed_at != old.changed_at:
        return new.changed_at > old.changed_at
    return not new.milestone_notifications and old.milestone_notifications


def _same_session(a: LogRow, b: ActivityLogged, year: int) -> bool:
    return (
        a.mentor_id == b.mentor_id
        and a.organization_id == b.organization_id
        and a.occurred_at == b.occurred_at
        and a.activity_type == b.activity_type
        and a.year == year
    )


def plan_batch(
    envelopes: Sequence[Envelope],
    *,
    tz: ZoneInfo,
    counted_types: frozenset[str] | None,
    closed_through_year: int | None = None,
) -> BatchPlan:
    """Collapse a batch into sorted rows for the transaction.

    The first ``activity.logged`` of an id wins; a later one with other fields is a conflict.
    The first ``activity.deleted`` of an id is kept; all deletes are applied after the logs, so
    a delete that came first marks its log as not counted instead.
    """
    plan = BatchPlan(envelopes=list(envelopes))
    logs: dict[UUID, LogRow] = {}
    deletes: dict[UUID, DeleteRow] = {}
    preferences: dict[UUID, PreferenceRow] = {}
    for envelope in envelopes:
        event = envelope.event
        if isinstance(event, PreferencesChanged):
            row = PreferenceRow(event.mentor_id, event.milestone_notifications, event.changed_at)
            current = preferences.get(event.mentor_id)
            if current is None or preference_wins(row, current):
                preferences[event.mentor_id] = row
        elif isinstance(event, ActivityDeleted):
            if event.activity_id not in deletes:
                deletes[event.activity_id] = DeleteRow(
                    event.activity_id, event.deleted_at, envelope.position, envelope.timestamp_ms
                )
        else:
            year = session_year(event.occurred_at, tz)
            if closed_through_year is not None and year <= closed_through_year:
                plan.closed_year += 1
                continue
            first = logs.get(event.activity_id)
            if first is not None:
                if _same_session(first, event, year):
                    plan.duplicates += 1
                else:
                    plan.conflicts += 1
                continue
            earlier_delete = deletes.get(event.activity_id)
            logs[event.activity_id] = LogRow(
                activity_id=event.activity_id,
                mentor_id=event.mentor_id,
                organization_id=event.organization_id,
                year=year,
                occurred_at=event.occurred_at,
                activity_type=event.activity_type,
                counted=earlier_delete is None
                and (counted_types is None or event.activity_type in counted_types),
                deleted_at=earlier_delete.deleted_at if earlier_delete else None,
                position=envelope.position,
                timestamp_ms=envelope.timestamp_ms,
            )
    plan.preferences = [preferences[key] for key in sorted(preferences)]
    plan.logs = [logs[key] for key in sorted(logs)]
    plan.deletes = [deletes[key] for key in sorted(deletes)]
    return plan


@dataclass(frozen=True, slots=True)
class Removed:
    """A counted session that a delete of this batch took out of its mentor-year."""

    activity_id: UUID
    mentor_id: UUID
    year: int


@dataclass(slots=True)
class YearChange:
    """What a batch did to one mentor-year: ordered steps and the organization now on it."""

    steps: list[Step] = field(default_factory=list)
    organization_id: UUID | None = None
    newest_timestamp_ms: int = 0

    @property
    def delta(self) -> int:
        return sum(step.delta for step in self.steps)


def tally(
    plan: BatchPlan, inserted_counted: Iterable[UUID], removed: Iterable[Removed]
) -> dict[tuple[UUID, int], YearChange]:
    """Turn what the database accepted into ordered per-(mentor, year) steps.

    ``inserted_counted`` are the new ledger rows that entered the count; ``removed`` the rows a
    delete took out. Anything else in the plan was a duplicate and changes nothing.
    """
    by_id = {row.activity_id: row for row in plan.logs}
    delete_at = {row.activity_id: row for row in plan.deletes}
    ordered: list[tuple[int, tuple[UUID, int], Step, UUID | None]] = []
    for activity_id in inserted_counted:
        log = by_id[activity_id]
        key = (log.mentor_id, log.year)
        step = Step(1, activity_id, log.occurred_at, log.timestamp_ms, log.organization_id)
        ordered.append((log.position, key, step, log.organization_id))
    for item in removed:
        delete = delete_at[item.activity_id]
        step = Step(-1, item.activity_id, None, delete.timestamp_ms)
        ordered.append((delete.position, (item.mentor_id, item.year), step, None))
    ordered.sort(key=lambda entry: entry[0])
    changes: dict[tuple[UUID, int], YearChange] = {}
    for _, key, step, organization_id in ordered:
        change = changes.setdefault(key, YearChange())
        change.steps.append(step)
        if organization_id is not None:
            change.organization_id = organization_id
        change.newest_timestamp_ms = max(change.newest_timestamp_ms, step.record_timestamp_ms)
    return dict(sorted(changes.items()))


def thresholds_for(
    organization_id: UUID | None,
    overrides: Mapping[UUID, tuple[int, ...]],
    default: tuple[int, ...],
) -> tuple[int, ...]:
    """An organization's own row wins (an empty one means no milestones); else the default."""
    if organization_id is not None and organization_id in overrides:
        return overrides[organization_id]
    return default
