"""The dead-letter topic: the original bytes, unchanged, with the reason in headers."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from consumer.stream.decode import Rejected

MAX_REASON_CHARS = 500


def dead_letter_headers(rejected: Rejected) -> list[tuple[str, bytes]]:
    reason = " ".join(rejected.reason.split())[:MAX_REASON_CHARS]
    record = rejected.record
    return [
        ("error", reason.encode()),
        ("source_topic", record.topic.encode()),
        ("source_partition", str(record.partition).encode()),
        ("source_offset", str(record.offset).encode()),
    ]


async def send_dead_letters(producer: Any, topic: str, rejected: Sequence[Rejected]) -> None:
    """Send and wait for every acknowledgement; raise if any send failed.

    The caller commits the batch's offsets only after this returns, so a crash in between
    repeats a dead letter (allowed by the contract) but never loses one.
    """
    if not rejected:
        return
    futures = [
        await producer.send(
            topic,
            value=item.record.value,
            key=item.record.key,
            headers=dead_letter_headers(item),
        )
        for item in rejected
    ]
    await asyncio.gather(*futures)
