"""Least privilege: the whole engine runs as a role that only has ``milestones grant``'s
privileges, while another role owns the schema. That role cannot alter, drop or create tables,
and a pending migration makes ``run`` stop and say to run ``migrate``."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from tests.e2e.conftest import Db, eventually, nid
from tests.support.engine import EngineLauncher, EngineProcess
from tests.support.events import ORG, deleted, logged, new_id, preference
from tests.support.kafka import KafkaHelper
from tests.support.topics import Topics

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

OTHER_ORG = "0f0f0f0f-0000-4000-8000-00000000000c"


@dataclass(frozen=True)
class Roles:
    owner: str
    app: str
    owner_url: str
    app_url: str


def _as_role(url: str, role: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{role}@{host}"))


@pytest.fixture
async def roles(database_url: str) -> AsyncIterator[Roles]:
    """An owner role that owns this test's database (and so its ``public`` schema), and an
    application role with nothing yet. Both log in without a password (the test server trusts
    local connections); both are dropped afterwards."""
    suffix = secrets.token_hex(4)
    owner, app = f"ms_owner_{suffix}", f"ms_app_{suffix}"
    database = urlsplit(database_url).path.lstrip("/")
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f"CREATE ROLE {owner} LOGIN; CREATE ROLE {app} LOGIN")
        await admin.execute(f'ALTER DATABASE "{database}" OWNER TO {owner}')
        await admin.execute(f"ALTER SCHEMA public OWNER TO {owner}")
        await admin.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        yield Roles(owner, app, _as_role(database_url, owner), _as_role(database_url, app))
    finally:
        await admin.execute(f'ALTER DATABASE "{database}" OWNER TO CURRENT_USER')
        await admin.execute(f"REASSIGN OWNED BY {owner}, {app} TO CURRENT_USER")
        await admin.execute(f"DROP OWNED BY {owner}, {app}")
        await admin.close()
        admin = await asyncpg.connect(_as_role(database_url, "postgres"))
        try:
            await admin.execute(f"DROP ROLE IF EXISTS {app}; DROP ROLE IF EXISTS {owner}")
        finally:
            await admin.close()


async def _ok(process: EngineProcess, timeout_s: float = 60) -> str:
    assert await process.wait(timeout_s) == 0, process.output()
    return process.stdout()


async def test_the_whole_engine_runs_as_a_role_with_only_the_granted_privileges(
    engine_process: EngineLauncher, kafka: KafkaHelper, topics: Topics, db: Db, roles: Roles
) -> None:
    owner = {"MILESTONES_DATABASE_URL": roles.owner_url, "MILESTONES_METRICS_PORT": "0"}
    app = {"MILESTONES_DATABASE_URL": roles.app_url}
    command = {**app, "MILESTONES_METRICS_PORT": "0"}
    await _ok(engine_process(owner, ("migrate",)))
    printed = await _ok(engine_process(owner, ("grant", roles.app)))
    assert f'GRANT SELECT, INSERT, UPDATE ON "public"."annual_summary" TO "{roles.app}";' in printed

    # The role cannot change the schema, empty a table or delete what it should not.
    connection = await asyncpg.connect(roles.app_url)
    try:
        for statement in (
            "ALTER TABLE annual_summary ADD COLUMN x int",
            "DROP TABLE scenario_notifications",
            "CREATE TABLE sneaky (x int)",
            "TRUNCATE activity_ledger",
            "DELETE FROM scenario_notifications",
            "DELETE FROM activity_ledger",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await connection.execute(statement)
    finally:
        await connection.close()

    # Counting, a duplicate, a deletion, an opt-out, a poison message, publishing.
    counted, opted_out, late = new_id(), new_id(), new_id()
    sessions = [logged(counted) for _ in range(50)]
    await kafka.produce_json(topics.preferences, preference(opted_out, False))
    engine = engine_process(app)
    await engine.wait_ready(60)
    await kafka.produce_json_many(topics.activity, [
        *sessions, sessions[0], deleted(counted, sessions[1]["activity_id"]), logged(counted),
        *(logged(opted_out) for _ in range(50)),
        *(logged(late, organization_id=OTHER_ORG) for _ in range(5)),
    ])
    await kafka.produce(topics.activity, b"\xff not json", key=b"poison")
    await kafka.wait_for_count(topics.dlq, 1, timeout_s=30)
    statuses = await eventually(
        db.statuses,
        lambda s: s.get((counted, 2026, 50)) == "published" and (opted_out, 2026, 50) in s,
        timeout_s=30,
    )
    assert statuses[(opted_out, 2026, 50)] == "suppressed"
    assert (await db.counts())[(counted, 2026)] == 50

    # The operator commands, as the same role: thresholds, then a sweep that finds the new one.
    await _ok(engine_process(command, ("thresholds", "set", OTHER_ORG, "5")))
    await _ok(engine_process(command, ("sweep", "--year", "2026")))
    await eventually(db.statuses, lambda s: s.get((late, 2026, 5)) == "published", timeout_s=30)
    await _ok(engine_process(command, ("mentor", counted, "--year", "2026")))
    await _ok(engine_process(command, ("dead-letters",)))
    await _ok(engine_process(command, ("status",)))
    engine.terminate()
    assert await engine.wait(30) == 0, engine.output()
    await _ok(engine_process(command, ("replay", "--from-beginning")), 90)
    notified = await kafka.read_all(topics.notifications)
    ids = sorted(record.json()["notification_id"] for record in notified)
    assert ids == sorted({nid(counted, 2026, 50), nid(late, 2026, 5)})
    assert ORG  # the counted mentor's organization has the default thresholds

    # reconcile --fix runs as the same role; prune replaces a trigger: the owner runs it.
    await _ok(engine_process(command, ("reconcile", "--year", "2026", "--fix")))
    refused = engine_process(command, ("prune", "--before-year", "2020"))
    assert await refused.wait(60) == 2, refused.output()
    assert refused.stderr().startswith("milestones: MILESTONES_DATABASE_URL: this role may not")
    assert "Traceback" not in refused.output()
    await _ok(engine_process(owner, ("prune", "--before-year", "2020")))


async def test_run_without_migrate_rights_and_a_pending_migration_says_to_run_migrate(
    engine_process: EngineLauncher, db: Db, roles: Roles
) -> None:
    owner = {"MILESTONES_DATABASE_URL": roles.owner_url, "MILESTONES_METRICS_PORT": "0"}
    await _ok(engine_process(owner, ("migrate",)))
    await _ok(engine_process(owner, ("grant", roles.app)))
    newest = await db.connection.fetchrow(
        "DELETE FROM schema_migrations WHERE version = (SELECT max(version) FROM schema_migrations)"
        " RETURNING version, name"
    )
    engine = engine_process({"MILESTONES_DATABASE_URL": roles.app_url})
    assert await engine.wait(30) == 2, engine.output()
    lines = [line for line in engine.stderr().splitlines() if line.startswith("milestones:")]
    assert len(lines) == 1, engine.output()
    assert "milestones migrate" in lines[0]
    assert "Traceback" not in engine.output()
    await db.connection.execute(
        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", newest["version"],
        newest["name"],
    )


async def test_a_missing_grant_pauses_the_engine_and_loses_nothing_until_it_is_granted(
    engine_process: EngineLauncher, kafka: KafkaHelper, topics: Topics, db: Db, roles: Roles
) -> None:
    owner = {"MILESTONES_DATABASE_URL": roles.owner_url, "MILESTONES_METRICS_PORT": "0"}
    await _ok(engine_process(owner, ("migrate",)))
    await _ok(engine_process(owner, ("grant", roles.app)))
    owner_connection = await asyncpg.connect(roles.owner_url)
    try:
        await owner_connection.execute(f"REVOKE UPDATE ON annual_summary FROM {roles.app}")
        engine = engine_process({"MILESTONES_DATABASE_URL": roles.app_url})
        mentor = new_id()
        await kafka.produce_json_many(topics.activity, [logged(mentor) for _ in range(5)])
        await engine.wait_for_output("permission denied", timeout_s=30)
        status, _ = await engine.get("/readyz")
        assert status == 503, "paused while the privilege is missing"
        assert await kafka.read_all(topics.dlq) == [], "no good message dead-lettered"
        await _ok(engine_process(owner, ("grant", roles.app)))
        counts = await eventually(db.counts, lambda c: c.get((mentor, 2026)) == 5, timeout_s=30)
        assert counts[(mentor, 2026)] == 5
        assert await kafka.read_all(topics.dlq) == []
    finally:
        await owner_connection.close()
