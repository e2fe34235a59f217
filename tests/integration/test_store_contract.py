"""One contract suite for the store port, run over both adapters: in memory and Postgres.

Each test writes planned batches through ``BatchStore.apply`` and reads back what the contract
makes visible (annual counts and their organization, milestone records, each message's
outcome). The ``store`` fixture is parametrized: every case runs once per adapter, so the
in-memory statement of the rules (``tests/support/memory_store.py``) and the SQL
(``consumer/store/batch_sql.py``) cannot drift apart without a red test here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from consumer.domain.batch import plan_batch
from consumer.store.port import BatchOptions, BatchResult, BatchStore
from consumer.store.postgres import PostgresBatchStore
from consumer.store.retention import close_years
from tests.integration.operations import connect, envelopes_of
from tests.support import events
from tests.support.memory_store import MemoryStore
from tests.support.postgres import create_database, drop_database

TZ = ZoneInfo("Europe/Oslo")
OPTIONS = BatchOptions(tz=TZ, default_thresholds=(2, 3, 5), grace_days=31)
MARCH = "2026-03-14T10:00:00+01:00"


@dataclass(frozen=True)
class Row:
    """A milestone record as the contract shows it."""

    mentor: str
    year: int
    value: int
    status: str
    reason: str | None
    activity: str | None
    session_count: int
    organization: str
    reached_at_is_created_at: bool


class Harness(Protocol):
    """An adapter under test, and what the suite reads back from it."""

    store: BatchStore

    async def set_thresholds(self, organization: str, thresholds: Sequence[int]) -> None: ...
    async def close_years(self, through_year: int) -> None: ...
    async def summaries(self) -> dict[tuple[str, int], tuple[int, str | None]]: ...
    async def records(self) -> set[Row]: ...


class MemoryHarness:
    def __init__(self) -> None:
        self.memory = MemoryStore()
        self.store: BatchStore = self.memory

    async def set_thresholds(self, organization: str, thresholds: Sequence[int]) -> None:
        from uuid import UUID

        self.memory.set_thresholds(UUID(organization), thresholds)

    async def close_years(self, through_year: int) -> None:
        self.memory.close_years(through_year)

    async def summaries(self) -> dict[tuple[str, int], tuple[int, str | None]]:
        return {
            (str(mentor), year): (summary.count, _text(summary.organization_id))
            for (mentor, year), summary in self.memory.tables.summaries.items()
        }

    async def records(self) -> set[Row]:
        return {
            Row(str(r.mentor_id), r.year, r.milestone_value, r.status, r.suppressed_reason,
                _text(r.activity_id), r.session_count, str(r.organization_id),
                r.activity_id is None)
            for r in self.memory.tables.records.values()
        }


class PostgresHarness:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.store: BatchStore = PostgresBatchStore(pool)

    async def set_thresholds(self, organization: str, thresholds: Sequence[int]) -> None:
        await self.pool.execute(
            "INSERT INTO milestone_thresholds (organization_id, thresholds) VALUES ($1, $2)"
            " ON CONFLICT (organization_id) DO UPDATE SET thresholds = excluded.thresholds",
            organization, list(thresholds),
        )

    async def close_years(self, through_year: int) -> None:
        async with self.pool.acquire() as connection:
            await close_years(connection, through_year)

    async def summaries(self) -> dict[tuple[str, int], tuple[int, str | None]]:
        rows = await self.pool.fetch(
            "SELECT user_id, year, session_count, organization_id FROM annual_summary"
        )
        return {
            (str(row["user_id"]), row["year"]): (row["session_count"], _text(row["organization_id"]))
            for row in rows
        }

    async def records(self) -> set[Row]:
        rows = await self.pool.fetch(
            "SELECT user_id, year, milestone_value, status, suppressed_reason, activity_id,"
            " session_count, organization_id, reached_at = created_at AS same"
            " FROM scenario_notifications"
        )
        return {
            Row(str(row["user_id"]), row["year"], row["milestone_value"], row["status"],
                row["suppressed_reason"], _text(row["activity_id"]), row["session_count"],
                str(row["organization_id"]), row["same"])
            for row in rows
        }


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


@pytest.fixture(params=["memory", "postgres"])
async def store(request: pytest.FixtureRequest, postgres_admin_dsn: str) -> AsyncIterator[Harness]:
    """Each adapter in turn, empty; Postgres in a database of its own, migrated."""
    if request.param == "memory":
        yield MemoryHarness()
        return
    name, database_url = await create_database(postgres_admin_dsn)
    try:
        await (await connect(database_url)).close()
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
        try:
            yield PostgresHarness(pool)
        finally:
            await pool.close()
    finally:
        await drop_database(postgres_admin_dsn, name)


async def apply(
    harness: Harness, batch: Sequence[Mapping[str, Any]], *, options: BatchOptions = OPTIONS,
    counted_types: frozenset[str] | None = None, timestamp_ms: int | None = None,
) -> BatchResult:
    """One batch through the port, planned as the writer plans it (closed years left to the
    store, as in the moment between ``prune`` and the writer's next read of its watermark)."""
    plan = plan_batch(envelopes_of(batch, timestamp_ms=timestamp_ms), tz=TZ,
                      counted_types=counted_types)
    return await harness.store.apply(plan, options)


def outcomes(*results: BatchResult) -> Counter[str]:
    return +sum((result.outcomes for result in results), Counter())


# --- counting --------------------------------------------------------------------------------


async def test_the_first_log_of_an_activity_wins(store: Harness) -> None:
    mentor, other, activity = events.new_id(), events.new_id(), events.new_id()
    first = await apply(store, [events.logged(mentor, activity)])
    again = await apply(store, [events.logged(mentor, activity)])
    changed = await apply(store, [events.logged(other, activity, "2026-05-01T10:00:00+02:00")])

    assert await store.summaries() == {(mentor, 2026): (1, events.ORG)}
    assert outcomes(first, again, changed) == {"counted": 1, "duplicate": 1, "conflict": 1}
    assert (first.new_sessions, changed.conflicts) == (1, 1)


async def test_a_delete_takes_the_session_from_where_it_was_counted_whatever_mentor_it_names(
    store: Harness,
) -> None:
    mentor, stranger, activity = events.new_id(), events.new_id(), events.new_id()
    await apply(store, [events.logged(mentor, activity), events.logged(mentor)])
    removed = await apply(store, [events.deleted(stranger, activity)])
    repeated = await apply(store, [events.deleted(mentor, activity)])

    assert await store.summaries() == {(mentor, 2026): (1, events.ORG)}
    assert outcomes(removed, repeated) == {"removed": 1, "duplicate": 1}
    assert removed.removed_sessions == 1


async def test_a_delete_before_its_log_is_remembered_and_the_log_never_counts(
    store: Harness,
) -> None:
    mentor, early, late = events.new_id(), events.new_id(), events.new_id()
    first = await apply(store, [events.deleted(mentor, early)])
    # In one batch, too: the delete comes first, then its log.
    second = await apply(store, [events.logged(mentor, early), events.deleted(mentor, late),
                                 events.logged(mentor, late), events.logged(mentor)])

    assert await store.summaries() == {(mentor, 2026): (1, events.ORG)}
    assert outcomes(first, second) == {"nothing_removed": 2, "not_counted": 2, "counted": 1}


async def test_sessions_of_a_type_not_counted_never_enter_the_count(store: Harness) -> None:
    mentor = events.new_id()
    result = await apply(store, [events.logged(mentor, activity_type="call")] * 3,
                         counted_types=frozenset({"session"}))

    assert await store.summaries() == {}
    assert outcomes(result) == {"not_counted": 1, "duplicate": 2}


async def test_the_organization_is_that_of_the_latest_counted_session(store: Harness) -> None:
    mentor, last = events.new_id(), events.new_id()
    await apply(store, [events.logged(mentor, organization_id=events.ORG)])
    await apply(store, [events.logged(mentor, last, organization_id=events.OTHER_ORG)])
    await apply(store, [events.deleted(mentor, last)])  # a delete does not change it

    assert await store.summaries() == {(mentor, 2026): (1, events.OTHER_ORG)}


async def test_a_closed_year_takes_no_new_session(store: Harness) -> None:
    mentor = events.new_id()
    await store.close_years(2025)
    result = await apply(store, [events.logged(mentor, occurred_at="2025-06-01T10:00:00+02:00"),
                                 events.logged(mentor)])

    assert await store.summaries() == {(mentor, 2026): (1, events.ORG)}
    assert outcomes(result) == {"closed_year": 1, "counted": 1}


# --- milestones ------------------------------------------------------------------------------


async def test_thresholds_ascend_without_repeats_and_stop_at_the_first_not_reached(
    store: Harness,
) -> None:
    mentor, none_org = events.new_id(), events.new_id()
    await store.set_thresholds(events.OTHER_ORG, [4, 1, 2, 2])
    await store.set_thresholds(none_org, [])
    await apply(store, [events.logged(mentor, organization_id=events.OTHER_ORG) for _ in range(3)])
    quiet = events.new_id()
    await apply(store, [events.logged(quiet, organization_id=none_org) for _ in range(5)])

    assert {(r.mentor, r.value, r.session_count) for r in await store.records()} == {
        (mentor, 1, 1), (mentor, 2, 2)
    }


async def test_a_crossing_names_its_session_and_a_later_threshold_has_none(store: Harness) -> None:
    mentor = events.new_id()
    sessions = [events.logged(mentor) for _ in range(3)]
    await apply(store, sessions)
    # A threshold added later: reached before the evaluating session, so no crossing.
    await store.set_thresholds(events.ORG, [1, 2, 3, 4])
    fourth = events.logged(mentor)
    await apply(store, [fourth])

    org = events.ORG
    assert await store.records() == {
        Row(mentor, 2026, 2, "pending", None, sessions[1]["activity_id"], 2, org, False),
        Row(mentor, 2026, 3, "pending", None, sessions[2]["activity_id"], 3, org, False),
        Row(mentor, 2026, 1, "pending", None, None, 4, org, True),
        Row(mentor, 2026, 4, "pending", None, fourth["activity_id"], 4, org, False),
    }


async def test_a_milestone_is_recorded_once_ever(store: Harness) -> None:
    mentor, a, b = events.new_id(), events.new_id(), events.new_id()
    first = await apply(store, [events.logged(mentor, a), events.logged(mentor, b)])
    await apply(store, [events.deleted(mentor, b)])  # below 2 again
    again = await apply(store, [events.logged(mentor)])  # and back to 2: nothing new
    redo = await store.store.apply(
        plan_batch(envelopes_of([events.logged(mentor, a), events.logged(mentor, b)]), tz=TZ,
                   counted_types=None), OPTIONS)

    assert [r.milestone_value for r in first.records] == [2]
    assert (again.records, redo.records) == ([], [])
    assert {(r.value, r.activity) for r in await store.records()} == {(2, b)}
    assert first.pending == 1


async def test_an_opted_out_mentor_is_recorded_suppressed_with_the_reason(store: Harness) -> None:
    out, back, tie, tie_in_first = (events.new_id() for _ in range(4))
    noon = "2026-03-01T12:00:00+00:00"
    # The batch's preference changes apply before its sessions, wherever they stand in it.
    await apply(store, [events.logged(out), events.logged(out), events.preference(out, False)])
    # The latest changed_at wins: an older opt-out arriving later changes nothing.
    await apply(store, [events.preference(back, True, "2026-03-02T12:00:00+00:00")])
    await apply(store, [events.preference(back, False, noon), events.logged(back),
                        events.logged(back)])
    # On a tie, opted out wins, in whichever order the two arrive.
    for mentor, first, second in ((tie, False, True), (tie_in_first, True, False)):
        await apply(store, [events.preference(mentor, first, noon)])
        await apply(store, [events.preference(mentor, second, noon), events.logged(mentor),
                            events.logged(mentor)])

    assert {(r.mentor, r.status, r.reason) for r in await store.records()} == {
        (out, "suppressed", "opted_out"),
        (back, "pending", None),
        (tie, "suppressed", "opted_out"),
        (tie_in_first, "suppressed", "opted_out"),
    }


async def test_a_past_year_congratulates_only_within_its_grace(store: Harness) -> None:
    # Judged by the store's own clock; the grace is set around the time since this new year.
    now = datetime.now(UTC)
    this_year = now.astimezone(TZ).year
    since_new_year = now - datetime(this_year, 1, 1, tzinfo=TZ)
    if since_new_year < timedelta(days=2):
        pytest.skip("within two days of the new year the grace cannot be set around now")
    days = since_new_year.days
    last_year = f"{this_year - 1}-06-01T10:00:00+02:00"
    within, after = events.new_id(), events.new_id()
    grace = {within: days + 1, after: days - 1}
    for mentor, grace_days in grace.items():
        options = BatchOptions(tz=TZ, default_thresholds=(2,), grace_days=grace_days)
        await apply(store, [events.logged(mentor, occurred_at=last_year) for _ in range(2)],
                    options=options)

    assert {(r.mentor, r.year, r.status, r.reason) for r in await store.records()} == {
        (within, this_year - 1, "pending", None),
        (after, this_year - 1, "suppressed", "grace_period_over"),
    }


async def test_a_no_notify_replay_suppresses_what_older_records_reach(store: Harness) -> None:
    old, new = events.new_id(), events.new_id()
    options = BatchOptions(tz=TZ, default_thresholds=(2,), grace_days=31,
                           suppress_before_ms=2_000)
    await apply(store, [events.logged(old), events.logged(old)], options=options,
                timestamp_ms=1_999)
    await apply(store, [events.logged(new), events.logged(new)], options=options,
                timestamp_ms=2_000)

    assert {(r.mentor, r.status, r.reason) for r in await store.records()} == {
        (old, "suppressed", "replay_no_notify"), (new, "pending", None)
    }


async def test_a_record_of_one_year_never_blocks_another(store: Harness) -> None:
    mentor = events.new_id()
    await apply(store, [events.logged(mentor, occurred_at=at) for at in
                        ("2026-01-02T10:00:00+01:00", "2026-01-03T10:00:00+01:00")])
    await apply(store, [events.logged(mentor, occurred_at=at) for at in
                        ("2025-01-02T10:00:00+01:00", "2025-01-03T10:00:00+01:00")])

    assert {(r.year, r.value) for r in await store.records()} == {(2026, 2), (2025, 2)}
