"""One record never stops the service: the real ``milestones run`` process meets poison records.

The year-0001 record is real input (``OverflowError`` in the year computation used to stop the
service, and again after every restart). Two more records are made poisonous by a fault
injected into this test's engine process only (a ``sitecustomize`` module on its
``PYTHONPATH``): one makes the year computation of planning raise, the other the evaluator
inside the batch transaction. Each is dead-lettered with its reason, the records after them
are counted, and a restart that reads them all again does not crash either.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests.e2e.conftest import Db, eventually, nid, settle_notifications
from tests.support.engine import EngineLauncher
from tests.support.events import logged, new_id
from tests.support.kafka import KafkaHelper
from tests.support.topics import Topics

pytestmark = pytest.mark.e2e

YEAR_ONE = "0001-01-01T00:00:00+01:00"
PLANNING_POISON_AT = "2026-02-02T02:02:02.020202+00:00"

INJECTED = '''
"""Test-only fault injection, loaded at start of the engine process by the e2e test."""
import os
from datetime import datetime

from consumer.domain import calendar
from consumer.store import postgres

_POISON_SECONDS = datetime.fromisoformat({poison_at!r}).timestamp()
_POISON_MENTOR = os.environ["POISON_TEST_MENTOR"]
_at = calendar.YearOf.at
_decide = postgres.decide


def at(self, seconds, occurred_at):
    if seconds == _POISON_SECONDS:
        raise ArithmeticError("injected into the year computation")
    return _at(self, seconds, occurred_at)


def decide(**kwargs):
    if str(kwargs["mentor_id"]) == _POISON_MENTOR:
        raise LookupError("injected into the evaluator")
    return _decide(**kwargs)


calendar.YearOf.at = at
postgres.decide = decide
'''


def injection(tmp_path: Path, mentor: str) -> dict[str, str]:
    folder = tmp_path / "inject"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        textwrap.dedent(INJECTED.format(poison_at=PLANNING_POISON_AT))
    )
    return {"PYTHONPATH": str(folder), "POISON_TEST_MENTOR": mentor, "MILESTONES_THRESHOLDS": "3"}


async def test_poison_records_are_dead_lettered_and_the_service_keeps_counting(
    engine_process: EngineLauncher, kafka: KafkaHelper, topics: Topics, db: Db, tmp_path: Path
) -> None:
    mentor, evaluator_poison = new_id(), new_id()
    env = injection(tmp_path, evaluator_poison)
    engine = engine_process(env)
    before = [logged(mentor) for _ in range(2)]
    poisons = {
        "year one": logged(mentor, occurred_at=YEAR_ONE),
        "planning raises": logged(mentor, occurred_at=PLANNING_POISON_AT),
        # The evaluator runs only where a record may be due: the third session reaches the
        # threshold 3, so it is the one whose evaluation raises; the first two are counted.
        "evaluation raises": logged(evaluator_poison),
    }
    first_two = [logged(evaluator_poison) for _ in range(2)]
    after = [logged(mentor) for _ in range(2)]
    # One partition key for all: the poison records sit between good ones in one partition.
    for message in [*before, *first_two, *poisons.values(), *after]:
        await kafka.produce_json(topics.activity, message, key=mentor.encode())

    letters = await kafka.wait_for(topics.dlq, lambda records: len(records) >= 3)
    errors = {letter.json()["activity_id"]: letter.header("error") for letter in letters}
    assert errors == {
        poisons["year one"]["activity_id"]: "occurred_at year 1 is outside the years 1900 to 2200",
        poisons["planning raises"]["activity_id"]:
            "unprocessable: ArithmeticError: injected into the year computation",
        poisons["evaluation raises"]["activity_id"]:
            "unprocessable: LookupError: injected into the evaluator",
    }
    await eventually(db.counts, lambda counts: counts.get((mentor, 2026)) == 4)
    await settle_notifications(kafka, topics.notifications, {nid(mentor, 2026, 3)})
    assert engine.returncode is None, engine.output()
    metrics = await engine.metrics()
    assert 'milestones_dead_letters_total{reason="unprocessable"} 2.0' in metrics
    assert 'milestones_dead_letters_total{reason="out_of_range"} 1.0' in metrics
    assert await engine.stop() == 0

    # A restart that reads every record again (a new group) neither crashes nor counts twice.
    again = engine_process({**env, "MILESTONES_GROUP_ID": f"again-{new_id()}"})
    letters = await kafka.wait_for(topics.dlq, lambda records: len(records) >= 6)
    assert len(letters) == 6
    more = logged(mentor)
    await kafka.produce_json(topics.activity, more, key=mentor.encode())
    await eventually(db.counts, lambda counts: counts.get((mentor, 2026)) == 5)
    assert again.returncode is None, again.output()
    assert await again.stop() == 0


async def test_a_record_too_large_for_the_dead_letter_topic_does_not_stall_its_partition(
    engine_process: EngineLauncher, kafka: KafkaHelper, topics: Topics, db: Db
) -> None:
    # Under the client's 1 MiB request limit on the way in, over it on the way to the dead-letter
    # topic once the headers are added: the copy cannot be sent byte for byte, ever.
    mentor = new_id()
    engine = engine_process()
    huge = b"x" * (1024 * 1024 - 200)
    produced = await kafka.produce(topics.activity, huge, mentor.encode())
    await kafka.produce_json(topics.activity, logged(mentor), key=mentor.encode())

    letters = await kafka.wait_for(topics.dlq, lambda records: len(records) >= 1)
    assert len(letters) == 1
    letter = letters[0]
    assert letter.value is None
    assert letter.key == mentor.encode()
    assert letter.header("source_offset") == str(produced.offset)
    assert letter.header("error") == (
        f"value of {len(huge)} bytes is over 64 KiB; too large for the dead-letter topic, the"
        " value is not copied (read it at its source position)"
    )
    await eventually(db.counts, lambda counts: counts.get((mentor, 2026)) == 1)
    assert engine.returncode is None, engine.output()
    assert await engine.stop() == 0


async def test_a_poison_record_on_the_thresholds_topic_does_not_stop_run_at_start(
    engine_process: EngineLauncher, kafka: KafkaHelper, db: Db
) -> None:
    # run restores the thresholds from their topic before joining the group: a record whose
    # changed_at the database cannot take stopped it at every start.
    topic = f"thresholds-{new_id()}"
    await kafka.create_topics([topic])
    poisoned, fine = new_id(), new_id()
    for organization_id, changed_at in [(poisoned, YEAR_ONE), (fine, "2026-03-01T00:00:00+00:00")]:
        await kafka.produce_json(topic, {
            "event_type": "thresholds.changed", "schema_version": 1,
            "organization_id": organization_id, "thresholds": [7], "changed_at": changed_at,
        }, key=organization_id.encode())
    engine = engine_process({"MILESTONES_THRESHOLDS_TOPIC": topic})
    await engine.wait_ready()
    rows = await db.connection.fetch("SELECT organization_id, thresholds FROM milestone_thresholds")
    assert {str(row["organization_id"]): list(row["thresholds"]) for row in rows} == {fine: [7]}
    assert "is not a valid thresholds.changed message, skipped" in engine.output()
    assert await engine.stop() == 0
