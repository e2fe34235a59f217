"""Bounded input: a value over 64 KiB and a string outside its length bounds are rejected at
the edge, exactly at the limits, before any JSON or model work is spent on them."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from consumer.stream.decode import MAX_VALUE_BYTES, Decoded, Rejected, decode
from schemas.events import MAX_ACTIVITY_TYPE_CHARS, ActivityDeleted, ActivityLogged
from tests.support.events import logged, new_id


@dataclass(frozen=True)
class Record:
    topic: str
    value: bytes | None
    partition: int = 0
    offset: int = 0
    timestamp: int | None = None
    key: bytes | None = None


ACCEPTS = (ActivityLogged, ActivityDeleted)


def _padded_to(size: int, **fields: str) -> bytes:
    """An otherwise valid ``activity.logged`` value of exactly ``size`` bytes (the padding is
    an extra field, which the model ignores)."""
    event = {**logged(new_id()), **fields, "padding": ""}
    bare = len(json.dumps(event, separators=(",", ":")).encode())
    event["padding"] = "x" * (size - bare)
    value = json.dumps(event, separators=(",", ":")).encode()
    assert len(value) == size
    return value


def test_a_value_of_exactly_64_kib_is_accepted_and_one_byte_more_is_rejected() -> None:
    assert MAX_VALUE_BYTES == 64 * 1024
    at_limit = decode(Record("activity", _padded_to(MAX_VALUE_BYTES)), accepts=ACCEPTS)
    assert isinstance(at_limit, Decoded)
    over = decode(Record("activity", _padded_to(MAX_VALUE_BYTES + 1)), accepts=ACCEPTS)
    assert isinstance(over, Rejected)
    assert over.kind == "too_large"


@pytest.mark.parametrize(
    ("activity_type", "accepted"),
    [("", False), ("x", True), ("x" * MAX_ACTIVITY_TYPE_CHARS, True),
     ("x" * (MAX_ACTIVITY_TYPE_CHARS + 1), False), ("a\x00b", False)],
)
def test_activity_type_is_bounded_in_length_and_free_of_nul(activity_type: str, accepted: bool) -> None:
    value = json.dumps(logged(new_id(), activity_type=activity_type)).encode()
    result = decode(Record("activity", value), accepts=ACCEPTS)
    assert isinstance(result, Decoded) is accepted, result
