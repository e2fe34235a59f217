"""An operator's first day: the real ``milestones`` commands given what a new operator gives
them (a database never migrated, a year typed wrong, a broker that is down or frozen, a reader
that goes away) end with one line and the documented exit status, never a traceback or a hang.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import asyncpg
import pytest

from consumer.stream.kafka import BROKER_START_TIMEOUT_S
from tests.e2e.conftest import Db, eventually
from tests.support import events
from tests.support.engine import assert_one_line, milestones
from tests.support.kafka import KafkaHelper
from tests.support.topics import Topics

pytestmark = pytest.mark.e2e

MENTOR = "11111111-1111-4111-8111-111111111111"


def in_parallel(*runs: tuple[tuple[str, ...], dict[str, str]]) -> list[subprocess.CompletedProcess[str]]:
    """Each ``(args, env)`` as its own ``milestones`` process, all at once (they only wait)."""
    with ThreadPoolExecutor(len(runs)) as pool:
        return list(pool.map(lambda run: milestones(*run[0], env=run[1]), runs))


async def test_reading_commands_and_dry_runs_on_a_database_never_migrated_say_to_migrate(
    database_url: str,
) -> None:
    env = {"MILESTONES_DATABASE_URL": database_url, "MILESTONES_METRICS_PORT": "0"}
    results = in_parallel(
        (("mentor", MENTOR), env),
        (("mentor", MENTOR, "--json"), env),
        (("sweep", "--dry-run"), env),
        (("prune", "--before-year", "2020", "--dry-run"), env),
        (("thresholds", "list"), env),
        (("reconcile",), env),
    )
    for result in results:
        assert_one_line(result, "MILESTONES_DATABASE_URL", "`milestones migrate`")
    connection = await asyncpg.connect(database_url)
    try:  # a dry run changes nothing, not even the schema
        assert await connection.fetchval("SELECT to_regclass('schema_migrations')") is None
    finally:
        await connection.close()


def test_a_year_outside_the_counted_range_is_one_line(database_url: str) -> None:
    env = {"MILESTONES_DATABASE_URL": database_url, "MILESTONES_METRICS_PORT": "0"}
    assert milestones("migrate", env=env).returncode == 0
    results = in_parallel(
        (("mentor", MENTOR, "--year", "0"), env),
        (("mentor", MENTOR, "--year", "99999"), env),
        (("sweep", "--year", "1800", "--dry-run"), env),
        (("reconcile", "--year", "3000"), env),
        (("prune", "--before-year", "-5", "--dry-run"), env),
    )
    for result in results:
        assert_one_line(result, "is outside 1900 to 2200", "--help")


@pytest.mark.slow
def test_a_broker_stopped_or_frozen_at_start_is_one_line_within_its_bound(
    silent_broker: str, stopped_broker: str
) -> None:
    started = time.monotonic()
    results = in_parallel(
        (("dead-letters",), {"MILESTONES_KAFKA_BOOTSTRAP_SERVERS": silent_broker}),
        (("dead-letters",), {"MILESTONES_KAFKA_BOOTSTRAP_SERVERS": stopped_broker}),
    )
    took_s = time.monotonic() - started
    frozen, stopped = results
    # aiokafka's own wait on a frozen broker is its 40 s request timeout: bounded by ours.
    assert took_s < BROKER_START_TIMEOUT_S + 8, f"took {took_s:.1f} s"
    assert_one_line(frozen, "MILESTONES_KAFKA_BOOTSTRAP_SERVERS", "unreachable", "no answer")
    # Each refused attempt was an aiokafka ERROR line before the one that says it all.
    assert_one_line(stopped, "MILESTONES_KAFKA_BOOTSTRAP_SERVERS", "unreachable")


@pytest.mark.parametrize("servers", ["broker:notaport", "broker:9092,broker2:0", ":9092"])
def test_unusable_bootstrap_servers_are_one_line(servers: str) -> None:
    line = assert_one_line(milestones("dead-letters", "--bootstrap-servers", servers),
                           "MILESTONES_KAFKA_BOOTSTRAP_SERVERS", "host:9092")
    assert servers.split(",")[-1] in line


@pytest.mark.parametrize("args", [("--seconds", "-1"), ("--seconds", "0"),
                                  ("--step-seconds", "nan")])
def test_the_demo_refuses_a_duration_that_is_not_above_0(args: tuple[str, str]) -> None:
    assert_one_line(milestones("demo", *args), args[0], "above 0")


def test_an_empty_thresholds_argument_is_refused_not_taken_for_none() -> None:
    org = events.new_id()
    for empty in ("", " "):
        assert_one_line(milestones("thresholds", "set", org, empty), "empty", "none")


async def test_a_reader_that_goes_away_ends_every_command_quietly(database_url: str) -> None:
    env = {"MILESTONES_DATABASE_URL": database_url, "MILESTONES_METRICS_PORT": "0"}
    assert milestones("migrate", env=env).returncode == 0
    commands = [
        ("--help",), ("sweep", "--help"), ("migrate",), ("sweep", "--dry-run"),
        ("grant", "postgres", "--dry-run"), ("mentor", MENTOR), ("mentor", MENTOR, "--json"),
        ("thresholds", "list", "--history"), ("prune", "--before-year", "2020", "--dry-run"),
        ("reconcile",),
    ]
    read_end, write_end = os.pipe()
    os.close(read_end)  # `| head` that has already exited: every write fails with EPIPE

    def run(args: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
        return milestones(*args, env={**env, "MILESTONES_LOG_LEVEL": "WARNING"},
                          stdout=write_end, stderr=subprocess.PIPE)

    try:
        with ThreadPoolExecutor(len(commands)) as pool:
            results = list(pool.map(run, commands))
    finally:
        os.close(write_end)
    for args, result in zip(commands, results, strict=True):
        assert (result.returncode, result.stderr) == (0, ""), (args, result.stderr)


async def test_a_replay_from_before_1970_starts_at_the_first_record(
    engine_env: dict[str, str], kafka: KafkaHelper, topics: Topics, db: Db
) -> None:
    mentor = events.new_id()
    await kafka.produce_json_many(topics.activity, [events.logged(mentor) for _ in range(3)])
    result = await asyncio.to_thread(
        milestones, "replay", "--from-timestamp", "0001-01-01T00:00:00+01:00", env=engine_env
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    counts = await eventually(db.counts, lambda counts: sum(counts.values()) == 3, 5)
    assert {user for user, _year in counts} == {mentor}


def test_log_level_and_format_are_taken_in_any_case(database_url: str) -> None:
    env = {"MILESTONES_DATABASE_URL": database_url, "MILESTONES_LOG_LEVEL": "debug",
           "MILESTONES_LOG_FORMAT": "JSON"}
    result = milestones("migrate", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stderr.splitlines()[0])["level"] in ("DEBUG", "INFO")
