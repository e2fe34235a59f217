"""Which milestones a mentor-year has reached, and how each is recorded.

The evaluator is the task card's rule: thresholds ascending, stop at the first one not reached,
never re-record a milestone already on record for the same mentor and year.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal
from uuid import UUID, uuid5

NOTIFICATION_NAMESPACE = UUID("6f1c2a8e-4d3b-5a7f-9e21-0c8b7d6a5f43")
SCENARIO_TYPE = "milestone"

Status = Literal["pending", "suppressed"]


def notification_id(mentor_id: UUID, year: int, milestone_value: int) -> UUID:
    """The contract's deterministic id; the notifier deduplicates on it."""
    return uuid5(NOTIFICATION_NAMESPACE, f"{mentor_id}:{year}:{milestone_value}")


def normalize_thresholds(values: Iterable[int]) -> tuple[int, ...]:
    """Sorted, without repeats; a non-positive threshold is a configuration error."""
    result = tuple(sorted(set(values)))
    if any(value <= 0 for value in result):
        raise ValueError("thresholds must be positive integers")
    return result


@dataclass(frozen=True, slots=True)
class Decision:
    """One milestone to record; ``emit`` is False when it is recorded as suppressed."""

    milestone_value: int
    emit: bool


def evaluate(
    count: int,
    thresholds: Sequence[int],
    recorded: Iterable[int],
    *,
    opted_out: bool,
    notify: bool = True,
) -> list[Decision]:
    """The milestones reached by ``count`` that have no record yet, ascending.

    ``thresholds`` must be normalized. ``notify`` False (a late year, a ``--no-notify``
    replay) records without emitting, exactly like an opt-out.
    """
    already = set(recorded)
    emit = notify and not opted_out
    decisions: list[Decision] = []
    for threshold in thresholds:
        if count < threshold:
            break
        if threshold not in already:
            decisions.append(Decision(threshold, emit))
    return decisions


@dataclass(frozen=True, slots=True)
class Step:
    """One change of a mentor-year's running count, in processing (offset) order."""

    delta: int
    activity_id: UUID
    occurred_at: datetime | None
    record_timestamp_ms: int


@dataclass(frozen=True, slots=True)
class Crossing:
    """The session at which the running count first reached a threshold in this batch."""

    activity_id: UUID
    occurred_at: datetime | None
    record_timestamp_ms: int


def walk(
    count_after: int, steps: Sequence[Step], thresholds: Sequence[int]
) -> tuple[int, dict[int, Crossing]]:
    """Replay a batch's steps from the count before it; return the peak and the crossings.

    The peak, not the final count, decides what was reached: a session logged and deleted in
    the same batch still reached its milestone, as it would have one event at a time. Only
    thresholds above the count before the batch get a crossing; the others were reached
    earlier (a threshold added later, an organization change) and have none.
    """
    running = count_after - sum(step.delta for step in steps)
    peak = running
    crossings: dict[int, Crossing] = {}
    pending = [threshold for threshold in thresholds if threshold > running]
    for step in steps:
        running += step.delta
        if running > peak:
            peak = running
            while pending and pending[0] <= running:
                crossings[pending.pop(0)] = Crossing(
                    step.activity_id, step.occurred_at, step.record_timestamp_ms
                )
    return peak, crossings


@dataclass(frozen=True, slots=True)
class MilestoneRecord:
    """A row for ``scenario_notifications``: what the batch transaction inserts."""

    id: UUID
    mentor_id: UUID
    organization_id: UUID
    year: int
    milestone_value: int
    session_count: int
    status: Status
    activity_id: UUID | None
    reached_at: datetime | None  # None: the database's now(), which is also created_at


def decide(
    *,
    mentor_id: UUID,
    organization_id: UUID,
    year: int,
    count_after: int,
    steps: Sequence[Step],
    thresholds: Sequence[int],
    recorded: Iterable[int],
    opted_out: bool,
    late: bool,
    suppress_before_ms: int | None = None,
    evaluated_at_ms: int = 0,
) -> list[MilestoneRecord]:
    """The records one mentor-year needs after a batch, ascending by milestone.

    ``suppress_before_ms`` is the ``replay --no-notify`` rule: a milestone reached by a session
    whose Kafka record is older than the replay's start is recorded as suppressed. A milestone
    without a crossing session is judged by ``evaluated_at_ms``, the newest record of the batch
    that evaluated it.
    """
    peak, crossings = walk(count_after, steps, thresholds)
    records: list[MilestoneRecord] = []
    for decision in evaluate(peak, thresholds, recorded, opted_out=opted_out, notify=not late):
        crossing = crossings.get(decision.milestone_value)
        timestamp_ms = crossing.record_timestamp_ms if crossing else evaluated_at_ms
        replayed = suppress_before_ms is not None and timestamp_ms < suppress_before_ms
        records.append(
            MilestoneRecord(
                id=notification_id(mentor_id, year, decision.milestone_value),
                mentor_id=mentor_id,
                organization_id=organization_id,
                year=year,
                milestone_value=decision.milestone_value,
                session_count=decision.milestone_value if crossing else count_after,
                status="pending" if decision.emit and not replayed else "suppressed",
                activity_id=crossing.activity_id if crossing else None,
                reached_at=crossing.occurred_at if crossing else None,
            )
        )
    return records
