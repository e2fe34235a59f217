"""Logging set-up: one line per event, text for people or JSON for collectors.

A line about one message or one milestone carries its position and ids as fields, passed with
``extra=`` (:func:`fields` builds it): ``topic``, ``partition``, ``offset``, ``mentor_id``,
``activity_id``, ``notification_id``. JSON has them as keys; text appends those that the
message does not already show, as ``key=value``. Timestamps have milliseconds, in UTC.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

FIELDS = ("topic", "partition", "offset", "mentor_id", "activity_id", "notification_id")
_IDS = ("mentor_id", "activity_id", "notification_id")


def fields(**values: Any) -> dict[str, Any]:
    """``extra=`` for a log call: the known fields that have a value (ids as text)."""
    unknown = values.keys() - set(FIELDS)
    assert not unknown, f"not a log field: {sorted(unknown)}"
    return {key: value if isinstance(value, int) else str(value)
            for key, value in values.items() if value is not None}


def _timestamp(record: logging.LogRecord) -> str:
    """ISO 8601 in UTC with milliseconds: ``2026-03-14T09:00:00.123Z``."""
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


def _fields_of(record: logging.LogRecord) -> dict[str, Any]:
    return {key: record.__dict__[key] for key in FIELDS if key in record.__dict__}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_fields_of(record),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(ts)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.ts = _timestamp(record)
        line = super().format(record)
        message = record.getMessage()
        values = _fields_of(record)
        # Readable: what the message already shows is not repeated: an id in its text, or the
        # position written as topic[partition]@offset.
        shown = {key for key in _IDS if key in values and values[key] in message}
        if {"topic", "partition", "offset"} <= values.keys() and (
            f"{values['topic']}[{values['partition']}]@{values['offset']}" in message
        ):
            shown |= {"topic", "partition", "offset"}
        extra = [f"{key}={value}" for key, value in values.items() if key not in shown]
        if not extra:
            return line
        head, newline, rest = line.partition("\n")  # a traceback stays below the fields
        return f"{head} {' '.join(extra)}{newline}{rest}"


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiokafka logs every reconnect attempt at ERROR; the engine reports outages itself.
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, logging.getLevelName(level)))
    # asyncpg's pool logs a traceback every second while Postgres is away; the engine already
    # says so once per retry, without the traceback.
    logging.getLogger("asyncpg.pool").setLevel(logging.ERROR)
