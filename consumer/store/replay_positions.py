"""The replay's positions as this database holds them (table ``replay_positions``, migration
0005): written after each replay batch's transaction, read when a replay resumes.

Partitions are ``(topic, partition)`` pairs: the store knows no Kafka client types.
"""

from __future__ import annotations

from collections.abc import Mapping

import asyncpg

Partition = tuple[str, int]

_READ = "SELECT topic, partition, next_offset FROM replay_positions WHERE group_id = $1"

# Overwritten, not raised to the greatest: the row says how far the last batch read, which a
# replay from the beginning moves back; every value written is one the database holds.
_SAVE = """
INSERT INTO replay_positions (group_id, topic, partition, next_offset)
SELECT $1, t.topic, t.partition, t.next_offset
FROM unnest($2::text[], $3::int[], $4::bigint[]) AS t(topic, partition, next_offset)
ORDER BY t.topic, t.partition
ON CONFLICT (group_id, topic, partition)
DO UPDATE SET next_offset = excluded.next_offset, updated_at = now()
"""


async def read_positions(db: asyncpg.Pool | asyncpg.Connection, group_id: str) -> dict[Partition, int]:
    rows = await db.fetch(_READ, group_id)
    return {(row["topic"], row["partition"]): int(row["next_offset"]) for row in rows}


async def save_positions(
    db: asyncpg.Pool | asyncpg.Connection, group_id: str, positions: Mapping[Partition, int]
) -> None:
    keys = sorted(positions)
    await db.execute(
        _SAVE, group_id, [key[0] for key in keys], [key[1] for key in keys],
        [positions[key] for key in keys],
    )
