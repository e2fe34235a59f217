"""Whatever the batching and duplication, each reached milestone is recorded once.

Two models process the same random stream of events:

* the **store**: ``plan_batch`` → the in-memory adapter of the store port
  (tests/support/memory_store.py: ``tally`` and ``decide`` over its tables; the store
  contract suite tests/integration/test_store_contract.py holds it equal to the Postgres
  adapter), one delivered batch at a time, with random batch boundaries and
  crash-redeliveries (a batch committed to the database but not to Kafka comes again,
  possibly cut differently);
* the **oracle**: the contract's rules applied one event at a time, written from docs/contract.md
  without the core's helpers.

The only batching the contract makes visible is "a batch's preference changes are applied before
its activities", so the oracle takes each delivered batch's preference changes first.
"""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

from hypothesis import given, note, settings
from hypothesis import strategies as st

from consumer.domain.batch import Envelope, Event, plan_batch
from consumer.domain.milestones import MilestoneRecord
from consumer.store.port import BatchOptions
from schemas.events import ActivityDeleted, ActivityLogged, PreferencesChanged
from tests.support.memory_store import MemoryStore

OSLO = ZoneInfo("Europe/Oslo")


def _id(kind: str, index: int) -> uuid.UUID:
    return uuid.uuid5(uuid.NAMESPACE_OID, f"{kind}-{index}")


MENTORS = tuple(_id("mentor", i) for i in range(2))
ORGS = tuple(_id("org", i) for i in range(2))
ACTIVITIES = tuple(_id("activity", i) for i in range(12))
WHENS = (
    datetime(2025, 6, 1, 10, 0, tzinfo=UTC),  # 2025
    datetime(2025, 12, 31, 23, 30, tzinfo=UTC),  # 2026 in Oslo
    datetime(2026, 3, 14, 9, 0, tzinfo=UTC),  # 2026
)
TYPES = ("session", "call")
CHANGED = tuple(datetime(2026, 1, 1, 12, 0, tzinfo=UTC) + timedelta(minutes=i) for i in range(3))
DB_NOWS = (
    datetime(2026, 1, 15, 12, 0, tzinfo=UTC),  # 2025 still in its grace
    datetime(2026, 6, 1, 12, 0, tzinfo=UTC),  # 2025 late
)

Status = Literal["pending", "suppressed"]
Outcome = tuple[uuid.UUID, int, int, Status, uuid.UUID | None]  # mentor, year, m, status, activity


@dataclass(frozen=True)
class Config:
    counted_types: frozenset[str] | None
    default: tuple[int, ...]
    overrides: dict[uuid.UUID, tuple[int, ...]]
    db_now: datetime
    grace_days: int
    suppress_before_ms: int | None


@dataclass(frozen=True)
class Scenario:
    stream: list[tuple[Event, int]]  # (event, record timestamp ms), in offset order
    deliveries: list[tuple[int, int]]  # [start, end) slices of the stream, in delivery order
    config: Config


# --- the store: the in-memory adapter of the store port ------------------------------------


