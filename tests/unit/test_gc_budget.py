"""The young-generation threshold must stay above what two batches in flight keep alive.

Below it, every batch paid a collection that walked the whole batch (11% of the engine's time
in the benchmark). This counts the tracked objects one record really costs through decode and
planning, so a change that adds objects per record fails here instead of slowing the engine.
"""

from __future__ import annotations

import gc
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from aiokafka.structs import ConsumerRecord

from consumer.domain.batch import plan_batch, tally
from consumer.runtime import _OBJECTS_PER_RECORD, tune_garbage_collector
from consumer.stream.decode import ACTIVITY_EVENTS, Decoded, decode

RECORDS = 5_000


@pytest.fixture
def collector_restored() -> Iterator[None]:
    threshold = gc.get_threshold()
    enabled = gc.isenabled()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)
    if enabled:
        gc.enable()


def _records(count: int) -> list[ConsumerRecord[bytes, bytes]]:
    mentors = [uuid.uuid4() for _ in range(200)]
    start = datetime(2026, 1, 1, tzinfo=UTC)
    stamp_ms = int(datetime(2027, 1, 1, tzinfo=UTC).timestamp() * 1000)
    records = []
    for offset in range(count):
        mentor = mentors[offset % len(mentors)]
        value = json.dumps({
            "event_type": "activity.logged", "schema_version": 1,
            "event_id": str(uuid.uuid4()), "activity_id": str(uuid.uuid4()),
            "mentor_id": str(mentor), "organization_id": str(uuid.UUID(int=1)),
            "occurred_at": (start + timedelta(minutes=offset)).isoformat(),
            "activity_type": "session",
        }).encode()
        records.append(ConsumerRecord(
            "activity-logged", offset % 8, offset, stamp_ms, 0, str(mentor).encode(), value,
            None, len(str(mentor)), len(value), (),
        ))
    return records


def test_one_record_stays_within_the_budget(collector_restored: None) -> None:
    raw = [(r.topic, r.partition, r.offset, r.timestamp, r.key, r.value) for r in _records(RECORDS)]
    gc.collect()
    gc.disable()
    before = gc.get_count()[0]
    records = [ConsumerRecord(t, p, o, s, 0, k, v, None, 0, 0, ()) for t, p, o, s, k, v in raw]
    decoded = [decode(record, accepts=ACTIVITY_EVENTS, position=i) for i, record in enumerate(records)]
    envelopes = [item.envelope for item in decoded if isinstance(item, Decoded)]
    assert len(envelopes) == RECORDS
    plan = plan_batch(envelopes, tz=ZoneInfo("Europe/Oslo"), counted_types=None)
    changes = tally(plan, [], [])  # every counted log entered
    per_record = (gc.get_count()[0] - before) / RECORDS
    assert changes
    assert per_record <= _OBJECTS_PER_RECORD, (
        f"{per_record:.1f} tracked objects per record: raise _OBJECTS_PER_RECORD")


def test_two_batches_in_flight_trigger_no_young_collection(collector_restored: None) -> None:
    raw = _records(RECORDS)
    tune_garbage_collector(RECORDS)
    collections: list[int] = []

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collections.append(info["generation"])

    gc.callbacks.append(count)
    try:
        batches = []
        for _ in range(2):  # the batch being written and the prefetched one
            decoded = [decode(r, accepts=ACTIVITY_EVENTS, position=i) for i, r in enumerate(raw)]
            envelopes = [item.envelope for item in decoded if isinstance(item, Decoded)]
            batches.append(plan_batch(envelopes, tz=ZoneInfo("Europe/Oslo"), counted_types=None))
    finally:
        gc.callbacks.remove(count)
    assert len(batches) == 2
    assert collections == []
