"""``milestones dead-letters [--since T] [--reason KIND] [--json]``: what was rejected, and why.

Reads the dead-letter topic from its start to its end (no consumer group, nothing committed),
within a bounded wait, and prints one line per dead letter as it is read: when it was
dead-lettered, where it came from (its ``source_*`` headers), the reason kind (``error_kind``)
and the ``error`` header, and the start of the value with control characters escaped (safe for a terminal).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

from aiokafka import ConsumerRecord
from aiokafka.errors import KafkaTimeoutError

from consumer.commands.common import write_out
from consumer.settings import Settings, SettingsError
from consumer.stream.topic_reader import TopicMissing, topic_records

READ_TIMEOUT_S = 30.0
VALUE_PREFIX_BYTES = 80
# A reason kind: a lowercase word, in the error_kind header or starting the error text.
_KIND = re.compile(r"^([a-z][a-z0-9_]*):")


@dataclass(frozen=True, slots=True)
class DeadLetter:
    dead_lettered_at: str
    source_topic: str
    source_partition: str
    source_offset: str
    kind: str
    error: str
    value_bytes: int | None
    value_prefix: str
    key: str
    offset: int


def parse_since(text: str | None, tz: ZoneInfo) -> datetime | None:
    """An ISO 8601 date or time; without an offset it is read in the configured time zone."""
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        try:
            moment = datetime.combine(date.fromisoformat(text), datetime.min.time())
        except ValueError:
            raise SettingsError(f"--since: not an ISO 8601 date or time: {text!r}") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=tz)


def printable(raw: bytes | None, limit: int = VALUE_PREFIX_BYTES) -> str:
    """The first ``limit`` bytes as text a terminal shows literally: control characters, bytes
    that are not UTF-8 and backslashes escaped; ``(null)`` for a null value."""
    if raw is None:
        return "(null)"
    text = raw[:limit].decode("utf-8", errors="surrogateescape")
    escaped = "".join(map(_escape, text))
    return escaped + ("…" if len(raw) > limit else "")


def _escape(char: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if char == "\\":
        return "\\\\"
    if char.isprintable():
        return char
    return char.encode("unicode_escape").decode("ascii")


def dead_letter_of(record: ConsumerRecord[bytes, bytes]) -> DeadLetter:
    headers = {name: printable(value, 1_000) for name, value in record.headers or ()}
    error = headers.get("error", "-")
    # The error_kind header; older dead letters have only the error text, which starts with
    # the kind for some reasons ("unprocessable: ...").
    match = _KIND.match(headers.get("error_kind", "") + ":") or _KIND.match(error)
    stamp = datetime.fromtimestamp(record.timestamp / 1000, UTC) if record.timestamp else None
    return DeadLetter(
        dead_lettered_at=stamp.strftime("%Y-%m-%d %H:%M:%S UTC") if stamp else "-",
        source_topic=headers.get("source_topic", "-"),
        source_partition=headers.get("source_partition", "-"),
        source_offset=headers.get("source_offset", "-"),
        kind=match.group(1) if match else "-",
        error=error,
        value_bytes=None if record.value is None else len(record.value),
        value_prefix=printable(record.value),
        key=printable(record.key, 64),
        offset=record.offset,
    )


def matches(letter: DeadLetter, record_ms: int, since_ms: int | None, kind: str | None) -> bool:
    if since_ms is not None and record_ms < since_ms:
        return False
    return kind is None or letter.kind == kind or (letter.kind == "-" and kind in letter.error)


def line_of(letter: DeadLetter) -> str:
    source = f"{letter.source_topic}[{letter.source_partition}]@{letter.source_offset}"
    return f"{letter.dead_lettered_at}  {source}  {letter.kind}  {letter.error}  value: " + (
        letter.value_prefix
    )


async def dead_letters_command(
    settings: Settings, *, since: str | None, reason: str | None, as_json: bool = False
) -> int:
    since_at = parse_since(since, settings.tz)
    since_ms = None if since_at is None else int(since_at.timestamp() * 1000)
    settings.require_kafka()
    shown = total = 0
    try:
        async with topic_records(
            settings, settings.dlq_topic, timeout_s=READ_TIMEOUT_S
        ) as records:
            async for record in records:
                total += 1
                letter = dead_letter_of(record)
                if not matches(letter, record.timestamp or 0, since_ms, reason):
                    continue
                shown += 1
                if not write_out((json.dumps(asdict(letter)) if as_json else line_of(letter)) + "\n"):
                    return 0  # the reader went away (`| head`): it has what it wanted
    except TopicMissing:
        print(f"no dead-letter topic {settings.dlq_topic}: nothing was ever rejected",
              file=sys.stderr)
        return 0
    except KafkaTimeoutError as error:
        print(f"milestones: {error}; {shown} shown so far", file=sys.stderr)
        return 1
    filters = _describe_filters(since, reason)
    print(f"{shown} of {total} dead letter(s) on {settings.dlq_topic}{filters}", file=sys.stderr)
    return 0


def _describe_filters(since: str | None, reason: str | None) -> str:
    parts: Sequence[str] = [
        part for part in (f"since {since}" if since else "", f"reason {reason}" if reason else "")
        if part
    ]
    return f" ({', '.join(parts)})" if parts else ""
