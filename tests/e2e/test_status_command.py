"""``milestones status`` as a health check: the real command against the real broker and Postgres.

Its exit status says whether a limit the operator set is crossed (0 no, 1 yes, 2 a bad setting
or a database without the schema); it waits a bounded time for the broker, and it ends quietly
when its reader goes away (``| head``).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from typing import Any

import pytest

from tests.e2e.conftest import Db
from tests.integration.operations import settings_from, write_events
from tests.support import events
from tests.support.engine import assert_one_line, milestones
from tests.support.kafka import KafkaHelper
from tests.support.topics import Topics

pytestmark = pytest.mark.e2e

DAY_MS = 86_400_000


def status(env: dict[str, str], *args: str, **extra_env: str) -> tuple[int, str, str]:
    result = milestones("status", *args, env={**env, **extra_env})
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stdout, result.stderr


def status_json(env: dict[str, str], *args: str, **extra_env: str) -> tuple[int, dict[str, Any]]:
    code, out, err = status(env, "--json", *args, **extra_env)
    assert code in (0, 1), (code, out, err)
    return code, json.loads(out)


async def test_status_reports_counts_lag_dead_letters_and_exits_1_past_a_limit(
    engine_env: dict[str, str], kafka: KafkaHelper, topics: Topics, db: Db
) -> None:
    assert milestones("migrate", env=engine_env).returncode == 0
    settings = settings_from(engine_env, thresholds="2")
    year = int(time.strftime("%Y"))
    mentor = events.new_id()
    await write_events(settings, [
        events.logged(mentor, occurred_at=f"{year}-01-0{day}T10:00:00+01:00") for day in (2, 3, 4)
    ])  # 3 sessions, one pending notification (no publisher runs)
    await db.connection.execute("UPDATE engine_state SET closed_through_year = 2024")
    for partition in (0, 0, 1):
        await kafka.produce_json(topics.activity, events.logged(mentor), partition=partition)
    now_ms = int(time.time() * 1000)
    for age_ms in (0, 1_000, 2 * DAY_MS):
        await kafka.produce(topics.dlq, b"not json", key=b"k", timestamp_ms=now_ms - age_ms,
                            headers={"error": "invalid JSON", "source_topic": topics.activity,
                                     "source_partition": "0", "source_offset": "0"})
    env = {**engine_env, "MILESTONES_THRESHOLDS": "2"}

    code, report = status_json(env)

    assert code == 0, report
    assert report["counts"] == {"mentors": 1, "sessions": 3, "ledger_rows": 3,
                                "closed_through_year": 2024}
    assert report["notifications"]["pending"] == {"this_year": 1, "total": 1}
    assert report["oldest_pending"][0]["mentor_id"] == mentor
    assert report["consumer_lag"]["reachable"] is True
    assert report["consumer_lag"]["total"] == 3
    assert report["dead_letters_today"]["count"] == 2
    assert (report["ok"], report["crossed"]) == (True, [])

    code, report = status_json(env, "--max-lag", "2", "--max-dead-letters", "1")
    assert code == 1
    assert report["crossed"] == ["lag 3 > 2 (max lag)",
                                 "dead letters today 2 > 1 (max dead letters today)"]
    code, _ = status_json(env, "--max-lag", "3", "--max-dead-letters", "2",
                          "--max-pending-age", "3600")
    assert code == 0
    # The limits may come from the environment as well.
    code, report = status_json(env, MILESTONES_STATUS_MAX_PENDING_AGE_S="0")
    assert code == 1
    assert "max pending age" in report["crossed"][0]

    code, text, _ = status(env, "--max-lag", "0")
    assert code == 1
    assert "limit crossed: lag 3 > 0 (max lag)" in text
    closed = next(line for line in text.splitlines() if line.startswith("closed through year"))
    assert closed.split() == ["closed", "through", "year", "2024"]  # a year, not "2,024"
    assert next(line for line in text.splitlines()
                if line.startswith("dead letters today")).split()[-1] == "2"


@pytest.mark.parametrize("broker_state", ["stopped_broker", "silent_broker"])
async def test_a_broker_down_is_reported_within_the_bound_and_exits_1(
    engine_env: dict[str, str], broker_state: str, request: pytest.FixtureRequest
) -> None:
    assert milestones("migrate", env=engine_env).returncode == 0
    env = {**engine_env, "MILESTONES_KAFKA_BOOTSTRAP_SERVERS": request.getfixturevalue(broker_state)}

    started = time.monotonic()
    code, report = status_json(env, "--timeout", "2")
    took_s = time.monotonic() - started

    assert code == 1
    assert took_s < 2 + 8, f"status took {took_s:.1f} s with a 2 s bound"
    assert report["consumer_lag"]["reachable"] is False
    assert report["crossed"][0].startswith("broker unreachable")
    assert report["counts"]["sessions"] == 0  # the database part is still reported

    code, text, err = status(env, "--no-broker-required", MILESTONES_STATUS_TIMEOUT_S="1")
    assert code == 0, (text, err)
    assert "consumer lag: broker unreachable" in text


def test_a_database_without_the_schema_is_one_line_saying_to_migrate(
    engine_env: dict[str, str],
) -> None:
    assert_one_line(milestones("status", env=engine_env), "MILESTONES_DATABASE_URL",
                    "`milestones migrate`")
    assert_one_line(milestones("status", "--json", env=engine_env), "`milestones migrate`")


@pytest.mark.parametrize("args", [(), ("--json",)])
def test_a_reader_that_goes_away_ends_status_quietly(
    engine_env: dict[str, str], args: tuple[str, ...]
) -> None:
    assert milestones("migrate", env=engine_env).returncode == 0
    read_end, write_end = os.pipe()
    os.close(read_end)  # `| head` that has already exited: every write fails with EPIPE
    try:
        result = milestones("status", *args, env=engine_env, stdout=write_end,
                            stderr=subprocess.PIPE)
    finally:
        os.close(write_end)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr
