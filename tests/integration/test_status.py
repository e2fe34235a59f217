"""``milestones status``: counts, the outbox and the consumer lag, read from the real services."""

from __future__ import annotations

import asyncpg
import pytest

from consumer.commands.common import current_year
from consumer.commands.status import consumer_lag, status_command
from tests.integration.operations import commit_at_end, settings_from, write_events
from tests.support import events
from tests.support.kafka import KafkaHelper
from tests.support.topics import Topics


def row(output: str, label: str) -> list[str]:
    line = next(line for line in output.splitlines() if line.startswith(label))
    return line[len(label):].split()


async def test_status_shows_counts_pending_notifications_and_lag(
    db: asyncpg.Connection, engine_env: dict[str, str], kafka: KafkaHelper, topics: Topics,
    broker: str, capsys: pytest.CaptureFixture[str],
) -> None:
    settings = settings_from(engine_env, thresholds="2")
    year = current_year(settings)
    first, second = events.new_id(), events.new_id()
    await write_events(settings, [
        events.logged(first, occurred_at=f"{year}-01-0{n}T10:00:00+01:00") for n in (1, 2, 3)
    ] + [events.logged(second, occurred_at=f"{year}-01-01T10:00:00+01:00"),
         events.logged(second, occurred_at=f"{year - 1}-01-01T10:00:00+01:00")])
    for mentor in (first, second):
        await kafka.produce_json(topics.activity, events.logged(mentor), partition=0)
    await commit_at_end(broker, settings.group_id, [topics.activity, topics.preferences])
    for _ in range(3):
        await kafka.produce_json(topics.activity, events.logged(first), partition=1)
    await kafka.produce_json(topics.preferences, events.preference(first, False), partition=0)

    assert await status_command(settings) == 0

    output = capsys.readouterr().out
    assert row(output, "mentors with sessions") == ["2"]
    assert row(output, "sessions") == ["4"]
    assert row(output, "pending") == ["1", "1"]
    assert row(output, "published") == ["0", "0"]
    assert "oldest pending" in output
    assert row(output, f"{topics.activity}[0]") == ["2", "2", "0"]
    assert row(output, f"{topics.activity}[1]") == ["0", "3", "3"]
    assert row(output, f"{topics.preferences}[0]") == ["0", "1", "1"]
    assert "total lag 4" in output


async def test_lag_of_a_group_that_never_committed_counts_from_the_start(
    engine_env: dict[str, str], kafka: KafkaHelper, topics: Topics
) -> None:
    settings = settings_from(engine_env)
    await kafka.produce_json(topics.activity, events.logged(events.new_id()), partition=2)

    lags = await consumer_lag(settings, "a-group-never-seen")

    by_partition = {(lag.topic, lag.partition): lag for lag in lags}
    assert len(lags) == 6
    assert by_partition[(topics.activity, 2)].committed is None
    assert by_partition[(topics.activity, 2)].lag == 1
    assert sum(lag.lag or 0 for lag in lags) == 1
