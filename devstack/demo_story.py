"""The demo's scripted story, and what it predicts: pure, no broker or database.

Each step produces a few messages and says in one caption what happens and in one line what
to look for. The story is built from one instant ``now``, so its prediction (each mentor's count
per year, each milestone and its status, the dead letters) is computed here from the same
messages, and the demo can end by comparing the database with it.

Mentor ids are derived from a run id: the story predicts exact counts even against a database
(``MILESTONES_DATABASE_URL``) that earlier runs of the demo already filled.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal
from uuid import NAMESPACE_DNS, UUID, uuid5
from zoneinfo import ZoneInfo

from consumer.domain.calendar import is_late, session_year

ORGANIZATION = uuid5(NAMESPACE_DNS, "demo.peer-mentors.example")
# name: (sessions logged in the traffic step, opted in)
MENTORS: dict[str, tuple[int, bool]] = {
    "Astrid": (104, True),   # crosses 50 and 100
    "Bjørn": (55, True),     # crosses 50
    "Camilla": (60, False),  # crosses 50 but opted out: recorded as suppressed, never sent
    "Daniel": (30, True),    # no milestone; gets the duplicate and the deletion
}
NEW_YEAR_MENTOR = "Eva"      # two sessions either side of midnight in the configured time zone
DUPLICATED = "Daniel"

Topic = Literal["activity", "preferences"]


@dataclass(frozen=True)
class Message:
    topic: Topic
    key: bytes
    value: bytes


@dataclass(frozen=True)
class Step:
    title: str
    caption: str
    look_for: str
    messages: tuple[Message, ...]
    # produce the messages over about this long (the traffic), then give the viewer `hold` steps
    spread_s: float = 0.0


@dataclass(frozen=True)
class MilestoneOutcome:
    name: str
    year: int
    value: int
    status: str            # published or suppressed
    reason: str | None     # suppressed_reason


@dataclass(frozen=True)
class Outcome:
    """What the database and the topics hold once the engine has read the whole story."""

    counts: Mapping[tuple[str, int], int]
    milestones: frozenset[MilestoneOutcome]
    dead_letter_kinds: Counter[str]
    duplicates: int
    removed: int


@dataclass(frozen=True)
class Check:
    label: str
    expected: str
    observed: str

    @property
    def ok(self) -> bool:
        return self.expected == self.observed


@dataclass
class Story:
    run_id: str
    steps: list[Step] = field(default_factory=list)
    predicted: Outcome | None = None

    def mentor_id(self, name: str) -> UUID:
        return uuid5(NAMESPACE_DNS, f"{name}.{self.run_id}.mentor.demo")

    @property
    def names(self) -> dict[UUID, str]:
        return {self.mentor_id(name): name for name in [*MENTORS, NEW_YEAR_MENTOR]}


def _activity(story: Story, name: str, activity: UUID, occurred_at: datetime) -> dict[str, object]:
    return {
        "event_type": "activity.logged", "schema_version": 1,
        "event_id": str(uuid5(activity, "logged")), "activity_id": str(activity),
        "mentor_id": str(story.mentor_id(name)), "organization_id": str(ORGANIZATION),
        "occurred_at": occurred_at.isoformat(), "activity_type": "session",
    }


def _message(story: Story, topic: Topic, name: str, value: dict[str, object] | bytes) -> Message:
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    return Message(topic, str(story.mentor_id(name)).encode(), raw)


def build_story(
    now: datetime, tz: ZoneInfo, thresholds: Sequence[int], grace_days: int, run_id: str
) -> Story:
    """The steps, and the outcome they predict under ``thresholds`` in ``tz``."""
    story = Story(run_id)
    this_year = now.astimezone(tz).year
    # Sessions of the past few hours, but never before this year's local new year, so that
    # every traffic session counts for this year whatever the date.
    start = max(now - timedelta(hours=6), datetime(this_year, 1, 1, tzinfo=tz).astimezone(UTC))
    sessions = [name for name, (count, _) in MENTORS.items() for _ in range(count)]
    random.Random(7).shuffle(sessions)
    logged: list[tuple[str, UUID, datetime]] = []
    for index, name in enumerate(sessions):
        activity = uuid5(NAMESPACE_DNS, f"{run_id}.session.{index}")
        logged.append((name, activity, start + timedelta(minutes=index)))
    traffic = tuple(_message(story, "activity", n, _activity(story, n, a, t)) for n, a, t in logged)
    opted_out = [name for name, (_, opted_in) in MENTORS.items() if not opted_in]

    story.steps.append(Step(
        "opt-out",
        f"{' and '.join(opted_out)} turns milestone notifications off (preferences.changed).",
        "her milestone will be recorded as suppressed (opted_out), never sent",
        tuple(
            _message(story, "preferences", name, {
                "event_type": "preferences.changed", "schema_version": 1,
                "event_id": str(uuid5(story.mentor_id(name), "opt-out")),
                "mentor_id": str(story.mentor_id(name)), "milestone_notifications": False,
                "changed_at": (now - timedelta(hours=7)).isoformat(),
            })
            for name in opted_out
        ),
    ))
    story.steps.append(Step(
        "traffic",
        f"{len(traffic)} sessions for {len(MENTORS)} mentors arrive over a few seconds.",
        "the input rate and the counts rising; milestones firing as counts cross "
        + ", ".join(map(str, sorted(set(thresholds)))),
        traffic,
        spread_s=6.0,
    ))
    daniels = [(a, t) for n, a, t in logged if n == DUPLICATED]
    again = next(m for m in traffic if json.loads(m.value)["activity_id"] == str(daniels[-1][0]))
    daniel_logged = MENTORS[DUPLICATED][0]
    story.steps.append(Step(
        "duplicate",
        f"{DUPLICATED}'s last session is delivered a second time (same activity_id).",
        f"{DUPLICATED} stays at {daniel_logged}; the duplicate counter goes to 1",
        (again,),
    ))
    deleted, _ = daniels[0]
    story.steps.append(Step(
        "deletion",
        f"{DUPLICATED}'s first session is deleted (activity.deleted).",
        f"{DUPLICATED} goes from {daniel_logged} to {daniel_logged - 1}",
        (_message(story, "activity", DUPLICATED, {
            "event_type": "activity.deleted", "schema_version": 1,
            "event_id": str(uuid5(deleted, "deleted")), "activity_id": str(deleted),
            "mentor_id": str(story.mentor_id(DUPLICATED)), "organization_id": str(ORGANIZATION),
            "deleted_at": now.isoformat(),
        }),),
    ))
    poison_year = _activity(story, DUPLICATED, uuid5(NAMESPACE_DNS, f"{run_id}.poison"), now)
    poison_year["occurred_at"] = "0001-01-01T00:00:00+00:00"
    story.steps.append(Step(
        "poison",
        "Two bad messages: invalid JSON, and a session dated in the year 0001.",
        "two dead letters (invalid_json, out_of_range); counting goes on",
        (
            _message(story, "activity", DUPLICATED, b'{"event_type": "activity.logged", '),
            _message(story, "activity", DUPLICATED, poison_year),
        ),
    ))
    last_year_end = datetime(this_year - 1, 12, 31, 23, 30, tzinfo=UTC)
    new_year = [last_year_end - timedelta(hours=1), last_year_end]
    years = [session_year(stamp, tz) for stamp in new_year]
    local = [stamp.astimezone(tz).strftime("%H:%M %d %b") for stamp in new_year]
    story.steps.append(Step(
        "new year",
        f"{NEW_YEAR_MENTOR} logs sessions at 22:30 and 23:30 UTC on 31 Dec {this_year - 1}:"
        f" {local[0]} and {local[1]} in {tz.key}.",
        f"{NEW_YEAR_MENTOR} gets one session in {years[0]} and one in {years[1]}",
        tuple(
            _message(story, "activity", NEW_YEAR_MENTOR, _activity(
                story, NEW_YEAR_MENTOR, uuid5(NAMESPACE_DNS, f"{run_id}.new-year.{i}"), stamp))
            for i, stamp in enumerate(new_year)
        ),
    ))

    counts: Counter[tuple[str, int]] = Counter()
    for name, _, stamp in logged:
        counts[name, session_year(stamp, tz)] += 1
    peaks = dict(counts)  # the deletion comes after every session: the peak is the total
    counts[DUPLICATED, session_year(daniels[0][1], tz)] -= 1
    for year in years:
        counts[NEW_YEAR_MENTOR, year] += 1
        peaks[NEW_YEAR_MENTOR, year] = counts[NEW_YEAR_MENTOR, year]
    milestones = set()
    for (name, year), peak in peaks.items():
        for value in sorted(set(thresholds)):
            if value > peak:
                break
            if name in opted_out:
                status, reason = "suppressed", "opted_out"
            elif is_late(year, now, tz, grace_days):
                status, reason = "suppressed", "grace_period_over"
            else:
                status, reason = "published", None
            milestones.add(MilestoneOutcome(name, year, value, status, reason))
    story.predicted = Outcome(
        counts=dict(counts), milestones=frozenset(milestones),
        dead_letter_kinds=Counter({"invalid_json": 1, "out_of_range": 1}),
        duplicates=1, removed=1,
    )
    return story


def check_outcome(predicted: Outcome, observed: Outcome) -> list[Check]:
    """One line per thing the story showed: what it predicted against what the engine did."""

    def counts(outcome: Outcome, names: Sequence[str]) -> str:
        return ", ".join(
            f"{year}: {count}" for (name, year), count in sorted(outcome.counts.items())
            if name in names
        ) or "none"

    def milestones(outcome: Outcome) -> str:
        return ", ".join(
            f"{m.name} {m.year} {m.value} {m.status}" + (f" ({m.reason})" if m.reason else "")
            for m in sorted(outcome.milestones, key=lambda m: (m.name, m.year, m.value))
        ) or "none"

    def kinds(outcome: Outcome) -> str:
        return ", ".join(f"{kind} {n}" for kind, n in sorted(outcome.dead_letter_kinds.items()))

    checks = [
        Check(f"{name} counts", counts(predicted, [name]), counts(observed, [name]))
        for name in MENTORS if name != DUPLICATED
    ]
    checks += [
        Check("the duplicate counted once", str(predicted.duplicates), str(observed.duplicates)),
        Check("the deletion removed one session", str(predicted.removed), str(observed.removed)),
        Check(f"{DUPLICATED} counts (duplicate, deletion)", counts(predicted, [DUPLICATED]),
              counts(observed, [DUPLICATED])),
        Check("the dead letters by kind", kinds(predicted) or "none", kinds(observed) or "none"),
        Check("the new year", counts(predicted, [NEW_YEAR_MENTOR]),
              counts(observed, [NEW_YEAR_MENTOR])),
        Check("milestones", milestones(predicted), milestones(observed)),
    ]
    return checks
