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

from consumer.domain.calendar import year_of
from consumer.domain.milestones import Step
from schemas.events import ActivityDeleted, ActivityLogged, PreferencesChanged
from schemas.fast import LoggedActivity

# An activity.logged is a LoggedActivity when the fast decoder took it, else the pydantic model.
Event = LoggedActivity | ActivityLogged | ActivityDeleted | PreferencesChanged


@dataclass(slots=True)  # not frozen: a frozen __init__ costs ~1.3 us more per event
class Envelope:
    """A decoded message and where it came from; ``position`` is its place in the batch."""

    event: Event
    position: int
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    # ``occurred_at`` of an activity.logged as epoch seconds, when decoding computed it
    occurred_s: float | None = None


@dataclass(slots=True)  # not frozen: a frozen __init__ costs ~1.3 us more per event
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


@dataclass(slots=True)  # not frozen: a frozen __init__ costs ~1.3 us more per event
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


# What a log says of its session: the fields "the first log wins" compares.
SessionFields = tuple[UUID, UUID, datetime, str]


@dataclass(frozen=True, slots=True)
class RepeatedLog:
    """A log of an id already logged earlier in the batch: judged against that first log
    here, and again against the ledger's log when the first turns out to conflict with it."""

    activity_id: UUID
    fields: SessionFields
    same_as_first: bool


@dataclass(slots=True)
class BatchPlan:
    preferences: list[PreferenceRow] = field(default_factory=list)
    logs: list[LogRow] = field(default_factory=list)
    deletes: list[DeleteRow] = field(default_factory=list)
    duplicates: int = 0  # a log with the same fields, or a delete, of an id earlier in the batch
    conflicts: int = 0
    closed_year: int = 0
    superseded_preferences: int = 0  # preference changes another of the batch wins over
    envelopes: list[Envelope] = field(default_factory=list)
    logs_in_order: list[LogRow] = field(default_factory=list)  # ``logs`` by position
    # Envelopes whose planning raised, with the exception: isolated, not in any row above.
    unprocessable: list[tuple[Envelope, Exception]] = field(default_factory=list)
    repeated_logs: list[RepeatedLog] = field(default_factory=list)  # counted in duplicates/conflicts

    @property
    def empty(self) -> bool:
        return not (self.preferences or self.logs or self.deletes)


def preference_wins(new: PreferenceRow, old: PreferenceRow) -> bool:
    """Latest ``changed_at`` wins; on a tie, opted out wins."""
    if new.changed_at != old.changed_at:
        return new.changed_at > old.changed_at
    return not new.milestone_notifications and old.milestone_notifications


