"""The real ``milestones run`` process against the real broker and Postgres.

Each test produces to its own topics and asserts on Postgres and on the output topics.
"""

from __future__ import annotations

import asyncio
import signal
import time
from uuid import uuid4

import asyncpg
import pytest

from tests.e2e.conftest import Db, eventually, nid, notification_ids, settle_notifications
from tests.faults.checks import metric
from tests.support.engine import EngineLauncher
from tests.support.events import ORG, OTHER_ORG, deleted, logged, new_id, preference
from tests.support.kafka import KafkaHelper, json_bytes
from tests.support.topics import Topics

pytestmark = pytest.mark.e2e


async def migrate(engine_process: EngineLauncher) -> None:
    process = engine_process(args=("migrate",))
    assert await process.wait(60) == 0, process.output()


async def sessions(kafka: KafkaHelper, topic: str, mentor: str, count: int, **fields: str) -> None:
    await kafka.produce_json_many(topic, [logged(mentor, **fields) for _ in range(count)])


async def test_task_card_cases_end_to_end(
    engine_process: EngineLauncher, kafka: KafkaHelper, topics: Topics, db: Db
) -> None:
    at_49, at_50, at_201, at_201_recorded, opted_out, other_year = (new_id() for _ in range(6))
    await migrate(engine_process)
    # 201 sessions with 50 and 100 already recorded; 50 sessions with a 2025 record for 50.
    for mentor, year, value in ((at_201_recorded, 2026, 50), (at_201_recorded, 2026, 100),
                                (other_year, 2025, 50)):
        await db.connection.execute(
            "INSERT INTO scenario_notifications (id, user_id, organization_id, year,"
            " milestone_value, session_count, status) VALUES ($1, $2, $3, $4, $5, $5, 'published')",
            nid(mentor, year, value), mentor, ORG, year, value,
        )
    await kafka.produce_json(topics.preferences, preference(opted_out, False))
    engine = engine_process()
    for mentor, count in ((at_49, 49), (at_50, 50), (at_201, 201), (at_201_recorded, 201),
                          (opted_out, 60), (other_year, 50)):
        await sessions(kafka, topics.activity, mentor, count)
    expected = {
        nid(at_50, 2026, 50),
        nid(at_201, 2026, 50), nid(at_201, 2026, 100), nid(at_201, 2026, 200),
        nid(at_201_recorded, 2026, 200),
        nid(other_year, 2026, 50),
    }
    records = await settle_notifications(kafka, topics.notifications, expected)
    ids = notification_ids(records)
    assert sorted(ids) == sorted(expected), "each expected notification exactly once, no other"
    counts = await db.counts()
    assert counts[(at_49, 2026)] == 49
    assert counts[(at_201, 2026)] == 201
    statuses = await eventually(db.statuses, lambda s: "pending" not in s.values())
    assert statuses[(opted_out, 2026, 50)] == "suppressed"
    assert (at_49, 2026, 50) not in statuses
    assert statuses[(at_201_recorded, 2026, 200)] == "published"
    # The event carries what the contract says, and the record agrees with it.
    message = next(r.json() for r in records if r.json()["notification_id"] == nid(at_50, 2026, 50))
    assert message["session_count"] == 50
    assert message["milestone_value"] == 50
    assert message["year"] == 2026
    assert message["scenario_type"] == "milestone"
    assert message["organization_id"] == ORG
    assert message["activity_id"] is not None
    row = next(r for r in await db.records() if str(r["id"]) == nid(at_50, 2026, 50))
    assert str(row["activity_id"]) == message["activity_id"]
    assert row["session_count"] == 50
    ascending = [r.json()["milestone_value"] for r in records if r.json()["mentor_id"] == at_201]
    assert ascending == [50, 100, 200]
    assert await engine.stop() == 0


async def test_duplicates_and_redelivered_activities_count_once(
    engine_process: EngineLauncher, kafka: KafkaHelper, topics: Topics, db: Db
) -> None:
    mentor = new_id()
    engine = engine_process()
    events = [logged(mentor) for _ in range(49)]
    same_event = logged(mentor)
    same_activity = dict(same_event, event_id=new_id())
    conflicting = dict(same_event, event_id=new_id(), occurred_at="2026-04-01T10:00:00+02:00")
    await kafka.produce_json_many(
        topics.activity, [*events, same_event, same_event, same_event, same_activity, conflicting]
    )
    await settle_notifications(kafka, topics.notifications, {nid(mentor, 2026, 50)})
    # Replaying the whole topic again changes nothing, and each re-delivery is counted as a
    # duplicate, in the batch of the first delivery or in a later one.
    await kafka.produce_json_many(topics.activity, [*events, same_event])

    def outcome(text: str, name: str) -> float:
        return metric(text, f'milestones_events_total{{outcome="{name}"}}')

    metrics = await eventually(engine.metrics, lambda text: outcome(text, "duplicate") >= 53)
    assert (await db.counts())[(mentor, 2026)] == 50
    records = await kafka.read_all(topics.notifications)
    assert notification_ids(records) == [nid(mentor, 2026, 50)]
    assert [outcome(metrics, name) for name in ("counted", "duplicate", "conflict")] == [50, 53, 1]
    assert metric(metrics, "milestones_events_total") == 104  # every message, one outcome each
    assert await engine.stop() == 0