class Store:
    """``plan_batch`` then the in-memory store (tests/support/memory_store.py), whose storage
    rules the store contract suite holds equal to the Postgres adapter's."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.memory = MemoryStore(clock=lambda: config.db_now)
        for organization_id, thresholds in config.overrides.items():
            self.memory.set_thresholds(organization_id, thresholds)
        self.options = BatchOptions(
            tz=OSLO, default_thresholds=config.default, grace_days=config.grace_days,
            suppress_before_ms=config.suppress_before_ms,
        )

    async def apply(self, envelopes: list[Envelope]) -> None:
        plan = plan_batch(envelopes, tz=OSLO, counted_types=self.config.counted_types)
        await self.memory.apply(plan, self.options)

    @property
    def records(self) -> dict[tuple[uuid.UUID, int, int], MilestoneRecord]:
        return self.memory.tables.records

    def outcomes(self) -> set[Outcome]:
        return {
            (r.mentor_id, r.year, r.milestone_value, r.status, r.activity_id)
            for r in self.records.values()
        }

    def counts(self) -> dict[tuple[uuid.UUID, int], int]:
        return {key: s.count for key, s in self.memory.tables.summaries.items() if s.count}


# --- the oracle: the contract, one event at a time -----------------------------------------


@dataclass
class Oracle:
    config: Config
    logged: dict[uuid.UUID, tuple[uuid.UUID, int, bool]] = field(default_factory=dict)
    deleted: set[uuid.UUID] = field(default_factory=set)
    counts: Counter[tuple[uuid.UUID, int]] = field(default_factory=Counter)
    organization: dict[tuple[uuid.UUID, int], uuid.UUID] = field(default_factory=dict)
    preference: dict[uuid.UUID, tuple[datetime, bool]] = field(default_factory=dict)
    records: dict[tuple[uuid.UUID, int, int], tuple[Status, uuid.UUID | None, uuid.UUID]] = (
        field(default_factory=dict)
    )

    def batch(self, events: list[tuple[Event, int]]) -> None:
        """A delivered batch: its preference changes first, then the rest in order."""
        for event, _ in events:
            if isinstance(event, PreferencesChanged):
                # (changed_at, opted_out) is larger when later, or on a tie when opted out.
                candidate = (event.changed_at, not event.milestone_notifications)
                current = self.preference.get(event.mentor_id)
                if current is None or candidate > current:
                    self.preference[event.mentor_id] = candidate
        for event, timestamp_ms in events:
            if isinstance(event, ActivityLogged):
                self.log(event, timestamp_ms)
            elif isinstance(event, ActivityDeleted):
                self.delete(event, timestamp_ms)

    def log(self, event: ActivityLogged, timestamp_ms: int) -> None:
        if event.activity_id in self.logged:
            return  # a duplicate or a conflict: the first log wins
        year = event.occurred_at.astimezone(OSLO).year
        types = self.config.counted_types
        counted = event.activity_id not in self.deleted and (
            types is None or event.activity_type in types
        )
        self.logged[event.activity_id] = (event.mentor_id, year, counted)
        if counted:
            key = (event.mentor_id, year)
            self.counts[key] += 1
            self.organization[key] = event.organization_id
            self.evaluate(key, event.activity_id, timestamp_ms)

    def delete(self, event: ActivityDeleted, timestamp_ms: int) -> None:
        if event.activity_id in self.deleted:
            return
        self.deleted.add(event.activity_id)
        entry = self.logged.get(event.activity_id)
        if entry is not None and entry[2]:
            mentor_id, year, _ = entry
            self.logged[event.activity_id] = (mentor_id, year, False)
            self.counts[(mentor_id, year)] -= 1
            self.evaluate((mentor_id, year), None, timestamp_ms)

    def evaluate(
        self, key: tuple[uuid.UUID, int], activity_id: uuid.UUID | None, timestamp_ms: int
    ) -> None:
        mentor_id, year = key
        count = self.counts[key]
        organization_id = self.organization[key]
        config = self.config
        thresholds = sorted(set(config.overrides.get(organization_id, config.default)))
        # Wall-clock days from the local new year; no daylight-saving change falls in January.
        grace_end = datetime(year + 1, 1, 1, tzinfo=OSLO) + timedelta(days=config.grace_days)
        opted_out = self.preference.get(mentor_id, (None, False))[1]
        for m in thresholds:
            if count < m:
                break
            if (mentor_id, year, m) in self.records:
                continue
            crossed_now = activity_id is not None and m == count
            replayed = config.suppress_before_ms is not None and (
                timestamp_ms < config.suppress_before_ms
            )
            suppressed = opted_out or config.db_now >= grace_end or replayed
            self.records[(mentor_id, year, m)] = (
                "suppressed" if suppressed else "pending",
                activity_id if crossed_now else None,
                organization_id,
            )

    def outcomes(self) -> set[Outcome]:
        return {
            (mentor_id, year, m, status, activity_id)
            for (mentor_id, year, m), (status, activity_id, _) in self.records.items()
        }


# --- strategies ----------------------------------------------------------------------------

OrgMode = Literal["home", "free"]


def _event_id(index: int) -> uuid.UUID:
    return _id("event", index)


@st.composite
def _events(draw: st.DrawFn, org_mode: OrgMode) -> list[Event]:
    mentor = st.integers(0, len(MENTORS) - 1)
    activity = st.integers(0, len(ACTIVITIES) - 1)
    when = st.sampled_from((0, 1, 2, 2))  # mostly 2026, so that counts climb
    log = st.tuples(
        st.just("log"), activity, mentor, st.integers(0, len(ORGS) - 1), when,
        st.integers(0, len(TYPES) - 1),
    )
    delete = st.tuples(st.just("delete"), activity, mentor)
    pref = st.tuples(st.just("pref"), mentor, st.booleans(), st.integers(0, len(CHANGED) - 1))
    resend = st.tuples(st.just("resend"), st.integers(0, 1_000))
    # Logs weigh four times; at least ten operations, so that counts climb past thresholds.
    operation = st.one_of(log, log, log, log, delete, pref, resend)
    ops = draw(st.lists(operation, min_size=10, max_size=50))
    events: list[Event] = []
    for op in ops:
        index = len(events)
        if op[0] == "log":
            _, a, m, o, w, t = op
            events.append(
                ActivityLogged(
                    event_type="activity.logged",
                    schema_version=1,
                    event_id=_event_id(index),
                    activity_id=ACTIVITIES[a],
                    mentor_id=MENTORS[m],
                    organization_id=ORGS[m if org_mode == "home" else o],
                    occurred_at=WHENS[w],
                    activity_type=TYPES[t],
                )
            )
        elif op[0] == "delete":
            _, a, m = op
            events.append(
                ActivityDeleted(
                    event_type="activity.deleted",
                    schema_version=1,
                    event_id=_event_id(index),
                    activity_id=ACTIVITIES[a],
                    mentor_id=MENTORS[m],  # may not be the mentor the session was logged by
                    organization_id=ORGS[0],
                    deleted_at=WHENS[2],
                )
            )
        elif op[0] == "pref":
            _, m, notify, c = op
            events.append(
                PreferencesChanged(
                    event_type="preferences.changed",
                    schema_version=1,
                    event_id=_event_id(index),
                    mentor_id=MENTORS[m],
                    milestone_notifications=notify,
                    changed_at=CHANGED[c],
                )
            )
        elif events:  # a producer's retry: the same message again, later in the topic
            events.append(events[op[1] % len(events)])
    return events


@st.composite
def scenarios(draw: st.DrawFn, org_mode: OrgMode, same_thresholds: bool = False) -> Scenario:
    events = draw(_events(org_mode))
    stream = [(event, 1_000 * (offset + 1)) for offset, event in enumerate(events)]
    # Delivery: each fetch starts at the committed offset; a crash after the database commit
    # (before the offset commit) makes the next fetch start there again, maybe cut elsewhere.
    deliveries: list[tuple[int, int]] = []
    committed, crashes = 0, 0
    while committed < len(stream):
        end = draw(st.integers(committed + 1, min(len(stream), committed + 8)))
        deliveries.append((committed, end))
        if crashes < 3 and draw(st.booleans()):
            crashes += 1
        else:
            committed = end
    default = draw(st.sampled_from([(2, 3, 5), (1, 2, 3), (1, 3), (2,)]))
    override = None if same_thresholds else draw(st.sampled_from([None, (), (1, 2), (3,)]))
    config = Config(
        counted_types=draw(st.sampled_from([None, frozenset({"session"})])),
        default=default,
        overrides={} if override is None else {ORGS[1]: override},
        db_now=draw(st.sampled_from(DB_NOWS)),
        grace_days=31,
        suppress_before_ms=draw(st.one_of(st.none(), st.integers(0, 1_000 * (len(stream) + 1)))),
    )
    return Scenario(stream, deliveries, config)


async def run(scenario: Scenario) -> tuple[Store, Oracle]:
    store, oracle = Store(scenario.config), Oracle(scenario.config)
    for start, end in scenario.deliveries:
        events = scenario.stream[start:end]
        envelopes = [
            Envelope(
                event=event,
                position=position,
                topic="mentor-preferences"
                if isinstance(event, PreferencesChanged)
                else "activity-logged",
                partition=0,
                offset=start + position,
                timestamp_ms=timestamp_ms,
            )
            for position, (event, timestamp_ms) in enumerate(events)
        ]
        await store.apply(envelopes)
        oracle.batch(events)
    return store, oracle


def describe(scenario: Scenario) -> list[str]:
    """The scenario as lines a person can replay, for hypothesis's falsifying-example report."""
    names = {
        value: f"{prefix}{index}"
        for prefix, values in (("m", MENTORS), ("o", ORGS), ("a", ACTIVITIES))
        for index, value in enumerate(values)
    }
    lines = []
    for offset, (event, _) in enumerate(scenario.stream):
        if isinstance(event, ActivityLogged):
            lines.append(
                f"{offset}: log {names[event.activity_id]} by {names[event.mentor_id]} "
                f"{names[event.organization_id]} {event.occurred_at:%Y-%m-%d %H:%M}Z "
                f"{event.activity_type}"
            )
        elif isinstance(event, ActivityDeleted):
            lines.append(f"{offset}: delete {names[event.activity_id]} by {names[event.mentor_id]}")
        else:
            lines.append(
                f"{offset}: prefs {names[event.mentor_id]} "
                f"notify={event.milestone_notifications} at {event.changed_at:%H:%M}"
            )
    lines.append(f"deliveries: {scenario.deliveries}")
    lines.append(f"config: {scenario.config}")
    return lines


