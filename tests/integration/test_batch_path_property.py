"""The batch path against the real Postgres, compared with a one-event-at-a-time oracle and
with the in-memory adapter of the store port.

Random sequences of logs, duplicates, conflicting re-logs, deletes (also before their log) and
preference changes are cut into random batches and written through the engine's own
BatchWriter, once over each adapter. Whatever the cut, counts, milestone records and each
message's outcome must equal the oracle's, and be the same on both adapters.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from uuid import UUID
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from consumer.domain.batch import Envelope, PreferenceRow, preference_wins
from consumer.domain.calendar import is_late, session_year
from consumer.ops.metrics import Metrics
from consumer.store.migrate import migrate
from consumer.store.postgres import EVENT_OUTCOMES, BatchOptions, PostgresBatchStore
from consumer.stream.writer import BatchWriter
from schemas.events import ActivityDeleted, ActivityLogged, PreferencesChanged
from tests.support.memory_store import MemoryStore

TZ = ZoneInfo("Europe/Oslo")
THRESHOLDS = (2, 3, 5)
GRACE_DAYS = 31
MENTORS = [UUID(int=index + 1) for index in range(3)]
# The second organization has its own thresholds: a mentor moving between the two (within a
# batch, too) must be judged step by step, under the organization current at each step.
ORGS = [UUID(int=100), UUID(int=101)]
ORG_THRESHOLDS = {ORGS[1]: (1, 3)}
ACTIVITIES = [UUID(int=1000 + index) for index in range(10)]
# Around the Oslo new year, so some sessions fall in 2025 (late, suppressed) and some in 2026.
MOMENTS = [
    datetime(2025, 12, 31, 22, 30, tzinfo=UTC),
    datetime(2025, 12, 31, 23, 30, tzinfo=UTC),
    datetime(2026, 3, 14, 9, 0, tzinfo=UTC),
]
CHANGED = [datetime(2026, 1, 1, tzinfo=UTC) + timedelta(hours=hour) for hour in range(3)]
TYPES = ["session", "session", "call"]
COUNTED = frozenset({"session"})
EVENT_ID = UUID(int=7)


@dataclass(frozen=True)
class Log:
    activity: int
    mentor: int
    moment: int
    kind: int
    org: int = 0


@dataclass(frozen=True)
class Delete:
    activity: int
    mentor: int


@dataclass(frozen=True)
class Preference:
    mentor: int
    enabled: bool
    changed: int


events_strategy = st.lists(
    st.one_of(
        st.builds(Log, st.integers(0, 9), st.integers(0, 2), st.integers(0, 2), st.integers(0, 2),
                  st.sampled_from([0, 0, 0, 1])),
        st.builds(Delete, st.integers(0, 9), st.integers(0, 2)),
        st.builds(Preference, st.integers(0, 2), st.booleans(), st.integers(0, 2)),
    ),
    min_size=1,
    max_size=40,
)


def to_event(item: Log | Delete | Preference) -> ActivityLogged | ActivityDeleted | PreferencesChanged:
    if isinstance(item, Log):
        mentor = MENTORS[item.mentor]
        return ActivityLogged(
            event_type="activity.logged", schema_version=1, event_id=EVENT_ID,
            activity_id=ACTIVITIES[item.activity], mentor_id=mentor, organization_id=ORGS[item.org],
            occurred_at=MOMENTS[item.moment], activity_type=TYPES[item.kind],
        )
    if isinstance(item, Delete):
        mentor = MENTORS[item.mentor]
        return ActivityDeleted(
            event_type="activity.deleted", schema_version=1, event_id=EVENT_ID,
            activity_id=ACTIVITIES[item.activity], mentor_id=mentor, organization_id=ORGS[0],
            deleted_at=CHANGED[0],
        )
    return PreferencesChanged(
        event_type="preferences.changed", schema_version=1, event_id=EVENT_ID,
        mentor_id=MENTORS[item.mentor], milestone_notifications=item.enabled,
        changed_at=CHANGED[item.changed],
    )


Record = tuple[UUID, int, int, str, UUID | None, int, UUID]


def oracle(batches: Sequence[Sequence[Log | Delete | Preference]], db_now: datetime
           ) -> tuple[dict[tuple[UUID, int], int], set[Record], Counter[str]]:
    """One event at a time; a batch's preference changes first (the contract's rule).

    Also what became of each event (``milestones_events_total``'s outcomes)."""
    outcomes: Counter[str] = Counter()
    ledger: dict[UUID, dict[str, object]] = {}
    counts: dict[tuple[UUID, int], int] = defaultdict(int)
    touched: set[tuple[UUID, int]] = set()
    prefs: dict[UUID, PreferenceRow] = {}
    records: dict[tuple[UUID, int, int], Record] = {}
    for batch in batches:
        reached_before: list[tuple[UUID, int, int]] = []
        for item in batch:
            if isinstance(item, Preference):
                outcomes["preference"] += 1
                row = PreferenceRow(MENTORS[item.mentor], item.enabled, CHANGED[item.changed])
                if row.mentor_id not in prefs or preference_wins(row, prefs[row.mentor_id]):
                    prefs[row.mentor_id] = row
        for item in batch:
            if isinstance(item, Preference):
                continue
            activity = ACTIVITIES[item.activity]
            if isinstance(item, Log):
                mentor = MENTORS[item.mentor]
                year = session_year(MOMENTS[item.moment], TZ)
                fields = (mentor, ORGS[item.org], MOMENTS[item.moment], TYPES[item.kind])
                entry = ledger.get(activity)
                if entry is not None:
                    if entry["mentor"] is None:
                        entry.update(mentor=mentor, year=year, fields=fields)
                        outcomes["not_counted"] += 1
                    else:
                        outcomes["duplicate" if entry["fields"] == fields else "conflict"] += 1
                    continue
                counted = TYPES[item.kind] in COUNTED
                ledger[activity] = {"mentor": mentor, "year": year, "counted": counted,
                                    "deleted": False, "fields": fields}
                outcomes["counted" if counted else "not_counted"] += 1
                if not counted:
                    continue
                key = (mentor, year)
                counts[key] += 1
                touched.add(key)
                org = ORGS[item.org]
                opted_out = key[0] in prefs and not prefs[key[0]].milestone_notifications
                late = is_late(year, db_now, TZ, GRACE_DAYS)
                for threshold in ORG_THRESHOLDS.get(org, THRESHOLDS):
                    if counts[key] < threshold:
                        break
                    if (mentor, year, threshold) not in records:
                        status = "suppressed" if opted_out or late else "pending"
                        crossed = counts[key] == threshold
                        records[(mentor, year, threshold)] = (
                            mentor, year, threshold, status, activity if crossed else None,
                            threshold, org)
                        if not crossed:
                            reached_before.append((mentor, year, threshold))
            else:
                entry = ledger.get(activity)
                if entry is None:
                    ledger[activity] = {"mentor": None, "year": None, "counted": False,
                                        "deleted": True}
                    outcomes["nothing_removed"] += 1
                elif entry["deleted"]:
                    outcomes["duplicate"] += 1
                else:
                    entry["deleted"] = True
                    outcomes["removed" if entry["counted"] else "nothing_removed"] += 1
                    if entry["counted"]:
                        entry["counted"] = False
                        key = (entry["mentor"], entry["year"])  # type: ignore[assignment]
                        counts[key] -= 1
        # A milestone reached before its evaluating step records the count after the batch.
        for mentor, year, threshold in reached_before:
            old = records[(mentor, year, threshold)]
            records[(mentor, year, threshold)] = (*old[:5], counts[(mentor, year)], old[6])
    return {key: counts[key] for key in touched}, set(records.values()), +outcomes


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    async with pool.acquire() as connection:
        await migrate(connection)
    yield pool
    await pool.close()


def split(items: list[Log | Delete | Preference], cuts: list[int]) -> list[list[Log | Delete | Preference]]:
    points = sorted({cut % (len(items) + 1) for cut in cuts} | {0, len(items)})
    return [items[a:b] for a, b in itertools.pairwise(points) if b > a]


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(items=events_strategy, cuts=st.lists(st.integers(0, 40), max_size=6))
# A batch that logs an id twice after an earlier batch logged it: the repeats are judged
# against the log that won (the earlier batch's), not the batch's own first.
@example(items=[Log(0, 0, 0, 0), Log(0, 0, 0, 2), Log(0, 0, 0, 0)], cuts=[1])
@example(items=[Log(0, 0, 0, 0), Log(0, 0, 0, 2), Log(0, 0, 0, 2)], cuts=[1])
async def test_any_batching_gives_the_one_at_a_time_result(
    pool: asyncpg.Pool, items: list[Log | Delete | Preference], cuts: list[int]
) -> None:
    async with pool.acquire() as connection:
        await connection.execute(
            "TRUNCATE activity_ledger, annual_summary, scenario_notifications, mentor_preferences,"
            " milestone_thresholds"
        )
        await connection.execute(
            "INSERT INTO milestone_thresholds VALUES ($1, $2)", ORGS[1], list(ORG_THRESHOLDS[ORGS[1]])
        )
        db_now = await connection.fetchval("SELECT now()")
    options = BatchOptions(tz=TZ, default_thresholds=THRESHOLDS, grace_days=GRACE_DAYS)
    metrics, memory_metrics = Metrics(), Metrics()
    memory = MemoryStore(clock=lambda: db_now)
    memory.set_thresholds(ORGS[1], ORG_THRESHOLDS[ORGS[1]])
    writers = [
        BatchWriter(PostgresBatchStore(pool), options, metrics, counted_types=COUNTED),
        BatchWriter(memory, options, memory_metrics, counted_types=COUNTED),
    ]
    batches = split(items, cuts)
    position = 0
    for batch in batches:
        envelopes = []
        for item in batch:
            envelopes.append(Envelope(to_event(item), position, "t", 0, position, 1_795_000_000_000))
            position += 1
        for writer in writers:
            outcome = await writer.write(envelopes)
            assert not outcome.refused
    expected_counts, expected_records, expected_outcomes = oracle(batches, db_now)
    async with pool.acquire() as connection:
        summary = {
            (row["user_id"], row["year"]): row["session_count"]
            for row in await connection.fetch("SELECT user_id, year, session_count FROM annual_summary")
        }
        stored = {
            (row["user_id"], row["year"], row["milestone_value"], row["status"], row["activity_id"],
             row["session_count"], row["organization_id"])
            for row in await connection.fetch(
                "SELECT user_id, year, milestone_value, status, activity_id, session_count,"
                " organization_id FROM scenario_notifications")
        }
    assert {key: value for key, value in summary.items()} == expected_counts
    assert stored == expected_records
    # Every event has exactly one outcome, the one it would have alone, whatever the batching.
    outcomes = {
        outcome: metrics.value("milestones_events_total", outcome=outcome)
        for outcome in EVENT_OUTCOMES
    }
    assert {key: value for key, value in outcomes.items() if value} == expected_outcomes
    assert sum(outcomes.values()) == len(items)
    # The in-memory adapter: the same summaries, records and outcomes.
    assert {key: row.count for key, row in memory.tables.summaries.items()} == summary
    assert {
        (r.mentor_id, r.year, r.milestone_value, r.status, r.activity_id, r.session_count,
         r.organization_id)
        for r in memory.tables.records.values()
    } == stored
    assert {
        outcome: memory_metrics.value("milestones_events_total", outcome=outcome)
        for outcome in EVENT_OUTCOMES
    } == outcomes
