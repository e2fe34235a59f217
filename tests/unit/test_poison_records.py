"""One record never stops the service: the timestamp range and the per-record guards.

The guards are tested here with an exception injected where planning or decoding one record
happens; the end-to-end test does the same with the real process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from aiokafka.errors import MessageSizeTooLargeError

from consumer.domain import batch as batch_module
from consumer.domain.batch import Envelope, plan_batch
from consumer.domain.milestones import stored_thresholds
from consumer.ops.metrics import Metrics
from consumer.stream import engine as engine_module
from consumer.stream.dead_letters import dead_letter_headers, send_dead_letters
from consumer.stream.decode import (
    ACTIVITY_EVENTS,
    PREFERENCE_EVENTS,
    Decoded,
    Rejected,
    decode,
    unprocessable,
)
from consumer.stream.engine import Engine
from consumer.stream.read_back import notification_id_of
from schemas.events import ActivityLogged
from tests.support import events

OSLO = ZoneInfo("Europe/Oslo")
MENTOR = "10000000-0000-4000-8000-000000000001"
NOW_MS = int(datetime(2026, 6, 1, tzinfo=UTC).timestamp() * 1000)


@dataclass(frozen=True)
class Record:
    value: bytes | None
    topic: str = "activity-logged"
    partition: int = 0
    offset: int = 0
    timestamp: int | None = NOW_MS
    key: bytes | None = MENTOR.encode()


def record(message: dict[str, Any], offset: int = 0) -> Record:
    return Record(json.dumps(message).encode(), offset=offset)


def decode_one(message: dict[str, Any], accepts: tuple[Any, ...] = ACTIVITY_EVENTS) -> Any:
    return decode(record(message), accepts=accepts, now_ms=NOW_MS)


# --- the supported years ------------------------------------------------------------------

OUT_OF_RANGE = [
    pytest.param(events.logged(MENTOR, occurred_at="0001-01-01T00:00:00+01:00"), "occurred_at",
                 id="year 1 with an offset (year 0 in UTC)"),
    pytest.param(events.logged(MENTOR, occurred_at="1899-12-31T23:59:59+00:00"), "occurred_at",
                 id="1899"),
    pytest.param(events.logged(MENTOR, occurred_at="2201-01-01T00:00:00+00:00"), "occurred_at",
                 id="2201"),
    pytest.param(events.logged(MENTOR, occurred_at="9999-12-31T23:59:59-01:00"), "occurred_at",
                 id="year 9999 with a negative offset (year 10000 in UTC)"),
    pytest.param(events.deleted(MENTOR, events.new_id(), deleted_at="0001-01-01T00:00:00+01:00"),
                 "deleted_at", id="deleted_at in year 1"),
    pytest.param(events.preference(MENTOR, False, changed_at="1000-06-01T00:00:00Z"),
                 "changed_at", id="changed_at in year 1000"),
]


@pytest.mark.parametrize(("message", "field"), OUT_OF_RANGE)
def test_timestamps_outside_1900_to_2200_are_rejected_with_one_line(
    message: dict[str, Any], field: str
) -> None:
    accepts = PREFERENCE_EVENTS if message["event_type"] == "preferences.changed" else (
        ACTIVITY_EVENTS
    )
    result = decode_one(message, accepts)
    assert isinstance(result, Rejected)
    assert result.kind == "out_of_range"
    assert result.reason.startswith(f"{field} year ")
    assert result.reason.endswith("is outside the years 1900 to 2200")
    assert "\n" not in result.reason


@pytest.mark.parametrize(
    "occurred_at",
    ["1900-01-01T00:00:00+14:00", "1900-01-01T00:00:00-12:00",
     "2200-12-31T23:59:59-12:00", "2200-12-31T23:59:59+14:00"],
)
def test_the_edges_of_the_range_are_accepted_and_planned(occurred_at: str) -> None:
    # Future check aside (a record timestamp far ahead): the years as written are 1900 and
    # 2200, the instant in Oslo may be 1899 or 2201; planning computes it without raising.
    message = events.logged(MENTOR, occurred_at=occurred_at)
    result = decode(
        Record(json.dumps(message).encode(), timestamp=2**62), accepts=ACTIVITY_EVENTS
    )
    assert isinstance(result, Decoded)
    plan = plan_batch([result.envelope], tz=OSLO, counted_types=None)
    assert not plan.unprocessable
    assert plan.logs[0].year == result.envelope.event.occurred_at.astimezone(OSLO).year


# --- the per-record guard of planning -----------------------------------------------------

def envelope(event: Any, position: int) -> Envelope:
    return Envelope(event, position, "activity-logged", 0, position, NOW_MS)


def logged_event(occurred_at: datetime) -> ActivityLogged:
    # model_construct: a value decode would refuse, to reach planning the way a bug would.
    return ActivityLogged.model_construct(
        event_type="activity.logged", schema_version=1, event_id=uuid.uuid4(),
        activity_id=uuid.uuid4(), mentor_id=uuid.UUID(MENTOR), organization_id=uuid.uuid4(),
        occurred_at=occurred_at, activity_type="session",
    )


def test_planning_isolates_a_record_whose_year_computation_raises() -> None:
    good_before = logged_event(datetime(2026, 3, 1, tzinfo=UTC))
    poison = logged_event(datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1))))
    good_after = logged_event(datetime(2026, 3, 2, tzinfo=UTC))
    plan = plan_batch(
        [envelope(good_before, 0), envelope(poison, 1), envelope(good_after, 2)],
        tz=OSLO, counted_types=None,
    )
    assert [e.position for e, _ in plan.unprocessable] == [1]
    assert isinstance(plan.unprocessable[0][1], OverflowError)
    assert sorted(row.position for row in plan.logs) == [0, 2]


def test_planning_isolates_whatever_one_record_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    poison = logged_event(datetime(2026, 3, 1, tzinfo=UTC))
    original = batch_module._same_session

    def explode(first: Any, event: Any, year: int) -> bool:
        if event is poison:
            raise KeyError("injected")
        return original(first, event, year)

    monkeypatch.setattr(batch_module, "_same_session", explode)
    first = envelope(poison, 0)
    again = envelope(poison, 1)  # the same activity again: compared with the first
    plan = plan_batch([first, again], tz=OSLO, counted_types=None)
    assert [e.position for e, _ in plan.unprocessable] == [1]
    assert [row.position for row in plan.logs] == [0]
    assert plan.duplicates == 0


# --- the per-record guard of decoding -----------------------------------------------------

def bare_engine(metrics: Metrics) -> Engine:
    """An engine whose decode step alone is used: no broker, no database."""
    return Engine(
        None, None, None, metrics, None,  # type: ignore[arg-type]
        accepts={"activity-logged": ACTIVITY_EVENTS}, dlq_topic="dlq", poll_timeout_ms=1,
        max_records=10, revoke_deadline_s=1,
    )


def test_decoding_isolates_a_record_whose_decoding_raises(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    original = engine_module.decode

    def explode(raw: Any, **kwargs: Any) -> Any:
        if raw.offset == 1:
            raise ZeroDivisionError("injected")
        return original(raw, **kwargs)

    monkeypatch.setattr(engine_module, "decode", explode)
    metrics = Metrics()
    records = [record(events.logged(MENTOR), offset) for offset in range(3)]
    with caplog.at_level(logging.ERROR):
        envelopes, rejected = bare_engine(metrics)._decode(records)
    assert [e.offset for e in envelopes] == [0, 2]
    assert [(r.record.offset, r.kind) for r in rejected] == [(1, "unprocessable")]
    assert rejected[0].reason == "unprocessable: ZeroDivisionError: injected"
    assert metrics.value("milestones_dead_letters_total", reason="unprocessable") == 1
    assert "ZeroDivisionError" in caplog.text


# --- a thresholds row as the database returns it ------------------------------------------

@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ([], ()),
        ([200, 50, 50], (50, 200)),
        ([50, None], None),
        ([None], None),
        ([[50, 100], [200, 300]], None),
        ([0, 5], None),
        ([True], None),
    ],
)
def test_stored_thresholds_normalizes_a_usable_row_and_refuses_the_rest(
    raw: list[Any], expected: tuple[int, ...] | None
) -> None:
    assert stored_thresholds(raw) == expected


# --- a dead letter too large to copy --------------------------------------------------------

class SizeLimitedProducer:
    """Stands in for the producer: refuses a record over ``client_limit`` bytes at once (as
    aiokafka does), and fails the send of one over ``broker_limit`` (as the broker does)."""

    def __init__(self, client_limit: int, broker_limit: int) -> None:
        self.client_limit, self.broker_limit = client_limit, broker_limit
        self.sent: list[tuple[bytes | None, bytes | None, dict[str, bytes]]] = []

    async def send(self, topic: str, *, value: bytes | None, key: bytes | None,
                   headers: list[tuple[str, bytes]]) -> asyncio.Future[None]:
        size = len(value or b"") + len(key or b"")
        if size > self.client_limit:
            raise MessageSizeTooLargeError("over max_request_size")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if size > self.broker_limit:
            done.set_exception(MessageSizeTooLargeError("refused by the broker"))
        else:
            self.sent.append((key, value, dict(headers)))
            done.set_result(None)
        return done


@pytest.mark.parametrize(
    ("client_limit", "broker_limit", "key_size", "copied"),
    [
        pytest.param(10**9, 10**9, 10, "key and value", id="fits"),
        pytest.param(1000, 10**9, 10, "key", id="refused by the producer"),
        pytest.param(10**9, 1000, 10, "key", id="refused by the broker"),
        pytest.param(1000, 10**9, 5000, "nothing", id="even the key is too large"),
    ],
)
async def test_a_dead_letter_too_large_to_copy_is_sent_without_its_bytes(
    client_limit: int, broker_limit: int, key_size: int, copied: str
) -> None:
    big = Record(b"v" * 4000, offset=7, key=b"k" * key_size)
    small = Record(b"ok", offset=8)
    producer = SizeLimitedProducer(client_limit, broker_limit)
    rejected = [Rejected(big, "value of 4000 bytes is over 64 KiB", "too_large"),
                Rejected(small, "empty value", "empty_value")]
    await send_dead_letters(producer, "dlq", rejected)
    assert len(producer.sent) == 2
    key, value, headers = next(sent for sent in producer.sent if sent[2]["source_offset"] == b"7")
    error = headers["error"].decode()
    if copied == "key and value":
        assert (key, value, error) == (big.key, big.value, "value of 4000 bytes is over 64 KiB")
    elif copied == "key":
        assert (key, value) == (big.key, None)
        assert error.endswith("too large for the dead-letter topic, the value is not copied"
                              " (read it at its source position)")
    else:
        assert (key, value) == (None, None)
        assert "the key and value are not copied" in error
    assert (b"ok", b"empty value") in [(v, h["error"]) for _, v, h in producer.sent]


# --- a foreign record on the notification topic ---------------------------------------------

@pytest.mark.parametrize(
    "value",
    [b'{"notification_id": 5}', b'{"notification_id": [1]}', b'{"notification_id": null}',
     b"[" * 100_000, b'"text"', b"\xff", b'{"notification_id": "not-a-uuid"}'],
)
def test_the_read_back_skips_any_record_that_is_not_a_notification(value: bytes) -> None:
    assert notification_id_of([], value) is None


def test_the_read_back_still_finds_a_notification_by_its_header_or_value() -> None:
    known = uuid.uuid4()
    assert notification_id_of([("notification_id", str(known).encode())], None) == known
    assert notification_id_of([], json.dumps({"notification_id": str(known)}).encode()) == known


def test_a_reason_with_a_lone_surrogate_still_makes_a_header() -> None:
    raised = ValueError("bad type 'a\ud800b'")
    rejected = unprocessable(Record(b"{}"), raised)
    headers = dict(dead_letter_headers(rejected))
    assert headers["error"] == b"unprocessable: ValueError: bad type 'a\\ud800b'"