async def check(scenario: Scenario) -> tuple[Store, Oracle]:
    store, oracle = await run(scenario)
    assert store.outcomes() == oracle.outcomes()
    assert store.counts() == {key: count for key, count in oracle.counts.items() if count}
    # The annual count is the number of counted sessions in the ledger, never negative.
    ledger_counts = Counter(
        (row.mentor_id, row.year) for row in store.memory.tables.ledger.values() if row.counted
    )
    assert store.counts() == dict(ledger_counts)
    # The organization on a record is the one current when the milestone was reached.
    assert {key: r.organization_id for key, r in store.records.items()} == {
        key: organization_id for key, (_, _, organization_id) in oracle.records.items()
    }
    return store, oracle


EXAMPLES = settings(max_examples=200, deadline=None)


@EXAMPLES
@given(scenarios(org_mode="home"))
async def test_each_reached_milestone_is_recorded_once_whatever_the_batching(
    scenario: Scenario,
) -> None:
    for line in describe(scenario):
        note(line)
    store, _ = await check(scenario)
    home = dict(zip(MENTORS, ORGS, strict=True))
    assert all(r.organization_id == home[r.mentor_id] for r in store.records.values())


@EXAMPLES
@given(scenarios(org_mode="free", same_thresholds=True))
async def test_organization_changes_with_the_same_thresholds_do_not_depend_on_batching(
    scenario: Scenario,
) -> None:
    for line in describe(scenario):
        note(line)
    await check(scenario)


