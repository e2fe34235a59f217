"""Log lines: fields from ``extra=`` in JSON and text, millisecond UTC timestamps."""

from __future__ import annotations

import json
import logging
import re
from uuid import UUID

import pytest

from consumer.ops.logs import JsonFormatter, TextFormatter, fields

MENTOR = UUID("0b7f3c1e-6a52-4f0e-9a55-0d3c1f2b9e11")
NOTIFICATION = UUID("9d2c1b7a-0e3f-5a4b-8c6d-2e1f0a9b8c7d")


def record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("consumer.test", logging.WARNING, __file__, 1, message, args, None)
    made.created = 1_773_482_400.25  # 2026-03-14T10:00:00.250Z
    made.msecs = 250.0
    made.__dict__.update(extra)
    return made


def test_json_line_has_millisecond_utc_time_and_the_fields_given() -> None:
    line = json.loads(JsonFormatter().format(record(
        "dead letter %s[%d]@%d", "activity-logged", 3, 17,
        **fields(topic="activity-logged", partition=3, offset=17, mentor_id=MENTOR),
    )))
    assert line == {
        "ts": "2026-03-14T10:00:00.250Z", "level": "WARNING", "logger": "consumer.test",
        "message": "dead letter activity-logged[3]@17", "topic": "activity-logged",
        "partition": 3, "offset": 17, "mentor_id": str(MENTOR),
    }


def test_json_line_without_fields_has_only_the_four_keys() -> None:
    assert set(json.loads(JsonFormatter().format(record("stopped")))) == {
        "ts", "level", "logger", "message"}


def test_text_line_appends_only_the_fields_its_message_does_not_show() -> None:
    line = TextFormatter().format(record(
        "milestone 50 recorded for mentor %s", MENTOR,
        **fields(mentor_id=MENTOR, notification_id=NOTIFICATION, activity_id=None),
    ))
    assert line == (f"2026-03-14T10:00:00.250Z WARNING consumer.test: milestone 50 recorded for"
                    f" mentor {MENTOR} notification_id={NOTIFICATION}")


def test_text_line_does_not_repeat_a_position_written_as_topic_partition_offset() -> None:
    extra = fields(topic="t", partition=1, offset=100)
    assert TextFormatter().format(record("dead letter t[1]@100", **extra)).endswith("@100")
    assert re.search(r" topic=t partition=1 offset=100$",
                     TextFormatter().format(record("milestone 100 in t", **extra)))


def test_an_unknown_field_name_is_a_bug() -> None:
    with pytest.raises(AssertionError, match="not a log field"):
        fields(mentor=MENTOR)