def _rejections(mentor: str, record_ms: int) -> list[tuple[str, bytes | None, bytes | None]]:
    """(label, key, value) of every rejection kind of the contract, on the activity topic."""
    good = logged(mentor)
    key = mentor.encode()

    def variant(**changes: object) -> bytes:
        return json_bytes({**good, **changes})

    missing = dict(good)
    del missing["activity_id"]
    far_future = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(record_ms / 1000 + 25 * 3600))
    return [
        ("null value", key, None),
        ("empty value", key, b""),
        ("invalid json", key, b"{not json"),
        ("invalid utf-8", key, b'{"event_type": "\xff\xfe"}'),
        ("missing field", key, json_bytes(missing)),
        ("ill-typed field", key, variant(schema_version="1")),
        ("non-uuid id", key, variant(activity_id="not-a-uuid")),
        ("naive timestamp", key, variant(occurred_at="2026-03-14T10:00:00")),
        ("nul character", key, variant(activity_type="ses\u0000sion")),
        ("too long type", key, variant(activity_type="x" * 101)),
        ("empty type", key, variant(activity_type="")),
        ("unknown event type", key, variant(event_type="activity.renamed")),
        ("unknown schema version", key, variant(schema_version=2)),
        ("wrong topic", key, json_bytes(preference(mentor, False))),
        ("over 64 KiB", key, variant(padding="x" * 70_000)),
        ("future occurred_at", key, variant(occurred_at=far_future)),
    ]


async def test_every_rejection_goes_to_the_dead_letter_topic_and_the_service_keeps_going(
    engine_process: EngineLauncher, kafka: KafkaHelper, topics: Topics, db: Db,
    database_url: str,
) -> None:
    mentor = new_id()
    await migrate(engine_process)
    # A value the database refuses for its content (a constraint this test adds).
    await db.connection.execute(
        "ALTER TABLE activity_ledger ADD CONSTRAINT e2e_refuse CHECK (activity_type <> 'refuse-me')"
    )
    engine = engine_process()
    now_ms = int(time.time() * 1000)
    bad = _rejections(mentor, now_ms)
    sent = {}
    for label, key, value in bad:
        produced = await kafka.produce(topics.activity, value, key, timestamp_ms=now_ms)
        sent[(topics.activity, produced.partition, produced.offset)] = (label, key, value)
    refused = logged(mentor, activity_type="refuse-me")
    produced = await kafka.produce_json(topics.activity, refused)
    sent[(topics.activity, produced.partition, produced.offset)] = (
        "refused by database", mentor.encode(), json_bytes(refused))
    future_pref = preference(mentor, False, changed_at="2099-01-01T00:00:00+00:00")
    produced = await kafka.produce_json(topics.preferences, future_pref)
    sent[(topics.preferences, produced.partition, produced.offset)] = (
        "future changed_at", mentor.encode(), json_bytes(future_pref))
    await sessions(kafka, topics.activity, mentor, 50)
    await settle_notifications(kafka, topics.notifications, {nid(mentor, 2026, 50)})
    letters = await kafka.wait_for(topics.dlq, lambda rs: len(rs) >= len(sent))
    assert len(letters) == len(sent)
    for letter in letters:
        source = (letter.header("source_topic"), int(letter.header("source_partition") or -1),
                  int(letter.header("source_offset") or -1))
        label, key, value = sent.pop(source)
        assert letter.key == key, label
        assert letter.value == value, label  # byte for byte; a null stays null
        error = letter.header("error") or ""
        assert error, label
        assert "\n" not in error, label
    assert not sent
    assert (await db.counts())[(mentor, 2026)] == 50  # the refused session is not counted
    assert await engine.stop() == 0


