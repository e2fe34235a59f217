"""Versioned SQL migrations, applied under an advisory lock so two processes can race safely."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib.resources import files

import asyncpg

from consumer.store.errors import MigrationRequired

log = logging.getLogger(__name__)

# Any constant works; it only has to differ from other advisory locks in the same database.
MIGRATION_LOCK_KEY = 0x6D696C6573746F6E  # "mileston"
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def available_migrations() -> list[Migration]:
    folder = files("consumer.store") / "migrations"
    found = []
    for entry in folder.iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), entry.name, entry.read_text("utf-8")))
    return sorted(found, key=lambda migration: migration.version)


async def applied_versions(connection: asyncpg.Connection) -> set[int]:
    exists = await connection.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return set()
    rows = await connection.fetch("SELECT version FROM schema_migrations")
    return {row["version"] for row in rows}


async def pending_migrations(connection: asyncpg.Connection) -> list[Migration]:
    done = await applied_versions(connection)
    return [migration for migration in available_migrations() if migration.version not in done]


async def migrate(connection: asyncpg.Connection) -> list[str]:
    """Apply what is pending, each migration in its own transaction; return their names.

    The session-level advisory lock makes a second ``migrate`` wait, then find nothing to do.
    """
    await connection.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await connection.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version int PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        applied = []
        for migration in await pending_migrations(connection):
            async with connection.transaction():
                await connection.execute(migration.sql)
                await connection.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
            log.info("applied migration %s", migration.name)
            applied.append(migration.name)
        return applied
    finally:
        await connection.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)


async def ensure_schema(connection: asyncpg.Connection) -> list[str]:
    """What ``run`` does at start: migrate when this role may, else say to run ``migrate``."""
    pending = await pending_migrations(connection)
    if not pending:
        return []
    may_create = await connection.fetchval(
        "SELECT has_schema_privilege(current_user, current_schema(), 'CREATE')"
    )
    if not may_create:
        raise MigrationRequired(
            f"{len(pending)} schema migration(s) pending and this database role may not apply"
            " them: run `milestones migrate` with an owner role"
        )
    return await migrate(connection)
