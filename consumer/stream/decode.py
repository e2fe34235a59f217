"""Turning Kafka records into validated events, or into the reason they are rejected.

Every rule of the contract's dead-letter list is here, in the order it is checked.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from pydantic import TypeAdapter, ValidationError

from consumer.domain.batch import Envelope, Event
from schemas.events import ActivityDeleted, ActivityLogged, InputEvent, PreferencesChanged

MAX_VALUE_BYTES = 64 * 1024
MAX_FUTURE = timedelta(hours=24)

_ADAPTER: TypeAdapter[Event] = TypeAdapter(InputEvent)


class RawRecord(Protocol):
    """The part of aiokafka's ConsumerRecord the engine reads."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def timestamp(self) -> int | None: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...


@dataclass(frozen=True, slots=True)
class Rejected:
    """A record that cannot be accepted; ``reason`` is the one-line ``error`` header."""

    record: RawRecord
    reason: str
    kind: str


@dataclass(frozen=True, slots=True)
class Decoded:
    envelope: Envelope
    key_mismatch: bool


def _reason(error: ValidationError) -> tuple[str, str]:
    first = error.errors(include_url=False)[0]
    kind = first["type"]
    location = ".".join(str(part) for part in first["loc"][1:] if part != "function-after")
    message = first["msg"].removeprefix("Value error, ")
    if kind == "json_invalid":
        return "invalid_json", f"invalid JSON or UTF-8: {first.get('ctx', {}).get('error', message)}"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        return "unknown_event_type", "unknown or missing event_type"
    if location.endswith("schema_version"):
        return "unknown_schema_version", f"schema_version: {message}"
    text = f"{location}: {message}" if location else message
    return kind, text.replace("\n", " ")


def decode(
    record: RawRecord,
    *,
    accepts: tuple[type[Event], ...],
    now_ms: int | None = None,
    position: int = 0,
) -> Decoded | Rejected:
    """Validate one record. ``accepts`` are the event classes allowed on its topic."""
    value = record.value
    if value is None:
        return Rejected(record, "null value", "null_value")
    if not value:
        return Rejected(record, "empty value", "empty_value")
    if len(value) > MAX_VALUE_BYTES:
        return Rejected(record, f"value of {len(value)} bytes is over 64 KiB", "too_large")
    try:
        event = _ADAPTER.validate_json(value)
    except ValidationError as error:
        kind, reason = _reason(error)
        return Rejected(record, reason, kind)
    if not isinstance(event, accepts):
        return Rejected(
            record, f"event_type {event.event_type} does not belong on {record.topic}",
            "unknown_event_type",
        )
    stamp_ms = record.timestamp if record.timestamp and record.timestamp > 0 else None
    if stamp_ms is None:
        stamp_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    moment = (
        event.occurred_at if isinstance(event, ActivityLogged)
        else event.changed_at if isinstance(event, PreferencesChanged)
        else None
    )
    if moment is not None:
        limit = datetime.fromtimestamp(stamp_ms / 1000, UTC) + MAX_FUTURE
        if moment > limit:
            field = "occurred_at" if isinstance(event, ActivityLogged) else "changed_at"
            return Rejected(
                record, f"{field} is more than 24 hours after the record timestamp", "future"
            )
    expected_key = str(event.mentor_id).encode()
    envelope = Envelope(
        event=event,
        position=position,
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        timestamp_ms=stamp_ms,
    )
    return Decoded(envelope, key_mismatch=record.key != expected_key)


ACTIVITY_EVENTS: tuple[type[Event], ...] = (ActivityLogged, ActivityDeleted)
PREFERENCE_EVENTS: tuple[type[Event], ...] = (PreferencesChanged,)
