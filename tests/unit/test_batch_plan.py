"""Planning a batch (dedupe, deletes, preferences) and tallying what the store accepted."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from consumer.domain.batch import (
    BatchPlan,
    Envelope,
    Event,
    PreferenceRow,
    Removed,
    RepeatedLog,
    plan_batch,
    preference_wins,
    rejudge_repeats,
    tally,
    thresholds_for,
)
from consumer.domain.milestones import Step
from schemas.events import ActivityDeleted, ActivityLogged, PreferencesChanged

OSLO = ZoneInfo("Europe/Oslo")
ACTIVITY_TOPIC, PREFERENCES_TOPIC = "activity-logged", "mentor-preferences"
T0 = datetime(2026, 3, 14, 9, 0, tzinfo=UTC)
MENTOR = uuid.UUID("10000000-0000-4000-8000-000000000001")
MENTOR_2 = uuid.UUID("20000000-0000-4000-8000-000000000002")
ORG = uuid.UUID("a0000000-0000-4000-8000-00000000000a")
ORG_2 = uuid.UUID("b0000000-0000-4000-8000-00000000000b")
# Ids whose sort order is the reverse of the order they are used in below.
A = uuid.UUID("ffffffff-0000-4000-8000-00000000000a")
B = uuid.UUID("88888888-0000-4000-8000-00000000000b")
C = uuid.UUID("11111111-0000-4000-8000-00000000000c")


def logged(
    activity_id: uuid.UUID,
    *,
    mentor_id: uuid.UUID = MENTOR,
    organization_id: uuid.UUID = ORG,
    occurred_at: datetime = T0,
    activity_type: str = "session",
) -> ActivityLogged:
    return ActivityLogged(
        event_type="activity.logged",
        schema_version=1,
        event_id=uuid.uuid4(),
        activity_id=activity_id,
        mentor_id=mentor_id,
        organization_id=organization_id,
        occurred_at=occurred_at,
        activity_type=activity_type,
    )


def deleted(
    activity_id: uuid.UUID, *, mentor_id: uuid.UUID = MENTOR, deleted_at: datetime = T0
) -> ActivityDeleted:
    return ActivityDeleted(
        event_type="activity.deleted",
        schema_version=1,
        event_id=uuid.uuid4(),
        activity_id=activity_id,
        mentor_id=mentor_id,
        organization_id=ORG,
        deleted_at=deleted_at,
    )


def preference(mentor_id: uuid.UUID, notify: bool, changed_at: datetime) -> PreferencesChanged:
    return PreferencesChanged(
        event_type="preferences.changed",
        schema_version=1,
        event_id=uuid.uuid4(),
        mentor_id=mentor_id,
        milestone_notifications=notify,
        changed_at=changed_at,
    )


def batch(*events: Event) -> list[Envelope]:
    """Envelopes in the given order; offsets and record timestamps follow the position."""
    return [
        Envelope(
            event=event,
            position=position,
            topic=PREFERENCES_TOPIC if isinstance(event, PreferencesChanged) else ACTIVITY_TOPIC,
            partition=0,
            offset=100 + position,
            timestamp_ms=1_000 * (position + 1),
        )
        for position, event in enumerate(events)
    ]


def plan(*events: Event, counted_types: frozenset[str] | None = None) -> BatchPlan:
    return plan_batch(batch(*events), tz=OSLO, counted_types=counted_types)


# --- plan_batch: logs --------------------------------------------------------------------------


def test_first_log_of_an_activity_wins() -> None:
    first = logged(A, occurred_at=T0)
    result = plan(first, logged(A, occurred_at=T0 + timedelta(days=1), mentor_id=MENTOR_2))
    assert len(result.logs) == 1
    row = result.logs[0]
    assert (row.mentor_id, row.occurred_at, row.position, row.timestamp_ms) == (
        MENTOR, T0, 0, 1_000
    )
    assert row.counted
    assert row.deleted_at is None


def test_same_activity_with_the_same_fields_again_is_a_duplicate() -> None:
    result = plan(logged(A), logged(A), logged(A))
    assert (len(result.logs), result.duplicates, result.conflicts) == (1, 2, 0)


def test_same_instant_written_with_another_offset_is_a_duplicate() -> None:
    shifted = T0.astimezone(ZoneInfo("Asia/Tokyo"))
    result = plan(logged(A, occurred_at=T0), logged(A, occurred_at=shifted))
    assert (result.duplicates, result.conflicts) == (1, 0)


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"occurred_at": T0 + timedelta(minutes=1)}, id="another date"),
        pytest.param({"activity_type": "call"}, id="another type"),
        pytest.param({"mentor_id": MENTOR_2}, id="another mentor"),
        pytest.param({"organization_id": ORG_2}, id="another organization"),
    ],
)
def test_same_activity_with_other_fields_is_a_conflict_and_changes_nothing(
    change: dict[str, object],
) -> None:
    later = logged(A).model_copy(update=change)
    result = plan(logged(A), later)
    assert (result.duplicates, result.conflicts) == (0, 1)
    assert len(result.logs) == 1
    row = result.logs[0]
    assert (row.mentor_id, row.organization_id, row.occurred_at, row.activity_type) == (
        MENTOR, ORG, T0, "session"
    )


def test_a_duplicate_after_a_conflict_is_still_compared_with_the_first_log() -> None:
    result = plan(logged(A), logged(A, activity_type="call"), logged(A))
    assert (result.duplicates, result.conflicts) == (1, 1)


def test_session_year_is_computed_in_the_configured_zone() -> None:
    result = plan(logged(A, occurred_at=datetime(2025, 12, 31, 23, 30, tzinfo=UTC)))
    assert result.logs[0].year == 2026
    in_utc = plan_batch(
        batch(logged(A, occurred_at=datetime(2025, 12, 31, 23, 30, tzinfo=UTC))),
        tz=ZoneInfo("UTC"),
        counted_types=None,
    )
    assert in_utc.logs[0].year == 2025


# --- plan_batch: deletes -----------------------------------------------------------------------


def test_delete_before_log_in_a_batch_marks_the_log_uncounted_with_its_deleted_at() -> None:
    when = T0 + timedelta(hours=2)
    result = plan(deleted(A, deleted_at=when), logged(A))
    assert len(result.logs) == 1
    assert not result.logs[0].counted
    assert result.logs[0].deleted_at == when
    assert [(row.activity_id, row.deleted_at, row.position) for row in result.deletes] == [
        (A, when, 0)
    ]


def test_delete_after_log_in_a_batch_leaves_the_log_counted() -> None:
    result = plan(logged(A), deleted(A))
    assert result.logs[0].counted
    assert result.logs[0].deleted_at is None
    assert [(row.activity_id, row.position, row.timestamp_ms) for row in result.deletes] == [
        (A, 1, 2_000)
    ]


def test_first_delete_of_an_activity_is_kept() -> None:
    first, second = T0, T0 + timedelta(days=1)
    result = plan(deleted(A, deleted_at=first), deleted(A, deleted_at=second))
    assert [(row.deleted_at, row.position) for row in result.deletes] == [(first, 0)]


def test_delete_of_an_activity_not_in_the_batch_is_kept_for_the_store() -> None:
    result = plan(deleted(A, mentor_id=MENTOR_2))
    assert result.logs == []
    assert [row.activity_id for row in result.deletes] == [A]
    assert not result.empty


def test_delete_before_log_of_another_activity_does_not_touch_it() -> None:
    result = plan(deleted(B), logged(A))
    assert result.logs[0].counted


# --- plan_batch: counted types -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("activity_type", "counted"),
    [
        ("session", True),
        ("group session", True),
        ("Session", False),
        ("SESSION", False),
        ("session ", False),
        (" session", False),
        ("call", False),
    ],
)
def test_counted_types_match_exactly_and_case_sensitively(
    activity_type: str, counted: bool
) -> None:
    result = plan(logged(A, activity_type=activity_type),
                  counted_types=frozenset({"session", "group session"}))
    assert result.logs[0].counted is counted
    assert [row.activity_id for row in result.logs] == [A]  # it still takes the dedupe key


def test_without_counted_types_every_type_counts() -> None:
    result = plan(logged(A, activity_type="anything"), logged(B, activity_type="Session"))
    assert all(row.counted for row in result.logs)


def test_uncounted_type_deleted_first_stays_uncounted() -> None:
    result = plan(deleted(A), logged(A, activity_type="call"), counted_types=frozenset({"session"}))
    assert not result.logs[0].counted
    assert result.logs[0].deleted_at == T0


# --- plan_batch: preferences -------------------------------------------------------------------


def test_latest_changed_at_wins_whatever_the_order_in_the_batch() -> None:
    early, late = T0, T0 + timedelta(minutes=1)
    for events in (
        (preference(MENTOR, False, early), preference(MENTOR, True, late)),
        (preference(MENTOR, True, late), preference(MENTOR, False, early)),
    ):
        result = plan(*events)
        assert result.preferences == [PreferenceRow(MENTOR, True, late)]


@pytest.mark.parametrize("opt_out_first", [True, False])
def test_preference_tie_goes_to_opted_out(opt_out_first: bool) -> None:
    out, back_in = preference(MENTOR, False, T0), preference(MENTOR, True, T0)
    result = plan(*((out, back_in) if opt_out_first else (back_in, out)))
    assert result.preferences == [PreferenceRow(MENTOR, False, T0)]


def test_preferences_are_kept_one_per_mentor() -> None:
    result = plan(
        preference(MENTOR_2, False, T0),
        preference(MENTOR, True, T0),
        preference(MENTOR_2, True, T0 - timedelta(days=1)),
    )
    assert result.preferences == [
        PreferenceRow(MENTOR, True, T0),
        PreferenceRow(MENTOR_2, False, T0),
    ]


def test_same_instant_in_another_offset_is_a_tie() -> None:
    out = preference(MENTOR, False, T0.astimezone(ZoneInfo("America/New_York")))
    result = plan(out, preference(MENTOR, True, T0))
    assert [row.milestone_notifications for row in result.preferences] == [False]


@pytest.mark.parametrize(
    ("new", "old", "wins"),
    [
        pytest.param((True, 2), (False, 1), True, id="later opt-in"),
        pytest.param((False, 2), (True, 1), True, id="later opt-out"),
        pytest.param((True, 1), (False, 2), False, id="earlier opt-in"),
        pytest.param((False, 1), (True, 2), False, id="earlier opt-out"),
        pytest.param((False, 1), (True, 1), True, id="tie, opt-out over opt-in"),
        pytest.param((True, 1), (False, 1), False, id="tie, opt-in under opt-out"),
        pytest.param((True, 1), (True, 1), False, id="same opt-in"),
        pytest.param((False, 1), (False, 1), False, id="same opt-out"),
    ],
)
def test_preference_wins(new: tuple[bool, int], old: tuple[bool, int], wins: bool) -> None:
    def row(value: tuple[bool, int]) -> PreferenceRow:
        return PreferenceRow(MENTOR, value[0], T0 + timedelta(seconds=value[1]))

    assert preference_wins(row(new), row(old)) is wins


# --- plan_batch: shape -------------------------------------------------------------------------


def test_rows_are_sorted_by_key() -> None:
    result = plan(
        preference(MENTOR_2, True, T0),
        logged(A),
        deleted(A),
        logged(B),
        deleted(C),
        logged(C, mentor_id=MENTOR_2),
        deleted(B),
        preference(MENTOR, True, T0),
    )
    assert [row.activity_id for row in result.logs] == sorted([A, B, C])
    assert [row.activity_id for row in result.deletes] == sorted([A, B, C])
    assert [row.mentor_id for row in result.preferences] == sorted([MENTOR, MENTOR_2])
    # The order of arrival survives in the positions.
    assert {row.activity_id: row.position for row in result.logs} == {A: 1, B: 3, C: 5}


def test_empty_batch_plans_nothing() -> None:
    result = plan()
    assert result.empty
    assert (result.logs, result.deletes, result.preferences) == ([], [], [])
    assert (result.duplicates, result.conflicts, result.closed_year) == (0, 0, 0)


def test_plan_keeps_the_envelopes() -> None:
    envelopes = batch(logged(A), deleted(B))
    assert plan_batch(envelopes, tz=OSLO, counted_types=None).envelopes == envelopes


def test_only_preferences_is_not_empty() -> None:
    assert not plan(preference(MENTOR, False, T0)).empty


def test_logs_of_closed_years_are_dropped_and_counted() -> None:
    old = logged(A, occurred_at=datetime(2024, 6, 1, tzinfo=UTC))
    boundary = logged(B, occurred_at=datetime(2024, 12, 31, 23, 30, tzinfo=UTC))  # 2025 in Oslo
    result = plan_batch(
        batch(old, boundary, deleted(A)), tz=OSLO, counted_types=None, closed_through_year=2024
    )
    assert [row.activity_id for row in result.logs] == [B]
    assert result.closed_year == 1
    assert [row.activity_id for row in result.deletes] == [A]


# --- tally ---------------------------------------------------------------------------------


def missed_unless(plan: BatchPlan, *entered: uuid.UUID) -> list[uuid.UUID]:
    """What the database reports for a batch where only ``entered`` entered the count."""
    return [row.activity_id for row in plan.logs if row.counted and row.activity_id not in entered]


def test_tally_orders_steps_per_mentor_year_by_position() -> None:
    # Positions: A(0) B(1) delete-C(2) C-was-counted-earlier; sorted ids run the other way.
    result = plan(logged(A), logged(B), deleted(C))
    changes = tally(result, missed_unless(result, B, A), removed=[Removed(C, MENTOR, 2026)])
    assert list(changes) == [(MENTOR, 2026)]
    change = changes[(MENTOR, 2026)]
    assert [(s.delta, s.activity_id) for s in change.steps] == [(1, A), (1, B), (-1, C)]
    assert change.delta == 1
    assert change.newest_timestamp_ms == 3_000


def test_tally_steps_carry_occurred_at_and_record_timestamp() -> None:
    result = plan(logged(A, occurred_at=T0), deleted(A))
    changes = tally(result, missed_unless(result, A), [Removed(A, MENTOR, 2026)])
    assert [_fields(step) for step in changes[(MENTOR, 2026)].steps] == [
        (1, A, T0, 1_000),
        (-1, A, None, 2_000),
    ]


def _fields(step: Step) -> tuple[int, uuid.UUID, datetime | None, int]:
    return (step.delta, step.activity_id, step.occurred_at, step.record_timestamp_ms)


def test_tally_splits_by_mentor_and_year() -> None:
    result = plan(
        logged(A, occurred_at=datetime(2025, 12, 31, 23, 30, tzinfo=UTC)),  # 2026 in Oslo
        logged(B, occurred_at=datetime(2025, 12, 31, 22, 30, tzinfo=UTC)),  # 2025 in Oslo
        logged(C, mentor_id=MENTOR_2),
    )
    changes = tally(result, missed_unless(result, A, B, C), [])
    assert list(changes) == sorted([(MENTOR, 2025), (MENTOR, 2026), (MENTOR_2, 2026)])
    assert [s.activity_id for s in changes[(MENTOR, 2026)].steps] == [A]
    assert [s.activity_id for s in changes[(MENTOR, 2025)].steps] == [B]


def test_tally_ignores_logs_the_store_did_not_count() -> None:
    result = plan(logged(A), logged(B))
    assert tally(result, missed_unless(result), []) == {}
    assert list(tally(result, missed_unless(result, B), [])) == [(MENTOR, 2026)]


def test_organization_is_that_of_the_latest_counted_session() -> None:
    # A (sorted last) came first; C (sorted first) came last: processing order decides.
    result = plan(logged(A, organization_id=ORG), logged(C, organization_id=ORG_2))
    assert tally(result, missed_unless(result, A, C), [])[(MENTOR, 2026)].organization_id == ORG_2
    result = plan(logged(C, organization_id=ORG_2), logged(A, organization_id=ORG))
    assert tally(result, missed_unless(result, A, C), [])[(MENTOR, 2026)].organization_id == ORG


def test_organization_of_an_uncounted_session_is_ignored() -> None:
    result = plan(logged(A, organization_id=ORG), logged(B, organization_id=ORG_2))
    assert tally(result, missed_unless(result, A), [])[(MENTOR, 2026)].organization_id == ORG


def test_a_delete_does_not_change_the_organization() -> None:
    result = plan(logged(A, organization_id=ORG_2), deleted(B))
    change = tally(result, missed_unless(result, A), [Removed(B, MENTOR, 2026)])[(MENTOR, 2026)]
    assert change.organization_id == ORG_2
    assert change.delta == 0


def test_delete_only_change_carries_no_organization() -> None:
    result = plan(deleted(B))
    change = tally(result, missed_unless(result), [Removed(B, MENTOR, 2026)])[(MENTOR, 2026)]
    assert change.organization_id is None
    assert [(s.delta, s.activity_id, s.occurred_at) for s in change.steps] == [(-1, B, None)]


def test_delete_counts_against_the_mentor_year_the_session_was_counted_under() -> None:
    # The delete carries MENTOR_2; the store says the session was MENTOR's in 2025.
    result = plan(deleted(A, mentor_id=MENTOR_2))
    changes = tally(result, missed_unless(result), [Removed(A, MENTOR, 2025)])
    assert list(changes) == [(MENTOR, 2025)]


def test_empty_tally() -> None:
    assert tally(plan(), [], []) == {}


# --- thresholds_for ------------------------------------------------------------------------

DEFAULT = (50, 100, 200)


@pytest.mark.parametrize(
    ("organization_id", "overrides", "expected"),
    [
        pytest.param(ORG, {ORG: (5, 10)}, (5, 10), id="own row wins"),
        pytest.param(ORG, {ORG: ()}, (), id="empty row means no milestones"),
        pytest.param(ORG, {ORG_2: (5,)}, DEFAULT, id="no row: default"),
        pytest.param(None, {ORG: (5,)}, DEFAULT, id="no organization: default"),
    ],
)
def test_thresholds_for(
    organization_id: uuid.UUID | None,
    overrides: dict[uuid.UUID, tuple[int, ...]],
    expected: tuple[int, ...],
) -> None:
    assert thresholds_for(organization_id, overrides, DEFAULT) == expected


def test_split_lanes_keeps_each_partition_whole_and_in_order() -> None:
    from consumer.domain.batch import split_lanes

    def envelope(partition: int, position: int) -> Envelope:
        event = PreferencesChanged(
            event_type="preferences.changed", schema_version=1, event_id=uuid.uuid4(),
            mentor_id=uuid.uuid4(), milestone_notifications=True,
            changed_at=datetime(2026, 1, 1, tzinfo=UTC),
        )
        return Envelope(event, position, "t", partition, position, 0)

    batch = [envelope(p, i) for i, p in enumerate([0, 1, 0, 2, 2, 2, 1, 3])]
    lanes = split_lanes(batch, 2)
    assert len(lanes) == 2
    assert sorted(e.position for lane in lanes for e in lane) == list(range(8))
    for lane in lanes:
        assert [e.position for e in lane] == sorted(e.position for e in lane)
    partitions_per_lane = [{e.partition for e in lane} for lane in lanes]
    assert not partitions_per_lane[0] & partitions_per_lane[1]
    assert split_lanes(batch, 1) == [batch]
    assert split_lanes([], 2) == []


def test_repeats_of_an_id_are_judged_again_against_the_log_that_won_on_the_ledger() -> None:
    when = datetime(2026, 3, 14, 9, tzinfo=UTC)
    won = (uuid.UUID(int=1), uuid.UUID(int=2), when, "session")
    other = (uuid.UUID(int=1), uuid.UUID(int=2), when, "call")
    repeats = [
        RepeatedLog(uuid.UUID(int=10), won, same_as_first=False),  # counted a conflict: a duplicate
        RepeatedLog(uuid.UUID(int=10), other, same_as_first=True),  # counted a duplicate: a conflict
        RepeatedLog(uuid.UUID(int=11), won, same_as_first=True),  # its first did not conflict
    ]
    assert rejudge_repeats(repeats, {uuid.UUID(int=10): won}) == (0, 0)
    assert rejudge_repeats(repeats[:1], {uuid.UUID(int=10): won}) == (1, -1)
    assert rejudge_repeats(repeats[1:2], {uuid.UUID(int=10): won}) == (-1, 1)
    assert rejudge_repeats(repeats, {}) == (0, 0)
