"""The least-privilege SQL: what ``milestones grant`` applies is what the README shows."""

from __future__ import annotations

from pathlib import Path

from consumer.store.grants import RUNTIME_PRIVILEGES, grant_statements

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_shows_exactly_the_statements_grant_applies() -> None:
    readme = README.read_text("utf-8")
    for statement in grant_statements("milestones_app"):
        assert statement + ";" in readme, statement


def test_the_engine_role_never_gets_truncate_references_trigger_or_schema_create() -> None:
    statements = grant_statements('odd"name')
    granted = " ".join(s for s in statements if s.startswith("GRANT"))
    for privilege in ("TRUNCATE", "REFERENCES", "TRIGGER", "ALL", "CREATE"):
        assert privilege not in granted
    assert all('"odd""name"' in s for s in statements)  # the role name is quoted
    assert statements[0].startswith("REVOKE ALL ON ALL TABLES")  # narrows on every run
    assert "DELETE" not in str(RUNTIME_PRIVILEGES["scenario_notifications"])
    assert "DELETE" not in str(RUNTIME_PRIVILEGES["activity_ledger"])


def test_every_table_a_migration_creates_is_granted_or_knowingly_left_out() -> None:
    """A new table needs a decision here, or the engine's role meets "permission denied"."""
    import re

    from consumer.store.grants import NOT_GRANTED
    from consumer.store.migrate import available_migrations

    created = {
        name.lower()
        for migration in available_migrations()
        for name in re.findall(r"CREATE TABLE (?:IF NOT EXISTS )?(\w+)", migration.sql, re.I)
    } | {"schema_migrations"}
    assert created - set(RUNTIME_PRIVILEGES) - NOT_GRANTED == set()
    assert set(RUNTIME_PRIVILEGES) <= created
