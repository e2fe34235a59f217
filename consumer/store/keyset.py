"""Keyset walks over uuid keys (chunks of ``key > last``), one statement per chunk.

The nil UUID sorts before every other, so a walk starts at it with ``>=`` and goes on with
``>`` from the last key of each chunk. (``uuid.NIL`` only exists from Python 3.14.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from uuid import UUID

import asyncpg

NIL = UUID(int=0)


async def walk_chunks(
    run_chunk: Callable[[str, UUID], Awaitable[asyncpg.Record | None]],
    chunk_rows: int,
    on_chunk: Callable[[int], None] | None = None,
) -> AsyncIterator[asyncpg.Record]:
    """Yield the row each chunk's statement returns until a chunk scans fewer than
    ``chunk_rows``; ``run_chunk(op, after)`` runs one chunk, its row holds ``scanned`` and
    ``last_id``. ``on_chunk`` hears the rows scanned by each chunk (a command's progress)."""
    after, op = NIL, ">="
    while True:
        row = await run_chunk(op, after)
        assert row is not None
        if on_chunk is not None:
            on_chunk(row["scanned"])
        yield row
        if row["scanned"] < chunk_rows:
            return
        after, op = row["last_id"], ">"
