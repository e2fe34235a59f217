"""Session settings of the engine's connections, and why the batch statements need them.

A statement asyncpg prepared once may get a generic plan, made with the statistics of that
moment: on an empty table, a scan of the whole table per summary row. With autovacuum off or
behind, nothing replaced it, and each batch got slower as milestones accumulated. The engine's
connections plan every run instead (``plan_cache_mode = force_custom_plan``).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import asyncpg

from consumer.store import batch_sql
from consumer.store.migrate import migrate
from consumer.store.postgres import connect_pool

ORG = uuid.UUID(int=1)


async def _summary_plan(connection: asyncpg.Connection, mentors: list[uuid.UUID]) -> str:
    """EXPLAIN of the prepared summary statement, after enough runs to allow a generic plan."""
    await connection.execute(f"PREPARE summary AS {batch_sql.UPSERT_SUMMARY}")
    literal = "ARRAY[" + ",".join(f"'{m}'" for m in mentors) + "]::uuid[]"
    ones = f"array_fill(1, ARRAY[{len(mentors)}])"
    years = f"array_fill(2026, ARRAY[{len(mentors)}])"
    organizations = f"array_fill('{ORG}'::uuid, ARRAY[{len(mentors)}])"
    arguments = (f"({literal}, {years}, {ones}, {organizations}, ARRAY[]::uuid[], ARRAY[]::int[],"
                 " ARRAY[1])")
    for _ in range(6):  # the sixth run may switch to a generic plan
        async with connection.transaction():
            await connection.execute(f"EXECUTE summary{arguments}")
    # Milestones accumulate, no ANALYZE runs (autovacuum may be off or behind).
    await connection.execute(
        "INSERT INTO scenario_notifications (id, user_id, organization_id, scenario_type, year,"
        " milestone_value, session_count, status, reached_at)"
        " SELECT gen_random_uuid(), gen_random_uuid(), $1, 'milestone', 2026, 50, 50,"
        " 'published', now() FROM generate_series(1, 20000)",
        ORG,
    )
    async with connection.transaction():
        rows = await connection.fetch(f"EXPLAIN EXECUTE summary{arguments}")
    return "\n".join(row[0] for row in rows)


async def test_engine_connections_plan_the_summary_with_the_index(database_url: str) -> None:
    pool = await connect_pool(database_url, timeout_s=10, max_size=1)
    try:
        async with pool.acquire() as connection:
            await migrate(connection)
            await connection.execute("VACUUM ANALYZE scenario_notifications")
        # The same connection again, after the pool's RESET ALL.
        async with pool.acquire() as connection:
            plan = await _summary_plan(connection, [uuid.uuid4() for _ in range(50)])
    finally:
        await pool.close()
    assert "Seq Scan on scenario_notifications" not in plan, plan
    assert "scenario_notifications" in plan


async def test_without_custom_plans_the_hazard_is_real(database_url: str) -> None:
    """The test above can fail: a plain connection keeps the generic plan and scans."""
    connection = await asyncpg.connect(database_url)
    try:
        await migrate(connection)
        await connection.execute("VACUUM ANALYZE scenario_notifications")
        plan = await _summary_plan(connection, [uuid.uuid4() for _ in range(50)])
    finally:
        await connection.close()
    assert "Seq Scan on scenario_notifications" in plan, plan


async def test_session_settings_survive_the_pools_reset(database_url: str) -> None:
    """asyncpg's pool runs RESET ALL on release: settings made by SET were gone after the
    first batch. Sent at connection start, they are what RESET ALL returns to."""
    bounded = await connect_pool(database_url, timeout_s=10, max_size=1)
    unbounded = await connect_pool(database_url, timeout_s=10, max_size=1,
                                   statement_timeouts=False)
    try:
        for _ in range(3):
            async with bounded.acquire() as connection:
                assert await connection.fetchval("SHOW statement_timeout") == "30s"
                assert await connection.fetchval("SHOW lock_timeout") == "20s"
                assert await connection.fetchval("SHOW plan_cache_mode") == "force_custom_plan"
                await connection.execute("SET statement_timeout = 0")  # undone on release
            async with unbounded.acquire() as connection:
                assert await connection.fetchval("SHOW statement_timeout") == "0"
                assert await connection.fetchval("SHOW plan_cache_mode") == "force_custom_plan"
    finally:
        await bounded.close()
        await unbounded.close()


async def test_the_ledger_insert_probes_its_exceptions_by_key(database_url: str) -> None:
    """The ledger insert looks its few exceptions up by primary key, never by a scan of the
    whole ledger: as a join, the planner misjudged how many exceptions there are and hashed
    the ledger once per batch, a cost that grew with the ledger."""
    connection = await asyncpg.connect(database_url, server_settings={
        "plan_cache_mode": "force_custom_plan"})
    try:
        await migrate(connection)
        await connection.execute(
            "INSERT INTO activity_ledger (activity_id, mentor_id, organization_id, year,"
            " occurred_at, activity_type, counted)"
            " SELECT gen_random_uuid(), gen_random_uuid(), $1, 2026, now(), 'session', true"
            " FROM generate_series(1, 50000)",
            ORG,
        )
        await connection.execute("VACUUM ANALYZE activity_ledger")
        earlier = [row[0] for row in await connection.fetch(
            "SELECT activity_id FROM activity_ledger LIMIT 30")]
        ids = sorted([uuid.uuid4() for _ in range(3000)] + earlier, key=lambda u: u.int)
        size = len(ids)
        columns = (ids, [ORG] * size, [ORG] * size, [2026] * size,
                   [datetime.now(UTC)] * size, ["session"] * size, [True] * size, [None] * size)
        async with connection.transaction():
            rows = await connection.fetch(f"EXPLAIN {batch_sql.INSERT_LOGS}", *columns)
    finally:
        await connection.close()
    plan = "\n".join(row[0] for row in rows)
    assert "Seq Scan on activity_ledger" not in plan, plan