@EXAMPLES
@given(scenarios(org_mode="free"))
async def test_organization_switches_with_other_thresholds_do_not_depend_on_batching(
    scenario: Scenario,
) -> None:
    for line in describe(scenario):
        note(line)
    await check(scenario)


# --- the minimal counterexamples of a batch judged by its last organization ------------------
#
# With org_mode="free" and per-organization thresholds, a core that judges a whole batch by
# the thresholds of the organization of its *last* counted session disagrees with the contract
# applied one event at a time, where each session is judged by the organization it was logged
# under. These are the two minimal shapes hypothesis found against such a core.


def _log(activity: int, org: int, offset: int) -> tuple[Event, int]:
    event = ActivityLogged(
        event_type="activity.logged",
        schema_version=1,
        event_id=_event_id(offset),
        activity_id=ACTIVITIES[activity],
        mentor_id=MENTORS[0],
        organization_id=ORGS[org],
        occurred_at=WHENS[2],
        activity_type="session",
    )
    return event, 1_000 * (offset + 1)


def _missed_scenario(deliveries: list[tuple[int, int]]) -> Scenario:
    # o0 has the default (2,); o1 has an empty row (no milestones). The mentor reaches 2
    # under o0, then logs a third session under o1.
    stream = [_log(0, 0, 0), _log(1, 0, 1), _log(2, 1, 2)]
    config = Config(None, (2,), {ORGS[1]: ()}, DB_NOWS[0], 31, None)
    return Scenario(stream, deliveries, config)


def _reached_before_scenario(deliveries: list[tuple[int, int]]) -> Scenario:
    # o0 has the default (2, 3, 5); o1 has (1, 2). The first session (o0) reaches no
    # milestone; the second (o1) finds 1 already reached (a change of organization: the
    # contract's activity_id null) and crosses 2.
    stream = [_log(0, 0, 0), _log(1, 1, 1)]
    config = Config(None, (2, 3, 5), {ORGS[1]: (1, 2)}, DB_NOWS[0], 31, None)
    return Scenario(stream, deliveries, config)


async def test_milestone_reached_before_an_organization_switch_is_recorded_one_event_at_a_time() -> None:
    store, _ = await check(_missed_scenario([(0, 1), (1, 2), (2, 3)]))
    assert store.outcomes() == {(MENTORS[0], 2026, 2, "pending", ACTIVITIES[1])}


async def test_threshold_reached_before_an_organization_switch_has_no_activity_one_event_at_a_time(
) -> None:
    store, _ = await check(_reached_before_scenario([(0, 1), (1, 2)]))
    assert store.outcomes() == {
        (MENTORS[0], 2026, 1, "pending", None),
        (MENTORS[0], 2026, 2, "pending", ACTIVITIES[1]),
    }


async def test_milestone_reached_before_an_organization_switch_is_recorded_in_one_batch() -> None:
    # Judged by o1's empty thresholds only, milestone 2 (reached under o0) was never recorded.
    store, _ = await check(_missed_scenario([(0, 3)]))
    assert [r.organization_id for r in store.records.values()] == [ORGS[0]]


async def test_threshold_reached_before_an_organization_switch_has_no_activity_in_one_batch() -> None:
    # Walking o1's (1, 2) over both sessions gave milestone 1 the first session (logged under
    # o0, which has no milestone 1) as its crossing, where the contract says null.
    await check(_reached_before_scenario([(0, 2)]))