async def test_session_at_new_year_in_oslo_counts_for_next_year(
    engine_process: EngineLauncher, kafka: KafkaHelper, topics: Topics, db: Db
) -> None:
    mentor = new_id()
    engine = engine_process()
    await kafka.produce_json(topics.activity, logged(mentor, occurred_at="2025-12-31T23:30:00Z"))
    await kafka.produce_json(topics.activity, logged(mentor, occurred_at="2025-12-31T22:30:00Z"))
    counts = await eventually(db.counts, lambda c: len(c) == 2)
    assert counts == {(mentor, 2026): 1, (mentor, 2025): 1}
    assert await engine.stop() == 0


async def test_deletions_remove_sessions_and_a_delete_before_its_log_wins(
    engine_process: EngineLauncher, kafka: KafkaHelper, topics: Topics, db: Db
) -> None:
    mentor = new_id()
    engine = engine_process()
    early = new_id()
    # The delete arrives first (and carries another mentor id): the late log must not count.
    await kafka.produce_json(topics.activity, deleted(new_id(), early))
    await kafka.produce_json(topics.activity, logged(mentor, activity_id=early))
    kept = [logged(mentor) for _ in range(50)]
    await kafka.produce_json_many(topics.activity, kept)
    await settle_notifications(kafka, topics.notifications, {nid(mentor, 2026, 50)})
    assert (await db.counts())[(mentor, 2026)] == 50
    # Deleting after the milestone lowers the count; the record stays and nothing re-fires.
    await kafka.produce_json(topics.activity, deleted(mentor, kept[0]["activity_id"]))
    await kafka.produce_json(topics.activity, deleted(mentor, kept[0]["activity_id"]))
    await eventually(db.counts, lambda c: c[(mentor, 2026)] == 49)
    await kafka.produce_json(topics.activity, logged(mentor))
    await eventually(db.counts, lambda c: c[(mentor, 2026)] == 50)
    await asyncio.sleep(1.5)
    assert notification_ids(await kafka.read_all(topics.notifications)) == [nid(mentor, 2026, 50)]
    assert await engine.stop() == 0


async def test_organization_thresholds_and_the_latest_counted_session_decide(
    engine_process: EngineLauncher, kafka: KafkaHelper, topics: Topics, db: Db
) -> None:
    own, silent = new_id(), new_id()
    await migrate(engine_process)
    await db.connection.execute(
        "INSERT INTO milestone_thresholds VALUES ($1, '{3, 3, 2}'), ($2, '{}')", ORG, OTHER_ORG
    )
    engine = engine_process()
    await sessions(kafka, topics.activity, own, 3)
    await sessions(kafka, topics.activity, silent, 60, organization_id=OTHER_ORG)
    records = await settle_notifications(
        kafka, topics.notifications, {nid(own, 2026, 2), nid(own, 2026, 3)}
    )
    assert sorted(notification_ids(records)) == sorted({nid(own, 2026, 2), nid(own, 2026, 3)})
    assert all(r.json()["organization_id"] == ORG for r in records)
    assert (await db.counts())[(silent, 2026)] == 60  # counted, but no milestones for its org
    # The mentor moves to the organization with no milestones: the summary follows.
    await kafka.produce_json(topics.activity, logged(own, organization_id=OTHER_ORG))
    row = await eventually(
        lambda: db.connection.fetchrow("SELECT * FROM annual_summary WHERE user_id = $1", own),
        lambda r: r["session_count"] == 4,
    )
    assert str(row["organization_id"]) == OTHER_ORG
    assert await engine.stop() == 0


async def test_a_past_year_is_suppressed_after_the_grace_period(
    engine_process: EngineLauncher, kafka: KafkaHelper, topics: Topics, db: Db
) -> None:
    late, graced = new_id(), new_id()
    engine = engine_process({"MILESTONES_THRESHOLDS": "2"})
    await sessions(kafka, topics.activity, late, 2, occurred_at="2025-06-01T10:00:00+02:00")
    statuses = await eventually(db.statuses, lambda s: len(s) == 1)
    assert statuses == {(late, 2025, 2): "suppressed"}
    assert await engine.stop() == 0
    # With a grace longer than the time since the new year, the same kind of crossing is sent.
    engine = engine_process({"MILESTONES_THRESHOLDS": "2", "MILESTONES_NOTIFY_GRACE_DAYS": "3650"})
    await sessions(kafka, topics.activity, graced, 2, occurred_at="2025-06-01T10:00:00+02:00")
    records = await settle_notifications(kafka, topics.notifications, {nid(graced, 2025, 2)})
    assert notification_ids(records) == [nid(graced, 2025, 2)]
    assert await engine.stop() == 0


