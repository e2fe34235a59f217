"""Hostile input through decoding and planning: nothing raises, every value gets an answer.

Arbitrary JSON values shaped like the three input events (each field present or missing, of
any JSON type, or an extreme string, number or timestamp), and arbitrary bytes, are decoded as
the engine does and the accepted ones planned, tallied and evaluated as a batch. Each record
must be accepted or rejected with a reason kind and a one-line reason; planning must isolate
nothing (the per-record guard is for what nobody foresaw, not for input the rules should
catch); every timestamp that reaches the database must convert to UTC as asyncpg does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from consumer.domain.batch import plan_batch, tally
from consumer.domain.milestones import decide
from consumer.stream.decode import ACTIVITY_EVENTS, PREFERENCE_EVENTS, Decoded, Rejected, decode

ZONES = [ZoneInfo(name) for name in
         ("Europe/Oslo", "Pacific/Kiritimati", "Etc/GMT+12", "America/St_Johns", "UTC")]
NOW_MS = 1_796_000_000_000
MENTORS = ["10000000-0000-4000-8000-000000000001", "20000000-0000-4000-8000-000000000002"]
# Few ids, so that batches hold duplicates, conflicts and deletes of logged activities.
IDS = [*MENTORS, "30000000-0000-4000-8000-000000000003", "00000000-0000-0000-0000-000000000000"]


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    timestamp: int | None
    key: bytes | None
    value: bytes | None


json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**300), 10**300),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
any_offset = st.one_of(
    st.just("Z"), st.just("z"), st.just(""),
    st.builds(lambda sign, h, m: f"{sign}{h:02d}:{m:02d}",
              st.sampled_from("+-"), st.integers(0, 30), st.integers(0, 61)),
)
# Well-formed and aware, at any instant Python can hold, with any offset it allows.
valid_timestamp = st.builds(
    lambda moment, minutes: moment.replace(tzinfo=timezone(timedelta(minutes=minutes))).isoformat(),
    st.one_of(
        st.datetimes(datetime(1900, 1, 1), datetime(2026, 12, 31)), st.datetimes(), st.sampled_from(
        [datetime(1, 1, 1), datetime(1899, 12, 31, 23, 59), datetime(1900, 1, 1),
         datetime(2200, 12, 31, 23, 59, 59), datetime(2201, 1, 1), datetime(9999, 12, 31, 23, 59)]),
    ),
    st.integers(-(24 * 60 - 1), 24 * 60 - 1),
)
any_timestamp = st.one_of(
    st.builds(
        lambda y, mo, d, h, mi, s, frac, off: f"{y:04d}-{mo:02d}-{d:02d}T{h:02d}:{mi:02d}:{s:02d}{frac}{off}",
        st.integers(0, 9999), st.integers(0, 13), st.integers(0, 32), st.integers(0, 24),
        st.integers(0, 60), st.integers(0, 61),
        st.sampled_from(["", ".5", ".123456", ".1234567890123"]), any_offset,
    ),
    st.sampled_from(["2026-03-14", "2026-03-14T10:00:00", "now", "", "2026-03-14T10:00:00+24:00"]),
    st.integers(-(10**15), 10**15),
)
any_uuid = st.one_of(st.uuids().map(str), st.text(max_size=40), st.just(IDS[3].upper()))
any_text = st.one_of(st.text(max_size=120), st.just("x" * 101), st.just("a\x00b"),
                     st.just("\ud800"), st.just(""))
# Per field: a valid value, and what a hostile producer might send instead.
FIELDS: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]] = {
    "schema_version": (st.just(1), st.sampled_from([2, 0, "1", True, 1.0, None, 10**30])),
    "event_id": (st.uuids().map(str), any_uuid),
    "activity_id": (st.sampled_from(IDS), any_uuid),
    "mentor_id": (st.sampled_from(MENTORS), any_uuid),
    "organization_id": (st.sampled_from(IDS), any_uuid),
    "occurred_at": (valid_timestamp, any_timestamp),
    "deleted_at": (valid_timestamp, any_timestamp),
    "changed_at": (valid_timestamp, any_timestamp),
    "activity_type": (st.sampled_from(["session", "call", "s" * 100]), any_text),
    "milestone_notifications": (st.booleans(), json_leaf),
}
SHAPES = {
    "activity.logged": ["event_type", "schema_version", "event_id", "activity_id", "mentor_id",
                        "organization_id", "occurred_at", "activity_type"],
    "activity.deleted": ["event_type", "schema_version", "event_id", "activity_id", "mentor_id",
                         "organization_id", "deleted_at"],
    "preferences.changed": ["event_type", "schema_version", "event_id", "mentor_id",
                            "milestone_notifications", "changed_at"],
}
EVENT_TYPES = st.sampled_from([*SHAPES, "milestone.reached", "", "Activity.Logged"])


@st.composite
def message(draw: st.DrawFn) -> tuple[str, bytes | None]:
    """(topic, value): mostly well-formed events with a few fields broken, missing or of
    another type, on their own topic; some arbitrary JSON, some arbitrary bytes."""
    kind = draw(st.sampled_from([*SHAPES, *SHAPES, *SHAPES, "bytes", "json"]))
    topic = "preferences" if kind == "preferences.changed" else "activity"
    if draw(st.integers(0, 9)) == 0:
        topic = "activity" if topic == "preferences" else "preferences"
    if kind == "bytes":
        return topic, draw(st.none() | st.binary(max_size=40))
    if kind == "json":
        return topic, json.dumps(draw(json_value)).encode()
    names = SHAPES[kind]
    broken = set(draw(st.lists(st.sampled_from(names), max_size=draw(st.sampled_from([0, 0, 1, 2])))))
    body: dict[str, Any] = {}
    for name in names:
        if name not in broken:
            body[name] = kind if name == "event_type" else draw(FIELDS[name][0])
            continue
        how = draw(st.integers(0, 2))
        if how == 0:
            continue  # missing
        if how == 1:
            body[name] = draw(json_value)  # any JSON type
        else:
            body[name] = draw(EVENT_TYPES if name == "event_type" else FIELDS[name][1])
    if draw(st.booleans()):
        body[draw(st.text(max_size=8))] = draw(json_value)  # an unknown extra field
    return topic, json.dumps(body).encode("utf-8", "surrogatepass")


records = st.lists(
    st.tuples(message(),
              # the record timestamp: none, a usual one, or anything (it bounds the future)
              st.one_of(st.none(), st.just(NOW_MS), st.integers(-(10**14), 10**14)),
              st.one_of(st.none(), st.sampled_from([m.encode() for m in MENTORS]), st.binary(max_size=8))),
    min_size=1, max_size=12,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=records, zone=st.sampled_from(ZONES), counted=st.sampled_from([None, frozenset({"session"})]))
def test_any_input_is_accepted_or_rejected_with_a_reason_and_plans_without_raising(
    batch: list[tuple[tuple[str, bytes | None], int | None, bytes | None]], zone: ZoneInfo,
    counted: frozenset[str] | None,
) -> None:
    envelopes = []
    accepted = 0
    for position, ((topic, value), stamp, key) in enumerate(batch):
        record = Record(topic, 0, position, stamp, key, value)
        accepts = ACTIVITY_EVENTS if topic == "activity" else PREFERENCE_EVENTS
        result = decode(record, accepts=accepts, now_ms=NOW_MS, position=position)
        if isinstance(result, Rejected):
            assert result.kind
            assert result.reason
            assert "\n" not in result.reason
        else:
            assert isinstance(result, Decoded)
            envelopes.append(result.envelope)
            accepted += 1
    event(f"accepted {min(accepted, 3)}+" if accepted >= 3 else f"accepted {accepted}")

    plan = plan_batch(envelopes, tz=zone, counted_types=counted)

    assert not plan.unprocessable, plan.unprocessable
    # What asyncpg does with every timestamp it sends: convert it to UTC.
    for row in plan.logs:
        row.occurred_at.astimezone(UTC)
        assert 1899 <= row.year <= 2201
    for delete in plan.deletes:
        delete.deleted_at.astimezone(UTC)
    for preference in plan.preferences:
        preference.changed_at.astimezone(UTC)
    for (mentor, year), change in tally(plan, [], []).items():
        decide(
            mentor_id=mentor, organization_id=change.organization_id or UUID(int=0), year=year,
            count_after=change.delta, steps=change.steps, thresholds=(1, 2, 50), recorded=(),
            opted_out=False, late=False,
        )
