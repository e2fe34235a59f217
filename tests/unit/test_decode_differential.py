"""The fast decoder (msgspec) against the pydantic models, which stay authoritative.

``decode`` tries msgspec first for ``activity.logged`` and hands everything it does not accept
to the pydantic model. Over hostile variations of the event (timestamps in every spelling,
UUIDs in every form, strict types, strings Postgres cannot hold, duplicate and escaped keys,
extra fields of any JSON value, invalid UTF-8), decoding with and without the fast path must
accept and reject the same records with the same reason kinds and texts, and the accepted
events must be equal field by field; whatever msgspec alone accepts, the model accepts with
the same values.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any
from unittest import mock
from uuid import UUID

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from consumer.stream import decode as decoding
from consumer.stream.decode import ACTIVITY_EVENTS, Decoded, Rejected, decode
from schemas.events import ActivityLogged, InputEvent
from schemas.fast import LoggedActivity
from tests.unit.test_input_property import Record

NOW_MS = 1_796_000_000_000
MENTOR = "10000000-0000-4000-8000-000000000001"
FIELDS = ("event_type", "schema_version", "event_id", "activity_id", "mentor_id",
          "organization_id", "occurred_at", "activity_type")
MODEL: TypeAdapter[Any] = TypeAdapter(InputEvent)


def raw(text: str) -> st.SearchStrategy[str]:
    """A JSON token written as is (numbers JSON can spell in several ways)."""
    return st.just(text)


def dumped(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[str]:
    return strategy.map(json.dumps)


uuids = st.uuids()
uuid_text = st.one_of(
    uuids.map(str), uuids.map(lambda u: str(u).upper()), uuids.map(lambda u: u.hex),
    uuids.map(lambda u: "{" + str(u) + "}"), uuids.map(lambda u: f"urn:uuid:{u}"),
    uuids.map(lambda u: str(u)[:-1]), uuids.map(lambda u: str(u).replace("-", "", 1)),
    uuids.map(lambda u: " " + str(u)), st.text(max_size=40),
)
fraction = st.one_of(
    st.just(""), st.integers(1, 10).flatmap(
        lambda n: st.tuples(st.sampled_from(".,"), st.text("0123456789", min_size=n, max_size=n))
        .map("".join)),
)
offset = st.one_of(
    st.sampled_from(["Z", "z", "", "+00:00", "-00:00", "+24:00", "+23:59", "+2359", "+01"]),
    st.builds(lambda sign, h, m: f"{sign}{h:02d}:{m:02d}",
              st.sampled_from("+-"), st.integers(0, 25), st.integers(0, 61)),
)
# Any instant around the supported years, spelled as producers do: separators, 0 to 10
# fraction digits (msgspec rounds past 6, pydantic truncates), offsets of every form.
valid_timestamp = st.builds(
    lambda moment, sep, digits, tail, off: (
        moment.strftime(f"%Y-%m-%d{sep}%H:%M:%S")
        + (("." + f"{moment.microsecond:06d}{tail}"[:digits]) if digits else "") + off),
    st.one_of(st.datetimes(datetime(1890, 1, 1), datetime(2026, 12, 1)),
              st.datetimes(datetime(1890, 1, 1), datetime(2210, 12, 31))),
    st.sampled_from(["T", "T", "T", "t", " "]), st.integers(0, 10),
    st.sampled_from(["", "0000", "5", "9999"]),
    st.one_of(st.sampled_from(["Z", "Z", "z", "+00:00", "-00:00", "+23:59", "+0100"]),
              st.builds(lambda sign, h, m: f"{sign}{h:02d}:{m:02d}",
                        st.sampled_from("+-"), st.integers(0, 23), st.integers(0, 59))),
)
timestamp = st.builds(
    lambda y, mo, d, sep, h, mi, s, frac, off: f"{y:04d}-{mo:02d}-{d:02d}{sep}{h:02d}:{mi:02d}{s}{frac}{off}",
    st.sampled_from([1, 1899, 1900, 1970, 2024, 2026, 2200, 2201, 9999]),
    st.integers(0, 13), st.integers(0, 32), st.sampled_from(["T", "T", "t", " ", "_"]),
    st.integers(0, 24), st.integers(0, 60),
    st.one_of(st.integers(0, 61).map(lambda s: f":{s:02d}"), st.just("")),
    fraction, offset,
)
# Per field: (valid JSON tokens, hostile JSON tokens).
VALUES: dict[str, tuple[st.SearchStrategy[str], st.SearchStrategy[str]]] = {
    "event_type": (raw('"activity.logged"'),
                   st.one_of(raw('"activity\\u002elogged"'), dumped(st.sampled_from(
                       ["activity.deleted", "preferences.changed", "Activity.Logged", ""])),
                       raw("null"), raw("1"))),
    "schema_version": (raw("1"), st.sampled_from(
        ["2", "0", "-0", "1.0", "1e0", "10e-1", '"1"', "true", "null", "100000000000000000000001",
         "[1]"])),
    "event_id": (dumped(uuids.map(str)), dumped(uuid_text)),
    "activity_id": (dumped(uuids.map(str)), dumped(uuid_text)),
    "mentor_id": (raw(json.dumps(MENTOR)), dumped(uuid_text)),
    "organization_id": (dumped(uuids.map(str)), dumped(uuid_text)),
    "occurred_at": (dumped(valid_timestamp), st.one_of(
        dumped(timestamp), dumped(st.sampled_from(["2026-03-14", "now", "", "20260314T100000Z"])),
        st.integers(-(10**12), 10**12).map(str), raw("null"))),
    "activity_type": (dumped(st.sampled_from(["session", "call", "s" * 100, "økt"])), st.one_of(
        dumped(st.text(max_size=110)), dumped(st.sampled_from(
            ["", "x" * 101, "a\x00b", "\ud800", "a\udfffb", "\U0001f600" * 100])),
        raw('"\\u0000"'), raw("1"), raw("null"), raw("[]"))),
}
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(10**30), 10**30),
                      st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=10))
extra_value = st.one_of(
    dumped(st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=5)),
    st.sampled_from(["1e999", "-1e999", "1E400", "123456789012345678901234567890e-5",
                     '"\\ud800"', '"\\u0000"', "[[[[[[[[[[1]]]]]]]]]]", '"2026-01-01T00:00:00.1234567Z"']),
)


@st.composite
def logged_value(draw: st.DrawFn) -> bytes:
    """An activity.logged value: mostly valid, some fields hostile, missing, repeated or
    escaped, extra fields, any order, sometimes broken bytes."""
    tokens: list[tuple[str, str]] = []
    for name in FIELDS:
        # sampled_from, not integers: hypothesis draws integers' bounds far more often
        choice = draw(st.sampled_from(["valid"] * 24 + ["hostile", "hostile", "missing"]))
        if choice == "missing":
            continue
        valid, hostile = VALUES[name]
        tokens.append((name, draw(hostile if choice == "hostile" else valid)))
    for _ in range(draw(st.sampled_from([0, 0, 1, 2]))):
        tokens.append((draw(st.text(st.characters(codec="utf-8"), max_size=6)), draw(extra_value)))
    if tokens and draw(st.sampled_from([False] * 9 + [True])):  # repeated: the last counts
        name, _ = draw(st.sampled_from(tokens))
        valid, hostile = VALUES.get(name, (extra_value, extra_value))
        tokens.append((name, draw(st.one_of(valid, hostile))))
    tokens = draw(st.permutations(tokens)) if draw(st.booleans()) else tokens

    def key(name: str) -> str:
        if name == "mentor_id" and draw(st.sampled_from([False] * 9 + [True])):
            return '"mentor\\u005fid"'  # an escaped key is the same key
        return json.dumps(name)

    space = draw(st.sampled_from(["", " ", "\n"]))
    text = "{" + ",".join(f"{key(name)}:{space}{token}" for name, token in tokens) + "}" + space
    value = text.encode("utf-8", "surrogatepass")
    mangle = draw(st.sampled_from(["none"] * 27 + ["utf-8", "bom", "trailing"]))
    if mangle == "utf-8":
        value = value.replace(b"session", b"sess\xffon")
    elif mangle == "bom":
        value = b"\xef\xbb\xbf" + value
    elif mangle == "trailing":
        value = value + b" x"
    return value


def _decoded(value: bytes, *, key: bytes | None, fast: bool) -> Decoded | Rejected:
    record = Record("activity", 0, 7, NOW_MS, key, value)
    if fast:
        return decode(record, accepts=ACTIVITY_EVENTS, now_ms=NOW_MS)
    with mock.patch.object(decoding, "_fast_logged", return_value=None):
        return decode(record, accepts=ACTIVITY_EVENTS, now_ms=NOW_MS)


def _assert_same_event(fast: Any, model: Any) -> None:
    for name in FIELDS:
        assert getattr(fast, name) == getattr(model, name), name
    assert fast.occurred_at.utcoffset() == model.occurred_at.utcoffset()
    assert type(fast.activity_id) is type(model.activity_id) is UUID


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(logged_value(), st.sampled_from([MENTOR.encode(), b"other", None]))
def test_decoding_with_and_without_the_fast_path_agrees(value: bytes, key: bytes | None) -> None:
    with_fast = _decoded(value, key=key, fast=True)
    model_only = _decoded(value, key=key, fast=False)
    assert type(with_fast) is type(model_only)
    if isinstance(with_fast, Rejected):
        assert isinstance(model_only, Rejected)
        assert (with_fast.kind, with_fast.reason) == (model_only.kind, model_only.reason)
        event(f"rejected: {with_fast.kind}")
        return
    assert isinstance(model_only, Decoded)
    fast_envelope, model_envelope = with_fast.envelope, model_only.envelope
    _assert_same_event(fast_envelope.event, model_envelope.event)
    assert fast_envelope.occurred_s == model_envelope.occurred_s
    assert fast_envelope.timestamp_ms == model_envelope.timestamp_ms
    assert with_fast.key_mismatch == model_only.key_mismatch
    event(f"accepted by {type(fast_envelope.event).__name__}")


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(logged_value())
def test_what_msgspec_accepts_the_model_accepts_with_the_same_values(value: bytes) -> None:
    fast = decoding._fast_logged(value)
    if fast is None:
        return
    try:
        model = MODEL.validate_json(value)
    except ValidationError as error:  # pragma: no cover - the failure this test looks for
        raise AssertionError(f"msgspec accepted what the model rejects: {error}") from None
    assert type(model) is ActivityLogged
    _assert_same_event(fast, model)


def test_the_usual_spellings_take_the_fast_path() -> None:
    """Canonical events as producers write them are decoded by msgspec, not the model."""
    for stamp in ("2026-03-14T10:00:00Z", "2026-03-14T10:00:00.123Z", "2026-03-14T10:00:00+01:00",
                  "2026-03-14T10:00:00.123456-05:30"):
        value = json.dumps({
            "event_type": "activity.logged", "schema_version": 1,
            "event_id": "a0000000-0000-4000-8000-000000000001",
            "activity_id": "b0000000-0000-4000-8000-000000000001", "mentor_id": MENTOR,
            "organization_id": "c0000000-0000-4000-8000-000000000001", "occurred_at": stamp,
            "activity_type": "session", "producer": {"extra": [1, 2.5]},
        }).encode()
        result = _decoded(value, key=MENTOR.encode(), fast=True)
        assert isinstance(result, Decoded), stamp
        assert type(result.envelope.event) is LoggedActivity, stamp
        assert not result.key_mismatch
