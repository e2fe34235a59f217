"""The publisher's pick (step 3) and the read-back's settling (step 2), as SQL on the real
database: what each does with a row in each state, without a broker."""

from __future__ import annotations

import asyncpg

from consumer.store.outbox_sql import SELECT_PENDING, SETTLE_FOUND
from tests.integration.operations import uuid
from tests.support import events

TOPIC = "milestone-notifications"


async def _record(db: asyncpg.Connection, status: str = "pending") -> str:
    mentor = uuid(events.new_id())
    nid = uuid(events.notification_id(str(mentor), 2026, 50))
    await db.execute(
        "INSERT INTO scenario_notifications (id, user_id, organization_id, year, milestone_value,"
        " session_count, status) VALUES ($1, $2, $3, 2026, 50, 50, $4)",
        nid, mentor, uuid(events.ORG), status)
    return str(nid)


async def _rows(db: asyncpg.Connection) -> dict[str, tuple[str, bool, int | None]]:
    return {str(r["id"]): (r["status"], r["awaiting_resend"], r["published_offset"])
            for r in await db.fetch("SELECT id, status, awaiting_resend, published_offset"
                                    " FROM scenario_notifications")}


async def test_setting_a_row_back_to_pending_marks_it_awaiting_a_resend(
    db: asyncpg.Connection,
) -> None:
    nid = await _record(db)
    await db.execute("UPDATE scenario_notifications SET status = 'published',"
                     " published_partition = 0, published_offset = 7 WHERE id = $1", nid)
    assert (await _rows(db))[nid] == ("published", False, 7)
    await db.execute("UPDATE scenario_notifications SET status = 'pending' WHERE id = $1", nid)
    assert (await _rows(db))[nid] == ("pending", True, None)


async def test_the_read_back_settles_pending_rows_but_not_one_awaiting_a_resend(
    db: asyncpg.Connection,
) -> None:
    fresh, repended, unknown = await _record(db), await _record(db), uuid(events.new_id())
    await db.execute("UPDATE scenario_notifications SET status = 'published' WHERE id = $1",
                     repended)
    await db.execute("UPDATE scenario_notifications SET status = 'pending' WHERE id = $1",
                     repended)
    found = [fresh, repended, str(unknown)]
    row = await db.fetchrow(SETTLE_FOUND, found, [0, 0, 1], [3, 4, 5], TOPIC)
    assert (row["marked"], row["unrecorded"]) == (1, 1)
    assert await _rows(db) == {fresh: ("published", False, 3), repended: ("pending", True, None)}
    assert await db.fetchval("SELECT notification_id FROM publisher_unrecorded") == unknown


async def test_the_pick_settles_seen_rows_suppresses_opted_out_ones_and_clears_the_resend_mark(
    db: asyncpg.Connection,
) -> None:
    plain, seen, opted_out, seen_and_opted_out, repended = [await _record(db) for _ in range(5)]
    for nid, offset in ((seen, 11), (seen_and_opted_out, 12)):
        await db.execute("INSERT INTO publisher_unrecorded VALUES ($1, $2, 0, $3)",
                         nid, TOPIC, offset)
    for nid in (opted_out, seen_and_opted_out):
        await db.execute("INSERT INTO mentor_preferences SELECT user_id, false, now()"
                         " FROM scenario_notifications WHERE id = $1", nid)
    await db.execute("UPDATE scenario_notifications SET status = 'published' WHERE id = $1",
                     repended)
    await db.execute("UPDATE scenario_notifications SET status = 'pending' WHERE id = $1",
                     repended)

    picked = await db.fetch(SELECT_PENDING, 100, TOPIC)
    assert (picked[0]["suppressed"], picked[0]["seen"]) == (1, 2)
    assert {str(row["id"]) for row in picked} == {plain, repended}
    assert await _rows(db) == {
        plain: ("pending", False, None),
        seen: ("published", False, 11),
        opted_out: ("suppressed", False, None),
        seen_and_opted_out: ("published", False, 12),  # it was emitted: published, as it is
        repended: ("pending", False, None),  # picked: a copy found from now on is this send's
    }
    assert await db.fetchval("SELECT count(*) FROM publisher_unrecorded") == 0


async def test_a_pick_with_nothing_to_send_still_answers_its_counts(
    db: asyncpg.Connection,
) -> None:
    nid = await _record(db)
    await db.execute("INSERT INTO mentor_preferences SELECT user_id, false, now()"
                     " FROM scenario_notifications WHERE id = $1", nid)
    picked = await db.fetch(SELECT_PENDING, 100, TOPIC)
    assert len(picked) == 1
    assert (picked[0]["suppressed"], picked[0]["seen"], picked[0]["id"]) == (1, 0, None)
