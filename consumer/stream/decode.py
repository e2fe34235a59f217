"""Turning Kafka records into validated events, or into the reason they are rejected.

Every rule of the contract's dead-letter list is here, in the order it is checked.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Protocol
from uuid import UUID

from pydantic import TypeAdapter, ValidationError

from consumer.domain.batch import Envelope, Event
from schemas.events import (
    MAX_ACTIVITY_TYPE_CHARS,
    SUPPORTED_SCHEMA_VERSION,
    ActivityDeleted,
    ActivityLogged,
    InputEvent,
    PreferencesChanged,
)
from schemas.fast import LOGGED_DECODER, LoggedActivity

MAX_VALUE_BYTES = 64 * 1024
MAX_FUTURE_MS = 24 * 3600 * 1000
# Timestamps are accepted for these years (as written, before applying the offset): the
# range the year table covers. Outside it the year computation, or asyncpg's conversion to
# UTC, can overflow (``0001-01-01T00:00:00+01:00`` is year 0 in UTC).
MIN_YEAR = 1900
MAX_YEAR = 2200

_ADAPTER: TypeAdapter[Event] = TypeAdapter(InputEvent)
# A fraction of a second longer than microseconds: msgspec rounds it, pydantic truncates.
_LONG_FRACTION = re.compile(rb"\.[0-9]{7}")


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


@dataclass(slots=True)  # not frozen: one per record, and a frozen __init__ is slow
class Decoded:
    envelope: Envelope
    key_mismatch: bool


def unprocessable(record: RawRecord, error: BaseException) -> Rejected:
    """A record whose handling raised: isolated, the exception named in its ``error`` header."""
    return Rejected(record, exception_reason(error), "unprocessable")


def exception_reason(error: BaseException) -> str:
    return f"unprocessable: {type(error).__name__}: {error}"


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
    event: Event | None = _fast_logged(value) if ActivityLogged in accepts else None
    if event is None:
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
    stamp_ms = record.timestamp
    if not stamp_ms or stamp_ms <= 0:
        stamp_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    seconds: float | None = None
    # Per type: the year range first (the conversions below could overflow outside it), then
    # the future check. Inline, not a helper: a call per event cost more than both checks.
    if type(event) is LoggedActivity or type(event) is ActivityLogged:
        occurred_at = event.occurred_at
        if not MIN_YEAR <= occurred_at.year <= MAX_YEAR:
            return _out_of_range(record, "occurred_at", occurred_at.year)
        # Epoch seconds, computed once: the future check here and the year in planning use it.
        seconds = occurred_at.timestamp()
        if seconds * 1000 > stamp_ms + MAX_FUTURE_MS:
            return Rejected(
                record, "occurred_at is more than 24 hours after the record timestamp", "future"
            )
    elif type(event) is PreferencesChanged:
        changed_at = event.changed_at
        if not MIN_YEAR <= changed_at.year <= MAX_YEAR:
            return _out_of_range(record, "changed_at", changed_at.year)
        if changed_at.timestamp() * 1000 > stamp_ms + MAX_FUTURE_MS:
            return Rejected(
                record, "changed_at is more than 24 hours after the record timestamp", "future"
            )
    elif isinstance(event, ActivityDeleted) and not MIN_YEAR <= event.deleted_at.year <= MAX_YEAR:
        return _out_of_range(record, "deleted_at", event.deleted_at.year)
    envelope = Envelope(
        event, position, record.topic, record.partition, record.offset, stamp_ms, seconds
    )
    return Decoded(envelope, record.key != _key_of(event.mentor_id))


def _out_of_range(record: RawRecord, field: str, year: int) -> Rejected:
    return Rejected(
        record, f"{field} year {year} is outside the years {MIN_YEAR} to {MAX_YEAR}",
        "out_of_range",
    )


def _fast_logged(value: bytes) -> LoggedActivity | None:
    """The ``activity.logged`` in ``value`` when msgspec decodes it and every check of the
    pydantic model holds; None otherwise, and the model decides (and words any rejection).

    The checks are those msgspec does not make, or makes otherwise: the schema version, the
    activity type's length and no NUL in it (Postgres text cannot hold one; msgspec refuses a
    lone surrogate itself), and no fraction of a second beyond microseconds anywhere in the
    value (msgspec rounds it where pydantic truncates). Aware timestamps, UUIDs, strict types,
    repeated and escaped keys and ignored extra fields agree (tests/unit/test_decode_differential).
    """
    try:
        event = LOGGED_DECODER.decode(value)
    except Exception:  # whatever msgspec makes of it, the model has the last word
        return None
    text = event.activity_type
    if (
        event.schema_version != SUPPORTED_SCHEMA_VERSION
        or not 0 < len(text) <= MAX_ACTIVITY_TYPE_CHARS
        or "\x00" in text
        or _LONG_FRACTION.search(value) is not None
    ):
        return None
    return event


_KEYS: dict[int, bytes] = {}
_KEYS_MAX = 16_384


def _key_of(mentor_id: UUID) -> bytes:
    """The record key a producer should use: ``str(UUID)`` cost 0.5 µs per record, a lookup
    by ``uuid.int`` a tenth of that. Bounded (about 2.5 MB): cleared when full, so a long tail
    of mentors costs the ``str`` again, never memory."""
    key = _KEYS.get(mentor_id.int)
    if key is None:
        if len(_KEYS) >= _KEYS_MAX:
            _KEYS.clear()
        key = _KEYS[mentor_id.int] = str(mentor_id).encode()
    return key


ACTIVITY_EVENTS: tuple[type[Event], ...] = (ActivityLogged, ActivityDeleted)
PREFERENCE_EVENTS: tuple[type[Event], ...] = (PreferencesChanged,)
