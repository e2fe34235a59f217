"""``milestone_thresholds`` changes against the real Postgres: newer wins, history is kept."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import uuid4

import asyncpg

from consumer.domain.thresholds import ThresholdsChange
from consumer.store.thresholds_sql import apply_change, apply_changes, history, list_thresholds

T0 = datetime(2026, 3, 1, tzinfo=UTC)


async def test_only_a_newer_change_is_applied_and_each_one_is_kept_with_its_previous_value(
    db: asyncpg.Connection,
) -> None:
    org = uuid4()
    first = await apply_change(db, ThresholdsChange(org, (10, 25), T0), "command")
    assert (first.applied, first.previous) == (True, None)
    older = await apply_change(db, ThresholdsChange(org, (99,), T0 - timedelta(days=1)), "topic")
    assert (older.applied, older.previous, older.known_changed_at) == (False, (10, 25), T0)
    same = await apply_change(db, ThresholdsChange(org, (10, 25), T0), "topic")
    assert not same.applied  # a restore of what is known changes nothing
    later = T0 + timedelta(hours=1)
    assert await apply_changes(db, [ThresholdsChange(org, None, later)], "topic") == 1
    assert await list_thresholds(db) == []
    # Unset, then an older set from the topic: the removal is newer and stays.
    assert not (await apply_change(db, ThresholdsChange(org, (5,), T0), "topic")).applied
    rows = await history(db, org)
    assert [(r["thresholds"], r["previous"], r["source"]) for r in rows] == [
        ([10, 25], None, "command"), (None, [10, 25], "topic")]
