"""Which milestones a mentor-year has reached, and how each is recorded.

The evaluator is the task card's rule: thresholds ascending, stop at the first one not reached,
never re-record a milestone already on record for the same mentor and year.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, get_args
from uuid import UUID, uuid5

NOTIFICATION_NAMESPACE = UUID("6f1c2a8e-4d3b-5a7f-9e21-0c8b7d6a5f43")
SCENARIO_TYPE = "milestone"

Status = Literal["pending", "suppressed"]

# Why a record is ``suppressed`` (column ``scenario_notifications.suppressed_reason``, checked
# against this list by migration 0004). The first that applies is recorded, in this order.
SuppressedReason = Literal[
    "opted_out",              # the mentor had opted out when the milestone was recorded
    "grace_period_over",      # a past year's milestone recorded after its grace period
    "replay_no_notify",       # reached by a session older than a `replay --no-notify`
    "opted_out_before_send",  # recorded pending, the mentor opted out before it was sent
]
SUPPRESSED_REASONS: tuple[SuppressedReason, ...] = get_args(SuppressedReason)


def notification_id(mentor_id: UUID, year: int, milestone_value: int) -> UUID:
    """The contract's deterministic id; the notifier deduplicates on it."""
    return uuid5(NOTIFICATION_NAMESPACE, f"{mentor_id}:{year}:{milestone_value}")


def normalize_thresholds(values: Iterable[int]) -> tuple[int, ...]:
    """Sorted, without repeats; a non-positive threshold is a configuration error."""
    result = tuple(sorted(set(values)))
    if any(value <= 0 for value in result):
        raise ValueError("thresholds must be positive integers")
    return result


def stored_thresholds(raw: Sequence[Any]) -> tuple[int, ...] | None:
    """A ``milestone_thresholds`` row's array, normalized; None when the engine cannot use it.

    The database's CHECK refuses NULL elements and nested arrays; a row that slipped past it
    (a constraint dropped by hand, a schema not yet migrated) must stay that organization's
    problem instead of an exception that stops every batch. Costs one ``sorted(set())`` and one
    comparison per mentor-year of an organization with its own row.
    """
    try:
        values = tuple(sorted(set(raw)))
    except TypeError:  # a nested list (unhashable), or None beside numbers
        return None
    # Sorted: the first element is the smallest, so one check covers every element.
    if values and not (type(values[0]) is int and values[0] > 0):
        return None
    return values


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


@dataclass(slots=True)  # not frozen: a frozen __init__ costs ~1.3 us more per event
class Step:
    """One change of a mentor-year's running count, in processing (offset) order.

    A counted session (+1) carries its organization, which becomes the mentor-year's; a delete
    (-1) carries none and leaves the organization as it is.
    """

    delta: int
    activity_id: UUID
    occurred_at: datetime | None
    record_timestamp_ms: int
    organization_id: UUID | None = None


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
    suppressed_reason: SuppressedReason | None = None  # set exactly when status is suppressed


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
    thresholds_of: Callable[[UUID], Sequence[int]] | None = None,
) -> list[MilestoneRecord]:
    """The records one mentor-year needs after a batch, in the order they were reached.

    The batch is judged one step at a time, exactly as if each event were its own batch: after
    each step the thresholds of the organization current at that step are evaluated against
    the running count. So a session logged and deleted in the same batch still reached its
    milestone, and a milestone reached under an earlier organization of the batch is recorded
    under that organization. A threshold crossed by a step's own +1 gets that session as its
    crossing; one already reached before the step (a threshold added later, a change of
    organization) has none: ``activity_id`` null and ``session_count`` the count after the batch.

    ``thresholds`` are those of ``organization_id`` (the organization after the batch);
    ``thresholds_of`` gives another organization's. ``suppress_before_ms`` is the
    ``replay --no-notify`` rule: a milestone reached by a session whose Kafka record is older
    than the replay's start is recorded as suppressed; one without a crossing is judged by the
    record of the step that evaluated it. Without steps nothing changed, so nothing is recorded
    (``sweep`` re-evaluates counts in SQL, not here).
    """
    running = count_after - sum(step.delta for step in steps)
    already = set(recorded)
    # Before the batch's first counted session the organization is the one already on the
    # summary, which is the final one when no step brings an organization.
    current = None if any(step.organization_id for step in steps) else organization_id
    records: list[MilestoneRecord] = []
    due_under: Sequence[int] | None = None  # the thresholds ``due`` was computed for
    due: float = 0
    for step in steps:
        before = running
        running += step.delta
        if step.organization_id is not None:
            current = step.organization_id
        if current is None:
            continue  # a delete ahead of the batch's first session: judged at that session
        own = thresholds if current == organization_id or thresholds_of is None else (
            thresholds_of(current)
        )
        if own is not due_under:
            due, due_under = _next_due(own, already), own
        if running < due:
            continue  # evaluate would find nothing: most steps of a batch end here
        for decision in evaluate(running, own, already, opted_out=opted_out, notify=not late):
            value = decision.milestone_value
            already.add(value)
            crossed = step.delta > 0 and before < value
            replayed = (
                suppress_before_ms is not None and step.record_timestamp_ms < suppress_before_ms
            )
            reason = suppressed_reason(opted_out=opted_out, late=late, replayed=replayed)
            records.append(
                MilestoneRecord(
                    id=notification_id(mentor_id, year, value),
                    mentor_id=mentor_id,
                    organization_id=current,
                    year=year,
                    milestone_value=value,
                    session_count=value if crossed else count_after,
                    status="pending" if reason is None else "suppressed",
                    activity_id=step.activity_id if crossed else None,
                    reached_at=step.occurred_at if crossed else None,
                    suppressed_reason=reason,
                )
            )
        due = _next_due(own, already)
    return records


def suppressed_reason(
    *, opted_out: bool, late: bool, replayed: bool = False
) -> SuppressedReason | None:
    """Why a milestone recorded now is suppressed, or None when it is to be sent."""
    if opted_out:
        return "opted_out"
    if late:
        return "grace_period_over"
    if replayed:
        return "replay_no_notify"
    return None


def _next_due(thresholds: Sequence[int], recorded: set[int]) -> float:
    """The lowest threshold without a record: below it, :func:`evaluate` returns nothing."""
    for threshold in thresholds:
        if threshold not in recorded:
            return threshold
    return float("inf")
