"""The evaluator's rules: the task card's unit cases, then tables for ``evaluate`` and
``decide``, then the deterministic notification id.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta

import pytest

from consumer.domain.milestones import (
    NOTIFICATION_NAMESPACE,
    Decision,
    MilestoneRecord,
    Step,
    decide,
    evaluate,
    normalize_thresholds,
    notification_id,
)

DEFAULT = (50, 100, 200)
SMALL = (2, 3, 5)
MENTOR = uuid.UUID("0b6c3f0e-8a51-4c1e-9d7a-2f4e6a8b1c3d")
OTHER_MENTOR = uuid.UUID("d3c1b8a6-e4f2-4a7d-9e1c-15a08e3f6c0b")
ORG = uuid.UUID("5e1d9c7b-3a2f-4e6d-8c1b-0a9f8e7d6c5b")
T0 = datetime(2026, 3, 14, 9, 0, tzinfo=UTC)

# Activity ids by name, so that tables read as stories ("a", "b", ...).
IDS = {name: uuid.uuid5(uuid.NAMESPACE_URL, f"activity:{name}") for name in "abcdefghx"}


def step(name: str, delta: int = 1, *, timestamp_ms: int | None = None) -> Step:
    """A session (delta +1) or a delete (delta -1) named by a letter; times follow the letter."""
    index = "abcdefghx".index(name)
    occurred_at = T0 + timedelta(minutes=index) if delta > 0 else None
    ts = 1_000 * (index + 1) if timestamp_ms is None else timestamp_ms
    return Step(delta, IDS[name], occurred_at, ts)


def name_of(activity_id: uuid.UUID | None) -> str | None:
    return None if activity_id is None else {v: k for k, v in IDS.items()}[activity_id]


def steps_of(spec: str) -> list[Step]:
    """``"+a +b -a"``: log a, log b, delete a."""
    return [step(token[1:], 1 if token[0] == "+" else -1) for token in spec.split()]


def decide_simple(
    *,
    count_after: int,
    steps: Sequence[Step] = (),
    thresholds: Sequence[int] = DEFAULT,
    recorded: Iterable[int] = (),
    opted_out: bool = False,
    late: bool = False,
    year: int = 2026,
    mentor_id: uuid.UUID = MENTOR,
    suppress_before_ms: int | None = None,
) -> list[MilestoneRecord]:
    return decide(
        mentor_id=mentor_id,
        organization_id=ORG,
        year=year,
        count_after=count_after,
        steps=steps,
        thresholds=thresholds,
        recorded=recorded,
        opted_out=opted_out,
        late=late,
        suppress_before_ms=suppress_before_ms,
    )


# --- The task card's unit cases ------------------------------------------------------------


def test_mentor_with_49_sessions_triggers_no_milestone() -> None:
    assert evaluate(49, DEFAULT, [], opted_out=False) == []


def test_mentor_with_exactly_50_sessions_triggers_milestone_50() -> None:
    assert evaluate(50, DEFAULT, [], opted_out=False) == [Decision(50, emit=True)]


def test_mentor_with_201_sessions_and_no_records_triggers_50_100_and_200() -> None:
    decisions = evaluate(201, DEFAULT, [], opted_out=False)
    assert [d.milestone_value for d in decisions] == [50, 100, 200]
    assert all(d.emit for d in decisions)


def test_mentor_with_201_sessions_and_records_for_50_and_100_triggers_only_200() -> None:
    assert evaluate(201, DEFAULT, [50, 100], opted_out=False) == [Decision(200, emit=True)]


def test_opted_out_mentor_records_every_milestone_as_suppressed() -> None:
    decisions = evaluate(201, DEFAULT, [], opted_out=True)
    assert [d.milestone_value for d in decisions] == [50, 100, 200]
    assert not any(d.emit for d in decisions)


def test_opted_out_mentor_gets_suppressed_records_and_nothing_to_emit() -> None:
    records = decide_simple(count_after=50, steps=[step("a")], thresholds=(50,), opted_out=True)
    assert [(r.milestone_value, r.status) for r in records] == [(50, "suppressed")]
    assert [r for r in records if r.status == "pending"] == []


def test_opted_out_milestone_once_recorded_is_never_emitted_later() -> None:
    # Suppressed is a record: opting back in later does not re-evaluate it.
    assert evaluate(60, DEFAULT, [50], opted_out=False) == []


def test_record_from_another_year_blocks_nothing() -> None:
    store: list[MilestoneRecord] = []

    def recorded(mentor_id: uuid.UUID, year: int) -> list[int]:
        return [r.milestone_value for r in store if r.mentor_id == mentor_id and r.year == year]

    store += decide_simple(year=2026, count_after=50, steps=[step("a")], recorded=[])
    assert [(r.year, r.milestone_value) for r in store] == [(2026, 50)]

    in_2027 = decide_simple(year=2027, count_after=50, steps=[step("b")],
                            recorded=recorded(MENTOR, 2027))
    assert [(r.year, r.milestone_value, r.status) for r in in_2027] == [(2027, 50, "pending")]
    assert in_2027[0].id != store[0].id

    # ...while the same year is blocked: a second crossing of 50 in 2026 records nothing.
    again = decide_simple(year=2026, count_after=50, steps=[step("c")],
                          recorded=recorded(MENTOR, 2026))
    assert again == []


def test_record_of_another_mentor_blocks_nothing() -> None:
    store = decide_simple(mentor_id=OTHER_MENTOR, count_after=50, steps=[step("a")])
    mine = [r.milestone_value for r in store if r.mentor_id == MENTOR]
    assert [r.milestone_value for r in decide_simple(count_after=50, steps=[step("b")],
                                                      recorded=mine)] == [50]


@pytest.mark.parametrize("count", [0, 1, 49, 75, 150])
def test_evaluator_returns_an_empty_list_never_none(count: int) -> None:
    result = evaluate(count, DEFAULT, [50, 100], opted_out=False)
    assert result is not None
    assert isinstance(result, list)
    assert result == [] or count >= 50
    assert decide_simple(count_after=0) == []
    assert isinstance(decide_simple(count_after=0), list)


# --- evaluate: the table ---------------------------------------------------------------------

EvaluateRow = tuple[str, int, tuple[int, ...], list[int], bool, bool, list[tuple[int, bool]]]
EVALUATE_TABLE: list[EvaluateRow] = [
    # id, count, thresholds, recorded, opted_out, notify, expected [(value, emit)]
    ("zero sessions", 0, DEFAULT, [], False, True, []),
    ("one below the first", 49, DEFAULT, [], False, True, []),
    ("exactly the first", 50, DEFAULT, [], False, True, [(50, True)]),
    ("between first and second", 99, DEFAULT, [], False, True, [(50, True)]),
    ("exactly the second", 100, DEFAULT, [], False, True, [(50, True), (100, True)]),
    ("exactly the second, first recorded", 100, DEFAULT, [50], False, True, [(100, True)]),
    ("all reached none recorded", 201, DEFAULT, [], False, True,
     [(50, True), (100, True), (200, True)]),
    ("all reached all recorded", 201, DEFAULT, [50, 100, 200], False, True, []),
    ("a gap in the records is filled", 201, DEFAULT, [100], False, True,
     [(50, True), (200, True)]),
    ("short-circuit at the first not reached", 75, DEFAULT, [50], False, True, []),
    ("far beyond the last", 10_000, DEFAULT, [], False, True,
     [(50, True), (100, True), (200, True)]),
    ("count may stay below a recorded milestone", 40, DEFAULT, [50], False, True, []),
    ("records of retired thresholds are ignored", 60, DEFAULT, [25, 75], False, True,
     [(50, True)]),
    ("no thresholds: no milestones", 500, (), [], False, True, []),
    ("threshold of one", 1, (1, 3), [], False, True, [(1, True)]),
    ("opted out: recorded, not emitted", 100, DEFAULT, [], True, True,
     [(50, False), (100, False)]),
    ("notify off: recorded, not emitted", 100, DEFAULT, [50], False, False, [(100, False)]),
    ("opted out and notify off", 50, DEFAULT, [], True, False, [(50, False)]),
    ("opted out below the first", 49, DEFAULT, [], True, True, []),
]


@pytest.mark.parametrize(
    ("count", "thresholds", "recorded", "opted_out", "notify", "expected"),
    [pytest.param(*row[1:], id=row[0]) for row in EVALUATE_TABLE],
)
def test_evaluate_table(
    count: int,
    thresholds: tuple[int, ...],
    recorded: list[int],
    opted_out: bool,
    notify: bool,
    expected: list[tuple[int, bool]],
) -> None:
    decisions = evaluate(count, thresholds, recorded, opted_out=opted_out, notify=notify)
    assert [(d.milestone_value, d.emit) for d in decisions] == expected


def test_evaluate_accepts_a_one_shot_iterable_of_records() -> None:
    assert evaluate(201, DEFAULT, iter([50, 100]), opted_out=False) == [Decision(200, True)]


def test_evaluate_yields_ascending_values() -> None:
    values = [d.milestone_value for d in evaluate(10**6, (1, 2, 10, 999), [], opted_out=False)]
    assert values == sorted(values)


# --- normalize_thresholds ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ([100, 50, 50], (50, 100)),
        ([200, 100, 50], (50, 100, 200)),
        ([], ()),
        ([1], (1,)),
    ],
)
def test_thresholds_are_sorted_without_repeats(given: list[int], expected: tuple[int, ...]) -> None:
    assert normalize_thresholds(given) == expected


@pytest.mark.parametrize("given", [[0], [50, -1], [-50, 50]])
def test_non_positive_threshold_is_refused(given: list[int]) -> None:
    with pytest.raises(ValueError, match="positive"):
        normalize_thresholds(given)


# --- decide: the table -----------------------------------------------------------------------

Expected = tuple[int, str, str | None, int]  # value, status, crossing activity name, session_count

DECIDE_TABLE: list[tuple[str, int, str, tuple[int, ...], list[int], bool, bool, list[Expected]]] = [
    # id, count before, steps, thresholds, recorded, opted_out, late, expected
    ("nothing reached", 0, "+a", SMALL, [], False, False, []),
    ("one crossing", 1, "+a", SMALL, [], False, False, [(2, "pending", "a", 2)]),
    ("crossings carry their own session", 0, "+a +b +c +d +e", SMALL, [], False, False,
     [(2, "pending", "b", 2), (3, "pending", "c", 3), (5, "pending", "e", 5)]),
    ("log and delete in one batch still reach", 1, "+a -a", SMALL, [], False, False,
     [(2, "pending", "a", 2)]),
    ("recorded milestones are skipped", 1, "+a +b", SMALL, [2], False, False,
     [(3, "pending", "b", 3)]),
    ("reached before the batch: no activity, count after", 4, "+a +b", SMALL, [], False, False,
     [(2, "pending", None, 6), (3, "pending", None, 6), (5, "pending", "a", 5)]),
    ("reached before, batch only deletes", 4, "-x", SMALL, [2], False, False,
     [(3, "pending", None, 3)]),
    ("no steps: nothing changed, nothing recorded", 3, "", SMALL, [], False, False, []),
    ("opted out: suppressed", 1, "+a +b", SMALL, [], True, False,
     [(2, "suppressed", "a", 2), (3, "suppressed", "b", 3)]),
    ("late year: suppressed", 1, "+a", SMALL, [], False, True, [(2, "suppressed", "a", 2)]),
    ("late and opted out: suppressed", 1, "+a", SMALL, [], True, True,
     [(2, "suppressed", "a", 2)]),
    ("no thresholds", 10, "+a", (), [], False, False, []),
    ("all recorded", 10, "+a", SMALL, [2, 3, 5], False, False, []),
    ("count below a recorded milestone rises again", 2, "-x +a", SMALL, [2], False, False, []),
    ("first reach wins after a dip", 1, "+a -x +b", SMALL, [], False, False,
     [(2, "pending", "a", 2)]),
    ("a dip then a new crossing", 1, "+a -x +b +c", SMALL, [], False, False,
     [(2, "pending", "a", 2), (3, "pending", "c", 3)]),
    ("the crossing is the first session at which the running count reached it", 0,
     "+a +b -a +c +d", SMALL, [], False, False, [(2, "pending", "b", 2), (3, "pending", "d", 3)]),
]


@pytest.mark.parametrize(
    ("before", "spec", "thresholds", "recorded", "opted_out", "late", "expected"),
    [pytest.param(*row[1:], id=row[0]) for row in DECIDE_TABLE],
)
def test_decide_table(
    before: int,
    spec: str,
    thresholds: tuple[int, ...],
    recorded: list[int],
    opted_out: bool,
    late: bool,
    expected: list[Expected],
) -> None:
    steps = steps_of(spec)
    count_after = before + sum(s.delta for s in steps)
    records = decide_simple(
        count_after=count_after,
        steps=steps,
        thresholds=thresholds,
        recorded=recorded,
        opted_out=opted_out,
        late=late,
    )
    got = [
        (r.milestone_value, r.status, name_of(r.activity_id), r.session_count) for r in records
    ]
    assert got == expected
    for record in records:
        assert record.id == notification_id(MENTOR, 2026, record.milestone_value)
        assert (record.mentor_id, record.organization_id, record.year) == (MENTOR, ORG, 2026)
        if record.activity_id is None:
            assert record.reached_at is None  # the database's now(): created_at
        else:
            assert record.reached_at == step(str(name_of(record.activity_id))).occurred_at


@pytest.mark.parametrize(
    ("crossing_ms", "cutoff_ms", "status"),
    [
        pytest.param(999, 1_000, "suppressed", id="older than the replay start"),
        pytest.param(1_000, 1_000, "pending", id="exactly at the replay start"),
        pytest.param(1_001, 1_000, "pending", id="newer than the replay start"),
        pytest.param(999, None, "pending", id="not a no-notify replay"),
    ],
)
def test_no_notify_replay_suppresses_crossings_by_older_records(
    crossing_ms: int, cutoff_ms: int | None, status: str
) -> None:
    records = decide_simple(
        count_after=2,
        steps=[step("a", timestamp_ms=crossing_ms)],
        thresholds=SMALL,
        suppress_before_ms=cutoff_ms,
    )
    assert [(r.milestone_value, r.status) for r in records] == [(2, status)]


def test_no_notify_replay_judges_each_crossing_by_its_own_record() -> None:
    steps = [step("a", timestamp_ms=500), step("b", timestamp_ms=1_500)]
    records = decide_simple(count_after=3, steps=steps, thresholds=SMALL, suppress_before_ms=1_000)
    assert [(r.milestone_value, r.status) for r in records] == [
        (2, "suppressed"),
        (3, "pending"),
    ]


@pytest.mark.parametrize(
    ("evaluated_at_ms", "status"),
    [
        pytest.param(999, "suppressed", id="step older than the replay start"),
        pytest.param(1_000, "pending", id="step at the replay start"),
    ],
)
def test_no_notify_replay_judges_a_milestone_without_crossing_by_the_step_that_evaluated_it(
    evaluated_at_ms: int, status: str
) -> None:
    # 2 and 3 were reached before the batch (a threshold added later): no crossing session.
    records = decide_simple(
        count_after=4,
        steps=[step("a", timestamp_ms=evaluated_at_ms)],
        thresholds=SMALL,
        suppress_before_ms=1_000,
    )
    assert [(r.milestone_value, r.status, r.activity_id) for r in records] == [
        (2, status, None), (3, status, None)
    ]


def test_no_notify_replay_never_unsuppresses_an_opt_out() -> None:
    records = decide_simple(
        count_after=2,
        steps=[step("a", timestamp_ms=5_000)],
        thresholds=SMALL,
        opted_out=True,
        suppress_before_ms=1_000,
    )
    assert [r.status for r in records] == ["suppressed"]


def test_several_milestones_at_once_come_in_ascending_order() -> None:
    records = decide_simple(count_after=201, steps=[step("a")], recorded=[])
    assert [r.milestone_value for r in records] == [50, 100, 200]
    assert [r.activity_id for r in records] == [None, None, None]
    assert [r.session_count for r in records] == [201, 201, 201]


# --- notification_id ---------------------------------------------------------------------------

CONTRACT_NAMESPACE = uuid.UUID("6f1c2a8e-4d3b-5a7f-9e21-0c8b7d6a5f43")


def contract_id(mentor: str, year: int, value: int) -> uuid.UUID:
    """The contract's recipe, from the text: lowercase hyphenated mentor id."""
    return uuid.uuid5(CONTRACT_NAMESPACE, f"{mentor.lower()}:{year}:{value}")


