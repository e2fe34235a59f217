"""The synthetic workload: deterministic events, and what the engine must make of them.

Pure Python (no asyncio, no clients): the harness and every worker process build the same
events from the same seed, so a figure can be traced back to the exact input.

The shape follows production: a few very active mentors and many occasional ones (a Zipf
weight ``1 / rank ** skew`` over a shuffled ranking), every ``occurred_at`` in the current year
so milestones really fire, and a share of duplicate deliveries (the same bytes again, as a
producer retry or a replay sends them).
"""

from __future__ import annotations

import itertools
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from uuid import UUID

from aiokafka.partitioner import murmur2

DEFAULT_SKEW = 0.8
ORGANIZATIONS = 50
ACTIVITY_TYPE = "session"
_ISO_UTC = "%Y-%m-%dT%H:%M:%S+00:00"


def _uuid(rng: random.Random) -> UUID:
    return UUID(_uuid_text(rng))


def _uuid_text(rng: random.Random) -> str:
    """A random version-4 UUID in canonical form; three times faster than ``str(UUID(...))``."""
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


_VARIANT = "89ab"


def partition_for(key: bytes, partitions: int) -> int:
    """The partition aiokafka's default partitioner picks for ``key`` (murmur2, positive)."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


@dataclass(frozen=True, slots=True)
class Mentors:
    ids: list[UUID]
    organizations: list[UUID]  # organizations[i] is the organization of ids[i]


def make_mentors(count: int, seed: int) -> Mentors:
    rng = random.Random(f"mentors:{seed}")
    organizations = [_uuid(rng) for _ in range(min(ORGANIZATIONS, count))]
    ids = [_uuid(rng) for _ in range(count)]
    return Mentors(ids, [organizations[i % len(organizations)] for i in range(count)])


@dataclass(frozen=True, slots=True)
class Event:
    """One record to produce: ``activity_id`` identifies it; duplicates share it."""

    partition: int
    key: bytes
    value: bytes
    activity_id: str
    mentor: int  # index into Mentors.ids


@dataclass(slots=True)
class Workload:
    events: list[Event]
    mentors: Mentors
    distinct: int = 0  # distinct activity ids, i.e. the sessions that must be counted
    duplicates: int = 0
    sessions_per_mentor: Counter[int] = field(default_factory=Counter)

    def expected_milestones(self, thresholds: tuple[int, ...]) -> int:
        """Records the engine must write: every threshold each mentor's count reached."""
        return sum(
            sum(1 for threshold in thresholds if count >= threshold)
            for count in self.sessions_per_mentor.values()
        )

    def partition_shares(self, partitions: int) -> list[float]:
        sizes = Counter(event.partition for event in self.events)
        total = max(1, len(self.events))
        return [sizes[p] / total for p in range(partitions)]


def current_year_window(now: datetime) -> tuple[datetime, datetime]:
    """Instants that are in ``now``'s year in any European zone and not in the future.

    Starts on 2 January (so no zone puts them in the previous year) and ends an hour ago
    (the engine rejects an ``occurred_at`` far after the record's timestamp).
    """
    start = datetime(now.year, 1, 2, tzinfo=UTC)
    end = max(start + timedelta(hours=1), now - timedelta(hours=1))
    return start, end


def make_workload(
    *,
    events: int,
    mentors: Mentors,
    partitions: int,
    seed: int,
    duplicate_share: float = 0.01,
    skew: float = DEFAULT_SKEW,
    now: datetime | None = None,
) -> Workload:
    """``events`` records of ``activity.logged``; about ``duplicate_share`` of them repeat one."""
    rng = random.Random(f"events:{seed}")
    count = len(mentors.ids)
    ranking = list(range(count))
    rng.shuffle(ranking)  # rank is not the index: the busy mentors are spread over partitions
    weights = [0.0] * count
    for rank, mentor in enumerate(ranking, start=1):
        weights[mentor] = 1.0 / rank**skew
    cumulative = list(itertools.accumulate(weights))
    picks = rng.choices(range(count), cum_weights=cumulative, k=events)
    start, end = current_year_window(now or datetime.now(UTC))
    span_s = int((end - start).total_seconds())
    start_s = int(start.timestamp())
    keys = [str(mentor_id).encode() for mentor_id in mentors.ids]
    parts = [partition_for(key, partitions) for key in keys]
    mentor_text = [str(mentor_id) for mentor_id in mentors.ids]
    org_text = [str(org) for org in mentors.organizations]
    workload = Workload(events=[], mentors=mentors)
    out = workload.events
    for mentor in picks:
        if out and rng.random() < duplicate_share:
            out.append(out[rng.randrange(len(out))])  # the same delivery again, byte for byte
            workload.duplicates += 1
            continue
        activity_id = _uuid_text(rng)
        occurred = time.strftime(_ISO_UTC, time.gmtime(start_s + rng.randrange(span_s)))
        value = (
            '{"event_type":"activity.logged","schema_version":1,'
            f'"event_id":"{_uuid_text(rng)}","activity_id":"{activity_id}",'
            f'"mentor_id":"{mentor_text[mentor]}","organization_id":"{org_text[mentor]}",'
            f'"occurred_at":"{occurred}","activity_type":"{ACTIVITY_TYPE}"}}'
        ).encode()
        out.append(Event(parts[mentor], keys[mentor], value, activity_id, mentor))
        workload.sessions_per_mentor[mentor] += 1
    workload.distinct = len(out) - workload.duplicates
    return workload


def partition_order(events: list[Event]) -> list[Event]:
    """The order a consumer draining a backlog sees: partition by partition, offsets ascending."""
    return sorted(events, key=lambda event: event.partition)  # sorted() is stable
