"""``milestones thresholds``, ``mentor`` and ``dead-letters``: the real commands against the
real broker and Postgres (and ``run`` / ``replay`` where the thresholds are restored)."""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

import pytest

from consumer.domain.thresholds import MAX_THRESHOLDS
from tests.e2e.conftest import Db, eventually, nid, settle_notifications
from tests.support.engine import EngineLauncher
from tests.support.events import ORG, OTHER_ORG, logged, new_id, preference
from tests.support.kafka import KafkaHelper
from tests.support.topics import Topics

pytestmark = pytest.mark.e2e

YEAR = datetime.now(UTC).year  # the commands' default year (Oslo differs only around new year)


async def milestones(
    env: Mapping[str, str], *args: str, shell_pipe: str | None = None, timeout_s: float = 60.0
) -> tuple[int, str, str]:
    """Run ``milestones *args`` (``| shell_pipe`` when given); return status, stdout, stderr."""
    command: Sequence[str] = [sys.executable, "-m", "consumer", *args]
    if shell_pipe is not None:
        process = await asyncio.create_subprocess_shell(
            " ".join(command) + f" | {shell_pipe}; exit ${{PIPESTATUS[0]}}",
            executable="/bin/bash", env=dict(env),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
    else:
        process = await asyncio.create_subprocess_exec(
            *command, env=dict(env), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
    out, err = await asyncio.wait_for(process.communicate(), timeout_s)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.fixture
def env(engine_env: dict[str, str]) -> dict[str, str]:
    """The engine's environment with a thresholds topic of this test's own."""
    return {**engine_env, "MILESTONES_THRESHOLDS_TOPIC": f"thresholds-{secrets.token_hex(4)}"}


async def thresholds_rows(db: Db) -> dict[str, list[int]]:
    rows = await db.connection.fetch("SELECT organization_id, thresholds FROM milestone_thresholds")
    return {str(row["organization_id"]): list(row["thresholds"]) for row in rows}


async def rebuild_schema(db: Db, env: Mapping[str, str]) -> None:
    """The database lost: an empty schema, migrated again."""
    await db.connection.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    code, out, err = await milestones(env, "migrate")
    assert code == 0, out + err


@pytest.mark.parametrize("bad", [
    "10,x", "0,10", "-5", "10,,20", "1.5", "200000",
    ",".join(str(n) for n in range(1, MAX_THRESHOLDS + 2)),
])
async def test_thresholds_set_refuses_garbage_with_one_line_and_exit_2(
    env: dict[str, str], db: Db, bad: str
) -> None:
    code, out, err = await milestones(env, "thresholds", "set", ORG, bad)
    assert code == 2, out + err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err, err
    code, out, err = await milestones(env, "thresholds", "set", "not-a-uuid", "10")
    assert (code, len(err.strip().splitlines())) == (2, 1), err
    assert "not a UUID" in err


async def test_thresholds_set_list_unset_keep_history_and_survive_a_rebuild(
    env: dict[str, str], db: Db, engine_process: EngineLauncher, kafka: KafkaHelper,
) -> None:
    code, out, err = await milestones(env, "thresholds", "set", ORG, "25,10,10,50")
    assert code == 0, out + err
    assert "10,25,50 (was no row" in out
    assert await thresholds_rows(db) == {ORG: [10, 25, 50]}
    assert (await milestones(env, "thresholds", "set", ORG, "5, 10"))[0] == 0
    assert (await milestones(env, "thresholds", "set", OTHER_ORG, "none"))[0] == 0
    assert await thresholds_rows(db) == {ORG: [5, 10], OTHER_ORG: []}

    code, out, _ = await milestones(env, "thresholds", "list", "--history")
    assert code == 0
    assert "default (MILESTONES_THRESHOLDS): 50,100,200" in out
    listing, history = out.split("history")
    assert any(ORG in line and "5,10" in line and "10,25,50" in line
               for line in listing.splitlines())
    assert any(OTHER_ORG in line and "none" in line for line in listing.splitlines())
    assert len([line for line in history.splitlines() if ORG in line]) == 2
    rows = await db.connection.fetch(
        "SELECT thresholds, previous, source FROM milestone_thresholds_history"
        " WHERE organization_id = $1 ORDER BY changed_at", ORG)
    assert [(r["thresholds"], r["previous"], r["source"]) for r in rows] == [
        ([10, 25, 50], None, "command"), ([5, 10], [10, 25, 50], "command")]

    # The database is lost: `run` restores the thresholds from the topic at start.
    await rebuild_schema(db, env)
    assert await thresholds_rows(db) == {}
    engine = engine_process({"MILESTONES_THRESHOLDS_TOPIC": env["MILESTONES_THRESHOLDS_TOPIC"]})
    await engine.wait_ready()
    assert await thresholds_rows(db) == {ORG: [5, 10], OTHER_ORG: []}
    assert await engine.stop() == 0

    assert (await milestones(env, "thresholds", "unset", OTHER_ORG))[0] == 0
    assert await thresholds_rows(db) == {ORG: [5, 10]}

    # Lost again: `replay --from-beginning` restores them (the unset included) before it
    # counts, so the organization's own thresholds decide what the replay records.
    mentor = new_id()
    await kafka.produce_json_many(
        env["MILESTONES_ACTIVITY_TOPIC"],
        [logged(mentor, occurred_at=f"{YEAR}-03-14T10:00:00+01:00") for _ in range(5)],
    )
    await rebuild_schema(db, env)
    code, out, err = await milestones(env, "replay", "--from-beginning", "--no-notify")
    assert code == 0, out + err
    assert await thresholds_rows(db) == {ORG: [5, 10]}
    assert await db.statuses() == {(mentor, YEAR, 5): "suppressed"}
    sources = await db.connection.fetch("SELECT DISTINCT source FROM milestone_thresholds_history")
    assert [row["source"] for row in sources] == ["topic"]
    count_history = "SELECT count(*) FROM milestone_thresholds_history"
    assert await db.connection.fetchval(count_history) == 2  # ORG's set, OTHER_ORG's unset
    # A second restore changes nothing (a change is applied only when newer).
    code, out, err = await milestones(env, "replay", "--from-beginning", "--no-notify")
    assert code == 0, out + err
    assert await db.connection.fetchval(count_history) == 2


async def test_mentor_says_why_a_mentor_was_or_was_not_congratulated(
    env: dict[str, str], db: Db, engine_process: EngineLauncher, kafka: KafkaHelper,
    topics: Topics,
) -> None:
    sent, opted_out = new_id(), new_id()
    at = f"{YEAR}-03-14T10:00:00+01:00"
    await kafka.produce_json(topics.preferences, preference(opted_out, False,
                                                            f"{YEAR}-01-02T12:00:00+00:00"))
    engine = engine_process({"MILESTONES_THRESHOLDS": "2,4"})
    await kafka.produce_json_many(topics.activity, [logged(sent, occurred_at=at) for _ in range(3)])
    await kafka.produce_json_many(topics.activity,
                                  [logged(opted_out, occurred_at=at) for _ in range(2)])
    await settle_notifications(kafka, topics.notifications, {nid(sent, YEAR, 2)})
    await eventually(db.statuses, lambda s: len(s) == 2 and "pending" not in s.values())
    # A message the engine rejects is listed by dead-letters, found by its reason kind.
    bad = await kafka.produce(topics.activity, b'{"not json', sent.encode())
    await kafka.wait_for(topics.dlq, lambda records: len(records) >= 1)
    code, out, err = await milestones(env, "dead-letters", "--reason", "invalid_json", "--json")
    assert code == 0, out + err
    [letter] = [json.loads(line) for line in out.splitlines()]
    assert (letter["source_topic"], letter["source_partition"], letter["source_offset"]) == (
        topics.activity, str(bad.partition), str(bad.offset))
    assert letter["value_prefix"] == '{"not json'
    assert await engine.stop() == 0
    text_env = {**env, "MILESTONES_THRESHOLDS": "2,4"}

    code, out, err = await milestones(text_env, "mentor", sent, "--year", str(YEAR))
    assert code == 0, out + err
    assert "sessions counted: 3" in out
    assert "2,4 (default, MILESTONES_THRESHOLDS)" in out
    assert "count 3 < next threshold 4" in out
    published = next(r for r in await db.records() if str(r["user_id"]) == sent)
    assert (f"partition {published['published_partition']}"
            f" offset {published['published_offset']}") in out
    assert f"crossed by session {published['activity_id']}, session_count 2" in out

    code, out, err = await milestones(text_env, "mentor", opted_out, "--json")
    assert code == 0, out + err
    report = json.loads(out)
    assert report["opted_out"] is True
    assert report["session_count"] == 2
    [milestone] = report["milestones"]
    assert (milestone["status"], milestone["suppressed_reason"]) == ("suppressed", "opted_out")
    assert milestone["activity_id"] is not None
    assert milestone["published_at"] is None
    assert any(line.startswith(f"opted out since {YEAR}-01-02 12:00:00")
               for line in report["explanation"])

    code, out, err = await milestones(text_env, "mentor", "42")
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert "MENTOR_ID" in err, err


async def test_dead_letters_lists_filters_escapes_and_survives_head(
    env: dict[str, str], kafka: KafkaHelper, topics: Topics,
) -> None:
    def headers(error: str, offset: int) -> dict[str, str]:
        return {"error": error, "source_topic": topics.activity, "source_partition": "3",
                "source_offset": str(offset)}

    await kafka.produce(topics.dlq, b'{"oops\x1b[31m\x07', b"k",
                        {**headers("invalid JSON or UTF-8: EOF", 7), "error_kind": "invalid_json"})
    await kafka.produce(topics.dlq, None, b"k", headers("null_value: null value", 8))
    for offset in range(9, 60):
        await kafka.produce(topics.dlq, b"\xff\xfe", None, headers("future: occurred_at", offset))

    code, out, err = await milestones(env, "dead-letters", "--reason", "invalid_json")
    assert code == 0, out + err
    [line] = out.splitlines()
    assert f"{topics.activity}[3]@7" in line
    assert "invalid_json" in line
    assert "\\x1b[31m\\x07" in line
    assert "\x1b" not in line
    assert "2 of" not in err
    assert "1 of 53 dead letter(s)" in err

    code, out, err = await milestones(env, "dead-letters", "--json")
    letters = [json.loads(line) for line in out.splitlines()]
    assert len(letters) == 53
    assert letters[1]["value_prefix"] == "(null)"
    assert letters[2]["value_prefix"] == "\\xff\\xfe"
    assert letters[2]["kind"] == "future"

    code, out, err = await milestones(env, "dead-letters", "--since", "2999-01-01")
    assert (code, out) == (0, "")
    assert "0 of 53" in err

    code, out, err = await milestones(env, "dead-letters", shell_pipe="head -n 2")
    assert code == 0, err
    assert len(out.splitlines()) == 2
    assert "Traceback" not in err
    assert "BrokenPipe" not in err

    code, out, err = await milestones(env, "dead-letters", "--since", "yesterday")
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