def _same_session(a: LogRow, b: LoggedActivity | ActivityLogged, year: int) -> bool:
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

    Dictionaries are keyed by ``uuid.int``: ``UUID.__hash__`` is a Python-level method, which
    keys of UUIDs would call several times per event.
    """
    plan = BatchPlan(envelopes=list(envelopes))
    logs: dict[int, LogRow] = {}
    deletes: dict[int, DeleteRow] = {}
    preferences: dict[int, PreferenceRow] = {}
    year_of_session = year_of(tz)
    for envelope in envelopes:
        # The per-record guard: an exception while planning one envelope isolates it (the
        # writer dead-letters it as ``unprocessable``) and the batch goes on. Each branch
        # writes its row last, so a raise leaves nothing half planned. Free while nothing
        # raises (zero-cost exception handling in CPython 3.11).
        try:
            event = envelope.event
            if type(event) is LoggedActivity or type(event) is ActivityLogged:
                seconds = envelope.occurred_s
                year = (
                    year_of_session(event.occurred_at) if seconds is None
                    else year_of_session.at(seconds, event.occurred_at)
                )
                if closed_through_year is not None and year <= closed_through_year:
                    plan.closed_year += 1
                    continue
                key = event.activity_id.int
                first = logs.get(key)
                if first is not None:
                    same = _same_session(first, event, year)
                    plan.repeated_logs.append(RepeatedLog(
                        event.activity_id,
                        (event.mentor_id, event.organization_id, event.occurred_at,
                         event.activity_type),
                        same,
                    ))
                    if same:
                        plan.duplicates += 1
                    else:
                        plan.conflicts += 1
                    continue
                earlier_delete = deletes.get(key)
                logs[key] = LogRow(
                    event.activity_id,
                    event.mentor_id,
                    event.organization_id,
                    year,
                    event.occurred_at,
                    event.activity_type,
                    earlier_delete is None
                    and (counted_types is None or event.activity_type in counted_types),
                    earlier_delete.deleted_at if earlier_delete else None,
                    envelope.position,
                    envelope.timestamp_ms,
                )
            elif isinstance(event, PreferencesChanged):
                row = PreferenceRow(event.mentor_id, event.milestone_notifications, event.changed_at)
                mentor = event.mentor_id.int
                current = preferences.get(mentor)
                if current is None or preference_wins(row, current):
                    preferences[mentor] = row
                    if current is not None:
                        plan.superseded_preferences += 1
                else:
                    plan.superseded_preferences += 1
            elif isinstance(event, ActivityDeleted):
                key = event.activity_id.int
                if key not in deletes:
                    deletes[key] = DeleteRow(
                        event.activity_id, event.deleted_at, envelope.position, envelope.timestamp_ms
                    )
                else:
                    plan.duplicates += 1
        except Exception as error:
            plan.unprocessable.append((envelope, error))

    plan.preferences = [preferences[key] for key in sorted(preferences)]
    plan.logs_in_order = list(logs.values())  # dicts keep insertion, i.e. batch, order
    plan.logs = [logs[key] for key in sorted(logs)]
    plan.deletes = [deletes[key] for key in sorted(deletes)]
    return plan


def rejudge_repeats(
    repeats: Sequence[RepeatedLog], ledger_logs: Mapping[UUID, SessionFields]
) -> tuple[int, int]:
    """(duplicates, conflicts) to add once the ledger's own log is known for ids whose first
    log in the batch conflicted with it: a repeat is a duplicate of the log that won, the
    ledger's, not of the batch's first. Only such ids are in ``ledger_logs`` (rare: a batch
    that logs an id twice, whose earlier batch logged it with other fields)."""
    duplicates = conflicts = 0
    for repeat in repeats:
        winner = ledger_logs.get(repeat.activity_id)
        if winner is None:
            continue
        same_as_winner = repeat.fields == winner
        if same_as_winner and not repeat.same_as_first:
            duplicates, conflicts = duplicates + 1, conflicts - 1
        elif repeat.same_as_first and not same_as_winner:
            duplicates, conflicts = duplicates - 1, conflicts + 1
    return duplicates, conflicts


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
    plan: BatchPlan, missed: Iterable[UUID], removed: Iterable[Removed]
) -> dict[tuple[UUID, int], YearChange]:
    """Turn what the database accepted into ordered per-(mentor, year) steps, sorted by key.

    ``missed`` are the logs planned as counted that did not enter the count (their id was on
    the ledger already); every other counted log did. The database reports the few it missed
    rather than the many it counted. ``removed`` are the rows a delete took out.
    """
    not_counted = {activity_id.int for activity_id in missed}
    # (position, mentor as int, year, step, mentor): in batch order, then grouped by mentor-year.
    ordered: list[tuple[int, int, int, Step, UUID]] = [
        (log.position, log.mentor_id.int, log.year,
         Step(1, log.activity_id, log.occurred_at, log.timestamp_ms, log.organization_id),
         log.mentor_id)
        for log in plan.logs_in_order if log.counted and log.activity_id.int not in not_counted
    ]
    removed = list(removed)
    if removed:  # rare: deletes interleave with the logs, so only then is a sort needed
        delete_at = {row.activity_id.int: row for row in plan.deletes}
        for item in removed:
            delete = delete_at[item.activity_id.int]
            step = Step(-1, delete.activity_id, None, delete.timestamp_ms)
            ordered.append((delete.position, item.mentor_id.int, item.year, step, item.mentor_id))
        ordered.sort(key=_position)
    grouped: dict[tuple[int, int], tuple[UUID, YearChange]] = {}
    for _, mentor_int, year, step, mentor_id in ordered:
        entry = grouped.get((mentor_int, year))
        if entry is None:
            entry = grouped[(mentor_int, year)] = (mentor_id, YearChange())
        change = entry[1]
        change.steps.append(step)
        if step.organization_id is not None:
            change.organization_id = step.organization_id
        if step.record_timestamp_ms > change.newest_timestamp_ms:
            change.newest_timestamp_ms = step.record_timestamp_ms
    return {
        (grouped[key][0], key[1]): grouped[key][1] for key in sorted(grouped)
    }


def _position(entry: tuple[int, int, int, Step, UUID]) -> int:
    return entry[0]


def split_lanes(envelopes: Sequence[Envelope], lanes: int) -> list[list[Envelope]]:
    """Cut a batch into at most ``lanes`` sub-batches that may be written concurrently.

    Each partition goes whole to one lane, so offset order within a partition (which decides
    "first log wins" and the crossing session) is kept inside its lane; partitions are dealt
    largest first to the least loaded lane. The order of partitions relative to each other is
    not defined by Kafka either. Lanes keep the batch's order and positions.
    """
    by_partition: dict[tuple[str, int], list[Envelope]] = {}
    for envelope in envelopes:
        by_partition.setdefault((envelope.topic, envelope.partition), []).append(envelope)
    if lanes <= 1 or len(by_partition) <= 1:
        return [list(envelopes)] if envelopes else []
    loads = [0] * lanes
    lane_of: dict[tuple[str, int], int] = {}
    for key, members in sorted(by_partition.items(), key=lambda item: -len(item[1])):
        lane = loads.index(min(loads))
        lane_of[key] = lane
        loads[lane] += len(members)
    result: list[list[Envelope]] = [[] for _ in range(lanes)]
    for envelope in envelopes:
        result[lane_of[(envelope.topic, envelope.partition)]].append(envelope)
    return [lane for lane in result if lane]


def thresholds_for(
    organization_id: UUID | None,
    overrides: Mapping[UUID, tuple[int, ...]],
    default: tuple[int, ...],
) -> tuple[int, ...]:
    """An organization's own row wins (an empty one means no milestones); else the default."""
    if organization_id is not None and organization_id in overrides:
        return overrides[organization_id]
    return default
