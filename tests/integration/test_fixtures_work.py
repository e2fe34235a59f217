"""The test fixtures themselves: the broker, the per-test database and topics, the Kafka helper
and the engine-process plumbing, independently of the engine's code."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import asyncpg
import pytest

from devstack.processes import free_port, wait_for_port
from tests.support import events
from tests.support.engine import EngineLauncher, http_get
from tests.support.kafka import KafkaHelper
from tests.support.postgres import create_database, database_exists, drop_database
from tests.support.topics import Topics


async def test_produced_records_are_read_back_from_every_partition(
    kafka: KafkaHelper, topics: Topics
) -> None:
    sent = [
        await kafka.produce(topics.activity, f"v{index}".encode(), key=f"k{index}".encode())
        for index in range(20)
    ]
    await kafka.produce(topics.activity, None, key=b"tombstone", headers={"error": "null"})

    records = await kafka.read_all(topics.activity)

    assert len(records) == 21
    assert {record.partition for record in records} >= {produced.partition for produced in sent}
    by_value = {record.value: record for record in records}
    assert by_value[b"v7"].key == b"k7"
    null = next(record for record in records if record.key == b"tombstone")
    assert null.value is None
    assert null.header("error") == "null"
    assert all(record.timestamp_ms > 0 for record in records)
    assert records == sorted(records, key=lambda record: (record.partition, record.offset))


async def test_read_all_returns_everything_again_and_what_came_since(
    kafka: KafkaHelper, topics: Topics
) -> None:
    await kafka.produce(topics.dlq, b"first", partition=0, timestamp_ms=1_700_000_000_000)
    first = await kafka.read_all(topics.dlq)
    await kafka.produce(topics.dlq, b"second", partition=0)

    second = await kafka.read_all(topics.dlq)

    assert [record.value for record in first] == [b"first"]
    assert first[0].timestamp_ms == 1_700_000_000_000
    assert [(record.offset, record.value) for record in second] == [(0, b"first"), (1, b"second")]


async def test_an_empty_topic_reads_as_empty(kafka: KafkaHelper, topics: Topics) -> None:
    assert await kafka.read_all(topics.notifications, timeout_s=5) == []


async def test_json_events_are_keyed_by_mentor(kafka: KafkaHelper, topics: Topics) -> None:
    mentor = events.new_id()
    logged = events.logged(mentor)
    await kafka.produce_json(topics.activity, logged)
    await kafka.produce_json_many(
        topics.preferences, [events.preference(mentor, enabled=False) for _ in range(3)]
    )

    activity = await kafka.read_all(topics.activity)
    preferences = await kafka.wait_for_count(topics.preferences, 3, timeout_s=5)

    assert activity[0].key == mentor.encode()
    assert activity[0].json() == logged
    assert {record.partition for record in preferences} == {preferences[0].partition}


async def test_wait_for_sees_a_record_produced_later(kafka: KafkaHelper, topics: Topics) -> None:
    async def later() -> None:
        await asyncio.sleep(0.3)
        await kafka.produce(topics.notifications, b"late")

    task = asyncio.create_task(later())
    records = await kafka.wait_for(
        topics.notifications, lambda rs: any(r.value == b"late" for r in rs), timeout_s=10
    )
    await task
    assert [record.value for record in records] == [b"late"]


async def test_wait_for_fails_with_the_topic_contents(kafka: KafkaHelper, topics: Topics) -> None:
    await kafka.produce(topics.dlq, b"only")
    with pytest.raises(AssertionError, match="1 records"):
        await kafka.wait_for(topics.dlq, lambda records: len(records) > 1, timeout_s=0.5)


@pytest.mark.parametrize("topics", [{"activity": 3, "dlq": 2}], indirect=True)
async def test_partition_counts_can_be_chosen(kafka: KafkaHelper, topics: Topics) -> None:
    for partition in range(3):
        await kafka.produce(topics.activity, b"x", partition=partition)
    await kafka.produce(topics.dlq, b"y", partition=1)

    assert {r.partition for r in await kafka.read_all(topics.activity)} == {0, 1, 2}
    assert [r.partition for r in await kafka.read_all(topics.dlq)] == [1]


def test_topics_are_unique_and_named_for_the_engine(topics: Topics) -> None:
    other = Topics.unique()
    assert set(topics.names).isdisjoint(other.names)
    assert topics.env()["MILESTONES_DLQ_TOPIC"] == topics.dlq
    assert topics.dlq.endswith(".dlq")


_DATABASES_SEEN: list[str] = []


async def test_database_is_fresh_and_writable(database_url: str) -> None:
    connection = await asyncpg.connect(database_url)
    try:
        name = await connection.fetchval("SELECT current_database()")
        tables = await connection.fetchval(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        )
        await connection.execute("CREATE TABLE t (id int primary key)")
    finally:
        await connection.close()
    assert name.startswith("ms_test_")
    assert tables == 0
    _DATABASES_SEEN.append(name)


async def test_the_database_of_an_earlier_test_is_dropped(postgres_admin_dsn: str) -> None:
    if not _DATABASES_SEEN:
        pytest.skip("runs after test_database_is_fresh_and_writable")
    assert not await database_exists(postgres_admin_dsn, _DATABASES_SEEN[-1])


async def test_database_is_dropped_even_with_open_connections(postgres_admin_dsn: str) -> None:
    name, dsn = await create_database(postgres_admin_dsn)
    lingering = await asyncpg.connect(dsn)
    assert await database_exists(postgres_admin_dsn, name)

    await drop_database(postgres_admin_dsn, name)

    assert not await database_exists(postgres_admin_dsn, name)
    assert lingering.is_closed() or not await _alive(lingering)
    await lingering.close()


async def _alive(connection: asyncpg.Connection) -> bool:
    try:
        await connection.fetchval("SELECT 1")
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
        return False
    return True


def test_engine_env_points_at_this_tests_resources(
    engine_env: dict[str, str], broker: str, database_url: str, topics: Topics
) -> None:
    assert engine_env["MILESTONES_KAFKA_BOOTSTRAP_SERVERS"] == broker
    assert engine_env["MILESTONES_DATABASE_URL"] == database_url
    assert engine_env["MILESTONES_ACTIVITY_TOPIC"] == topics.activity
    assert engine_env["MILESTONES_KAFKA_SESSION_TIMEOUT_MS"] == "2000"
    assert int(engine_env["MILESTONES_METRICS_PORT"]) > 0
    assert engine_env["MILESTONES_GROUP_ID"].startswith("ms-test-")


def test_events_match_the_contract() -> None:
    mentor = "7f8e1a52-0d8c-4f3e-9b1a-2c3d4e5f6a7b"
    logged = events.logged(mentor, activity_id="aaaaaaaa-0000-4000-8000-000000000000")
    assert list(logged) == [
        "event_type", "schema_version", "event_id", "activity_id", "mentor_id",
        "organization_id", "occurred_at", "activity_type",
    ]  # fmt: skip
    assert logged["occurred_at"] == "2026-03-14T10:00:00+01:00"
    removed = events.deleted(mentor, logged["activity_id"])
    assert removed["event_type"] == "activity.deleted"
    assert "deleted_at" in removed
    opted_out = events.preference(mentor, enabled=False)
    assert opted_out["milestone_notifications"] is False
    assert json.loads(json.dumps(opted_out)) == opted_out
    assert events.notification_id(mentor.upper(), 2026, 50) == events.notification_id(mentor, 2026, 50)


# --------------------------------------------------------------- the engine-process plumbing
# A stand-in program plays the engine: the plumbing must work before the engine does.

_FAKE_ENGINE = """
import http.server, os, signal, sys
port = int(os.environ["MILESTONES_METRICS_PORT"])
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"ok" if self.path == "/readyz" else b"metrics_total 1"
        self.send_response(200); self.send_header("Content-Length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
    def log_message(self, *args): pass
server = http.server.HTTPServer(("127.0.0.1", port), Handler)
signal.signal(signal.SIGTERM, lambda *_: (print("stopping", flush=True), os._exit(0)))
print("args", sys.argv[1:], os.environ["MILESTONES_GROUP_ID"], flush=True)
print("to stderr", file=sys.stderr, flush=True)
server.serve_forever()
"""


async def test_engine_process_plumbing_with_a_stand_in(
    engine_process: EngineLauncher, engine_env: dict[str, str], tmp_path: Path
) -> None:
    script = tmp_path / "fake_engine.py"
    script.write_text(_FAKE_ENGINE)
    first = engine_process(args=("run", "--flag"), command=[sys.executable, str(script)])
    second = engine_process({"MILESTONES_GROUP_ID": "other"}, command=[sys.executable, str(script)])

    await first.wait_ready(timeout_s=10)
    await second.wait_ready(timeout_s=10)
    assert first.metrics_port == int(engine_env["MILESTONES_METRICS_PORT"])
    assert second.metrics_port != first.metrics_port
    assert (await first.get("/metrics"))[1] == "metrics_total 1"
    await first.wait_for_output("args ['run', '--flag']")
    assert await first.stop(timeout_s=5) == 0
    assert "stopping" in first.stdout()
    assert "to stderr" in first.stderr()
    assert engine_env["MILESTONES_GROUP_ID"] in first.output()
    assert "other" in await second.wait_for_output("other")
    # The second one is left running: the fixture's teardown kills it.
    assert second.running()


async def test_wait_ready_reports_an_early_exit(engine_process: EngineLauncher, tmp_path: Path) -> None:
    script = tmp_path / "crash.py"
    script.write_text("import sys; print('MILESTONES_TIMEZONE: bad', file=sys.stderr); sys.exit(2)")
    process = engine_process(command=[sys.executable, str(script)])
    with pytest.raises(AssertionError, match="MILESTONES_TIMEZONE"):
        await process.wait_ready(timeout_s=10)
    assert await process.wait(5) == 2


def test_free_port_and_wait_for_port() -> None:
    with pytest.raises(TimeoutError):
        wait_for_port("127.0.0.1", free_port(), timeout_s=0.2)


async def test_http_get_against_nothing_is_an_os_error() -> None:
    with pytest.raises(OSError):  # noqa: PT011 - any connection failure will do
        await http_get("127.0.0.1", free_port(), "/readyz", timeout_s=1)