async def test_opt_out_suppresses_and_the_publisher_checks_again(
    engine_process: EngineLauncher, kafka: KafkaHelper, topics: Topics, db: Db, database_url: str
) -> None:
    out_first, tie, later = new_id(), new_id(), new_id()
    await migrate(engine_process)
    # A pending row of a mentor who opts out before it is sent becomes suppressed.
    await db.connection.execute(
        "INSERT INTO scenario_notifications (id, user_id, organization_id, year, milestone_value,"
        " session_count) VALUES ($1, $2, $3, 2026, 50, 50)", nid(later, 2026, 50), later, ORG)
    await db.connection.execute(
        "INSERT INTO mentor_preferences VALUES ($1, false, '2026-01-01T00:00:00Z')", later)
    await kafka.produce_json(topics.preferences, preference(out_first, False))
    # On a tie of changed_at, opted out wins, whatever the order.
    await kafka.produce_json(topics.preferences, preference(tie, False, "2026-02-01T00:00:00Z"))
    await kafka.produce_json(topics.preferences, preference(tie, True, "2026-02-01T00:00:00Z"))
    engine = engine_process({"MILESTONES_THRESHOLDS": "3"})
    await sessions(kafka, topics.activity, out_first, 3)
    await sessions(kafka, topics.activity, tie, 3)
    statuses = await eventually(db.statuses, lambda s: len(s) == 3 and "pending" not in s.values())
    assert statuses == {
        (out_first, 2026, 3): "suppressed", (tie, 2026, 3): "suppressed",
        (later, 2026, 50): "suppressed",
    }
    await asyncio.sleep(1)
    assert await kafka.read_all(topics.notifications) == []
    assert await engine.stop() == 0


async def test_counted_types_key_mismatch_and_sigterm_exit_zero(
    engine_process: EngineLauncher, kafka: KafkaHelper, topics: Topics, db: Db
) -> None:
    mentor = new_id()
    engine = engine_process({"MILESTONES_COUNTED_ACTIVITY_TYPES": " session , group session "})
    await kafka.produce_json(topics.activity, logged(mentor, activity_type="group session"))
    await kafka.produce_json(topics.activity, logged(mentor, activity_type="Session"))
    await kafka.produce_json(topics.activity, logged(mentor), key=b"some-other-key")
    await eventually(db.counts, lambda c: c.get((mentor, 2026)) == 2)
    await engine.wait_ready()
    assert "milestones_key_mismatch_total 1" in await engine.metrics()
    status, _ = await engine.get("/healthz")
    assert status == 200
    engine.send_signal(signal.SIGTERM)
    assert await engine.wait(30) == 0


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("MILESTONES_TIMEZONE", "Mars/Olympus_Mons"),
        ("MILESTONES_THRESHOLDS", "fifty"),
        ("MILESTONES_NOTIFY_GRACE_DAYS", "-1"),
        ("MILESTONES_DATABASE_URL", "postgresql://postgres@127.0.0.1:1/nowhere"),
    ],
)
async def test_a_bad_setting_stops_with_one_line_naming_it(
    engine_process: EngineLauncher, variable: str, value: str
) -> None:
    process = engine_process({variable: value, "MILESTONES_DATABASE_CONNECT_TIMEOUT_S": "1"})
    assert await process.wait(30) == 2
    lines = process.stderr().strip().splitlines()
    assert len(lines) == 1, process.stderr()
    assert variable in lines[0]
    assert "Traceback" not in process.stderr()


async def test_run_without_permission_to_migrate_says_to_run_migrate(
    engine_process: EngineLauncher, database_url: str
) -> None:
    role = f"reader_{uuid4().hex[:8]}"
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f"CREATE ROLE {role} LOGIN")
        await admin.execute(f"REVOKE CREATE ON SCHEMA public FROM PUBLIC, {role}")
        url = database_url.replace("postgres@", f"{role}@", 1)
        process = engine_process({"MILESTONES_DATABASE_URL": url})
        assert await process.wait(30) == 2
        assert "milestones migrate" in process.stderr()
    finally:
        await admin.execute(f"DROP OWNED BY {role}")
        await admin.execute(f"DROP ROLE {role}")
        await admin.close()


async def test_migrate_twice_concurrently_is_safe(
    engine_process: EngineLauncher, db: Db
) -> None:
    first, second = engine_process(args=("migrate",)), engine_process(args=("migrate",))
    assert await first.wait(60) == 0
    assert await second.wait(60) == 0
    versions = await db.connection.fetch("SELECT version FROM schema_migrations")
    assert len(versions) >= 1
    again = engine_process(args=("migrate",))
    assert await again.wait(60) == 0
    assert "applied 0 migration" in again.stdout()