def test_namespace_is_the_contracts() -> None:
    assert NOTIFICATION_NAMESPACE == CONTRACT_NAMESPACE


@pytest.mark.parametrize(
    ("mentor", "year", "value"),
    [
        ("0b6c3f0e-8a51-4c1e-9d7a-2f4e6a8b1c3d", 2026, 50),
        ("D3C1B8A6-E4F2-4A7D-9E1C-15A08E3F6C0B", 2025, 200),
        ("00000000-0000-0000-0000-000000000000", 1999, 1),
    ],
)
def test_notification_id_is_uuid5_of_lowercase_mentor_year_and_value(
    mentor: str, year: int, value: int
) -> None:
    got = notification_id(uuid.UUID(mentor), year, value)
    assert got == contract_id(mentor, year, value)
    assert got.version == 5


def test_notification_id_of_a_known_triple_is_stable() -> None:
    # Pinned once from uuid.uuid5 so that a change of recipe shows up as a diff.
    # uuid5(6f1c2a8e-..., "0b6c3f0e-8a51-4c1e-9d7a-2f4e6a8b1c3d:2026:50")
    expected = uuid.UUID("8f901d68-e15a-53d4-b221-d1a0def299e9")
    assert notification_id(MENTOR, 2026, 50) == expected


def test_notification_id_differs_by_year_value_and_mentor() -> None:
    ids = {
        notification_id(MENTOR, 2026, 50),
        notification_id(MENTOR, 2027, 50),
        notification_id(MENTOR, 2026, 100),
        notification_id(OTHER_MENTOR, 2026, 50),
    }
    assert len(ids) == 4


@pytest.mark.parametrize(
    ("opted_out", "late", "suppress_before_ms", "expected"),
    [
        (False, False, None, None),
        (True, False, None, "opted_out"),
        (False, True, None, "grace_period_over"),
        (True, True, None, "opted_out"),  # the first that applies is recorded
        (False, False, 10**15, "replay_no_notify"),
        (False, True, 10**15, "grace_period_over"),
    ],
)
def test_a_suppressed_record_says_why(
    opted_out: bool, late: bool, suppress_before_ms: int | None, expected: str | None
) -> None:
    [record] = decide_simple(
        count_after=50, steps=[step("a")], thresholds=(50,), opted_out=opted_out, late=late,
        suppress_before_ms=suppress_before_ms,
    )
    assert record.suppressed_reason == expected
    assert record.status == ("pending" if expected is None else "suppressed")
