"""The store port: what the engine asks of its store when it applies a batch.

The consume loop reaches the store only through :class:`consumer.stream.writer.BatchWriter`,
and the writer asks two things: apply one planned batch as one transaction, and the
closed-years watermark that planning skips. Two adapters implement it:
:class:`consumer.store.postgres.PostgresBatchStore` (the service) and
``tests/support/memory_store.py`` (the contract's storage rules in plain Python, for tests).
One contract suite (``tests/integration/test_store_contract.py``) runs over both, so the two
cannot drift apart.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol
from uuid import UUID
from zoneinfo import ZoneInfo

from consumer.domain.batch import BatchPlan
from consumer.domain.milestones import MilestoneRecord


class BatchStore(Protocol):
    async def apply(self, plan: BatchPlan, options: BatchOptions) -> BatchResult:
        """Write ``plan`` all or nothing and return what it did.

        Raises a :class:`consumer.store.errors.StoreError` when the store is away, conflicts
        or refuses a value; anything else raised means nothing was written either.
        """
        ...

    async def closed_through_year(self) -> int | None:
        """The closed-years watermark (``milestones prune``); None while no year is closed."""
        ...


@dataclass(frozen=True, slots=True)
class BatchOptions:
    tz: ZoneInfo
    default_thresholds: tuple[int, ...]
    grace_days: int
    suppress_before_ms: int | None = None  # replay --no-notify


# What became of each accepted input message. activity.logged: counted, not_counted (a type
# not counted, or its delete came first), duplicate (an earlier log of its id with the same
# fields, in the batch or on the ledger), conflict (other fields), closed_year.
# activity.deleted: removed (took a counted session out), nothing_removed (the session was not
# counted, or not seen yet: remembered), duplicate (a repeat of an earlier delete).
# preferences.changed: preference (whether or not a later change already stored wins over
# it). Each message gets the outcome it would get alone, whatever the batching (a property
# test holds the batch path to a one-at-a-time oracle). Rejected messages are counted as dead
# letters instead.
EVENT_OUTCOMES = (
    "counted", "not_counted", "duplicate", "conflict", "closed_year", "removed",
    "nothing_removed", "preference",
)


@dataclass(slots=True)
class BatchResult:
    records: list[MilestoneRecord] = field(default_factory=list)
    pending: int = 0
    # every accepted message of the batch by outcome (milestones_events_total), one of
    # EVENT_OUTCOMES each
    outcomes: Counter[str] = field(default_factory=Counter)
    # organizations whose milestone_thresholds row could not be used: their milestones wait
    invalid_thresholds: set[UUID] = field(default_factory=set)

    @property
    def new_sessions(self) -> int:
        return self.outcomes["counted"]

    @property
    def removed_sessions(self) -> int:
        return self.outcomes["removed"]

    @property
    def conflicts(self) -> int:
        return self.outcomes["conflict"]


