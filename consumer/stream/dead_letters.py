"""The dead-letter topic: the original bytes, unchanged, with the reason in headers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from aiokafka.errors import MessageSizeTooLargeError

from consumer.stream.decode import Rejected

log = logging.getLogger(__name__)

MAX_REASON_CHARS = 500
NOT_COPIED = "; too large for the dead-letter topic, the {what} not copied (read it at its source position)"


def dead_letter_headers(rejected: Rejected, not_copied: str = "") -> list[tuple[str, bytes]]:
    reason = " ".join(rejected.reason.split())[:MAX_REASON_CHARS] + not_copied
    record = rejected.record
    return [
        # An exception's message may carry any text, a lone surrogate too: encoded so that
        # it cannot fail (a failing dead letter would stop its partition).
        ("error", reason.encode("utf-8", "backslashreplace")),
        ("source_topic", record.topic.encode()),
        ("source_partition", str(record.partition).encode()),
        ("source_offset", str(record.offset).encode()),
        # The reason's kind alone (e.g. invalid_json), for `milestones dead-letters --reason`.
        ("error_kind", rejected.kind.encode()),
    ]


async def send_dead_letters(producer: Any, topic: str, rejected: Sequence[Rejected]) -> None:
    """Send and wait for every acknowledgement; raise if any send failed.

    The caller commits the batch's offsets only after this returns, so a crash in between
    repeats a dead letter (allowed by the contract) but never loses one.

    A message too large to copy (the producer's request limit, or the broker's message size
    limit for the dead-letter topic, once the headers are added) would otherwise be retried
    forever and stop its partition for good: it is dead-lettered without its value (and, if
    that is not enough, without its key), the ``error`` header saying so. Its bytes stay at
    the source position the headers name.
    """
    if not rejected:
        return
    futures = [await _send(producer, topic, item) for item in rejected]
    results = await asyncio.gather(*futures, return_exceptions=True)
    too_large = []
    for item, result in zip(rejected, results, strict=True):
        if isinstance(result, MessageSizeTooLargeError):  # the broker refused it
            too_large.append(item)
        elif isinstance(result, BaseException):
            raise result
    if too_large:
        await asyncio.gather(*[await _send(producer, topic, item, copy=1) for item in too_large])


async def _send(producer: Any, topic: str, item: Rejected, copy: int = 2) -> Any:
    """``copy``: 2 key and value, 1 the key only, 0 neither."""
    record = item.record
    not_copied = "" if copy == 2 else NOT_COPIED.format(
        what="value is" if copy == 1 else "key and value are"
    )
    try:
        return await producer.send(
            topic,
            value=record.value if copy == 2 else None,
            key=record.key if copy >= 1 else None,
            headers=dead_letter_headers(item, not_copied),
        )
    except MessageSizeTooLargeError:  # refused by the producer itself, before sending
        if copy == 0:
            raise
        log.error("dead letter %s[%d]@%d too large to copy (%d bytes of value)", record.topic,
                  record.partition, record.offset, len(record.value or b""))
        return await _send(producer, topic, item, copy - 1)
