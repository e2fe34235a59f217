"""What an operator sees of a real ``milestones run``: /metrics, and the JSON log lines.

One engine run covers both (a start costs seconds): the publisher is kept from its lease by
the test holding the advisory lock, so a milestone waits as a pending row (the pending gauges
and the leader gauge show it), then the lock is released and the latencies are observed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from consumer.ops.logs import FIELDS
from consumer.ops.metrics import Metrics
from consumer.store.outbox_sql import PUBLISHER_LOCK_KEY
from tests.e2e.conftest import Db, eventually, nid, settle_notifications
from tests.support.engine import REPO_ROOT, EngineLauncher, EngineProcess
from tests.support.events import logged, new_id
from tests.support.kafka import KafkaHelper
from tests.support.topics import Topics

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DEPLOY = REPO_ROOT / "deploy"
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


def samples(text: str, name: str) -> dict[str, float]:
    """The samples of one series name: label text (``""`` when none) to value."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        match = re.fullmatch(rf"{re.escape(name)}(\{{.*\}})? (\S+)", line)
        if match:
            found[match.group(1) or ""] = float(match.group(2))
    return found


def total(text: str, name: str) -> float:
    return sum(samples(text, name).values())


def families(text: str) -> set[str]:
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


def referenced_metrics(paths: list[Path]) -> set[str]:
    """Every ``milestones_*`` family named in the dashboard and the alert rules."""
    names: set[str] = set()
    for path in paths:
        for name in re.findall(r"\bmilestones_[a-z0-9_]+", path.read_text()):
            for suffix in HISTOGRAM_SUFFIXES:
                if name.endswith(suffix) and name[: -len(suffix)].endswith("_seconds"):
                    name = name[: -len(suffix)]
            names.add(name)
    return names


def deploy_files() -> list[Path]:
    return sorted(DEPLOY.glob("grafana/dashboards/*.json")) + sorted(
        p for p in DEPLOY.glob("prometheus/*.yml") if "test" not in p.name
    )


async def scrape(engine: EngineProcess) -> str:
    return await engine.metrics()


async def test_metrics_and_json_logs_of_a_real_run(
    engine_process: EngineLauncher, kafka: KafkaHelper, topics: Topics, db: Db
) -> None:
    mentor = new_id()
    notification = nid(mentor, 2026, 50)
    assert await db.connection.fetchval("SELECT pg_try_advisory_lock($1)", PUBLISHER_LOCK_KEY)
    engine = engine_process({"MILESTONES_LOG_FORMAT": "json"})
    await engine.wait_ready()

    first = await scrape(engine)
    assert set(Metrics.names()) <= families(first), "every family is listed before its first sample"
    assert total(first, "milestones_publisher_leader") == 0
    dashboard_and_rules = deploy_files()
    assert len(dashboard_and_rules) >= 2, dashboard_and_rules
    missing = referenced_metrics(dashboard_and_rules) - families(first)
    assert not missing, f"the dashboard or the rules name metrics a scrape lacks: {missing}"

    sessions = [logged(mentor) for _ in range(50)]
    await kafka.produce_json_many(topics.activity, sessions)
    bad = await kafka.produce(topics.activity, b"{not json", key=mentor.encode())

    # Recorded, but nobody may publish: the pending gauges show it and its age grows.
    waiting = await eventually(
        lambda: scrape(engine),
        lambda text: total(text, "milestones_pending_notifications") == 1
        and total(text, "milestones_oldest_pending_age_seconds") > 0,
        timeout_s=30,
    )
    assert total(waiting, "milestones_publisher_leader") == 0
    assert total(waiting, "milestones_batch_duration_seconds_count") >= 1
    assert total(waiting, "milestones_counting_latency_seconds_count") >= 1
    assert total(waiting, "milestones_events_total") >= 50
    assert total(waiting, "milestones_dead_letters_total") == 1
    lag = samples(waiting, "milestones_consumer_lag")
    assert set(lag.values()) == {0.0}, lag
    assert total(waiting, "milestones_broker_contact_age_seconds") < 2.0
    assert total(waiting, "milestones_notification_latency_seconds_count") == 0

    await db.connection.execute("SELECT pg_advisory_unlock($1)", PUBLISHER_LOCK_KEY)
    await settle_notifications(kafka, topics.notifications, {notification})
    after = await eventually(
        lambda: scrape(engine),
        lambda text: total(text, "milestones_pending_notifications") == 0, timeout_s=30,
    )
    assert total(after, "milestones_publisher_leader") == 1
    assert total(after, "milestones_published_total") == 1
    assert total(after, "milestones_notification_latency_seconds_count") == 1
    waited_s = total(after, "milestones_notification_latency_seconds_sum")
    assert waited_s >= total(waiting, "milestones_oldest_pending_age_seconds"), "by the db clock"
    assert total(after, "milestones_publisher_round_duration_seconds_count") >= 1
    assert total(after, "milestones_oldest_pending_age_seconds") == 0
    assert await engine.stop() == 0

    lines = [json.loads(line) for line in engine.stderr().splitlines() if line.strip()]
    assert lines, engine.output()
    for line in lines:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["ts"]), line
    dead = next(line for line in lines if line["message"].startswith("dead letter"))
    assert (dead["topic"], dead["partition"], dead["offset"]) == (
        topics.activity, bad.partition, bad.offset)
    recorded = next(line for line in lines if "notification_id" in line)
    assert recorded["notification_id"] == notification
    assert recorded["mentor_id"] == mentor
    assert recorded["activity_id"] in {event["activity_id"] for event in sessions}
    assert set(recorded) <= {"ts", "level", "logger", "message", *FIELDS}
