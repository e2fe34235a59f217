"""Least privilege: what the role that runs the engine may do, table by table.

The role that runs ``migrate`` owns the schema and its tables. The engine's own commands run
as another role with only the privileges below: it can read and write rows where it needs to,
never ``ALTER``, ``DROP``, ``TRUNCATE`` or create anything (so a pending migration makes ``run``
stop and say to run ``migrate``). ``milestones grant ROLE`` applies them, run as the owner;
run it again after every ``migrate`` that adds a table. A test runs the whole engine as such
a role, so a statement that needs more fails there first.
"""

from __future__ import annotations

import asyncpg

# run, replay, sweep, status, reconcile (--fix too), mentor, thresholds, dead-letters.
# ``prune`` replaces a trigger on activity_ledger, which only the owner may: it runs as the owner.
RUNTIME_PRIVILEGES: dict[str, tuple[str, ...]] = {
    "schema_migrations": ("SELECT",),  # is a migration pending?
    "activity_ledger": ("SELECT", "INSERT", "UPDATE"),  # a delete marks its row
    "annual_summary": ("SELECT", "INSERT", "UPDATE"),
    "scenario_notifications": ("SELECT", "INSERT", "UPDATE"),
    "mentor_preferences": ("SELECT", "INSERT", "UPDATE"),
    "milestone_thresholds": ("SELECT", "INSERT", "UPDATE", "DELETE"),  # thresholds unset
    "milestone_thresholds_history": ("SELECT", "INSERT"),
    "publisher_positions": ("SELECT", "INSERT", "UPDATE"),
    "publisher_unrecorded": ("SELECT", "INSERT", "UPDATE", "DELETE"),  # settled by a replay
    "replay_positions": ("SELECT", "INSERT", "UPDATE"),
    "engine_state": ("SELECT",),
}


# Tables the engine's role never touches (a migration's record for the operator).
NOT_GRANTED = frozenset({"milestone_thresholds_repaired"})


def quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def grant_statements(role: str, *, schema: str = "public") -> list[str]:
    """The SQL that gives ``role`` exactly the engine's privileges in ``schema``.

    It first takes back whatever the role held on the schema's tables, so running it again
    (after a migration) leaves exactly this set.
    """
    who, where = quote_identifier(role), quote_identifier(schema)
    statements = [
        f"REVOKE ALL ON ALL TABLES IN SCHEMA {where} FROM {who}",
        f"REVOKE CREATE ON SCHEMA {where} FROM {who}",
        f"GRANT USAGE ON SCHEMA {where} TO {who}",
    ]
    for table, granted in RUNTIME_PRIVILEGES.items():
        statements.append(
            f"GRANT {', '.join(granted)} ON {where}.{quote_identifier(table)} TO {who}"
        )
    return statements


async def role_exists(connection: asyncpg.Connection, role: str) -> bool:
    return bool(await connection.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role))


async def current_schema(connection: asyncpg.Connection) -> str:
    return str(await connection.fetchval("SELECT current_schema()"))


async def apply_grants(connection: asyncpg.Connection, statements: list[str]) -> None:
    """Every statement of :func:`grant_statements` in one transaction: all or none."""
    async with connection.transaction():
        for statement in statements:
            await connection.execute(statement)
