"""The message models accept the contract's examples and refuse what the contract rejects; the
generated JSON Schema files are up to date; the AsyncAPI document points at them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from schemas import generate
from schemas.events import (
    ActivityDeleted,
    ActivityLogged,
    InputEvent,
    MilestoneReached,
    PreferencesChanged,
)

INPUT: TypeAdapter[ActivityLogged | ActivityDeleted | PreferencesChanged] = TypeAdapter(InputEvent)
SCHEMAS_DIR = Path(generate.__file__).resolve().parent
ASYNCAPI = SCHEMAS_DIR / "asyncapi.yaml"

# The contract's examples, with real ids in place of "uuid".
ACTIVITY_LOGGED: dict[str, Any] = {
    "event_type": "activity.logged",
    "schema_version": 1,
    "event_id": "3f0a6b1c-52d4-4e8f-9a17-6c2b8d4e0f13",
    "activity_id": "8c7e5d2a-1b3f-4a6c-9e8d-0f1a2b3c4d5e",
    "mentor_id": "0b6c3f0e-8a51-4c1e-9d7a-2f4e6a8b1c3d",
    "organization_id": "5e1d9c7b-3a2f-4e6d-8c1b-0a9f8e7d6c5b",
    "occurred_at": "2026-03-14T10:00:00+01:00",
    "activity_type": "session",
}
ACTIVITY_DELETED: dict[str, Any] = {
    "event_type": "activity.deleted",
    "schema_version": 1,
    "event_id": "4b1c7d2e-63e5-4f90-8b28-7d3c9e5f1a24",
    "activity_id": "8c7e5d2a-1b3f-4a6c-9e8d-0f1a2b3c4d5e",
    "mentor_id": "0b6c3f0e-8a51-4c1e-9d7a-2f4e6a8b1c3d",
    "organization_id": "5e1d9c7b-3a2f-4e6d-8c1b-0a9f8e7d6c5b",
    "deleted_at": "2026-03-20T08:00:00+00:00",
}
PREFERENCES_CHANGED: dict[str, Any] = {
    "event_type": "preferences.changed",
    "schema_version": 1,
    "event_id": "5c2d8e3f-74f6-4a01-9c39-8e4daf602b35",
    "mentor_id": "0b6c3f0e-8a51-4c1e-9d7a-2f4e6a8b1c3d",
    "milestone_notifications": False,
    "changed_at": "2026-03-01T12:00:00+00:00",
}
MILESTONE_REACHED: dict[str, Any] = {
    "event_type": "milestone.reached",
    "schema_version": 1,
    "notification_id": "8f901d68-e15a-53d4-b221-d1a0def299e9",
    "mentor_id": "0b6c3f0e-8a51-4c1e-9d7a-2f4e6a8b1c3d",
    "organization_id": "5e1d9c7b-3a2f-4e6d-8c1b-0a9f8e7d6c5b",
    "scenario_type": "milestone",
    "year": 2026,
    "milestone_value": 50,
    "session_count": 50,
    "activity_id": "8c7e5d2a-1b3f-4a6c-9e8d-0f1a2b3c4d5e",
    "reached_at": "2026-03-14T10:00:00+01:00",
    "created_at": "2026-03-14T09:00:01.234567+00:00",
}
INPUT_EXAMPLES = {
    "activity.logged": ACTIVITY_LOGGED,
    "activity.deleted": ACTIVITY_DELETED,
    "preferences.changed": PREFERENCES_CHANGED,
}
ALL_EXAMPLES = {**INPUT_EXAMPLES, "milestone.reached": MILESTONE_REACHED}


def accept(message: dict[str, Any]) -> object:
    return INPUT.validate_json(json.dumps(message))


def with_(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**base, **changes}


def without(base: dict[str, Any], field: str) -> dict[str, Any]:
    return {key: value for key, value in base.items() if key != field}


# --- the contract's examples ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "model"),
    [
        pytest.param(ACTIVITY_LOGGED, ActivityLogged, id="activity.logged"),
        pytest.param(ACTIVITY_DELETED, ActivityDeleted, id="activity.deleted"),
        pytest.param(PREFERENCES_CHANGED, PreferencesChanged, id="preferences.changed"),
    ],
)
def test_contract_examples_of_input_messages_validate(
    message: dict[str, Any], model: type[object]
) -> None:
    assert isinstance(accept(message), model)


def test_contract_example_of_milestone_reached_validates_with_and_without_activity() -> None:
    crossing = MilestoneReached.model_validate_json(json.dumps(MILESTONE_REACHED))
    assert crossing.activity_id is not None
    earlier = MilestoneReached.model_validate_json(json.dumps(with_(MILESTONE_REACHED,
                                                                    activity_id=None)))
    assert earlier.activity_id is None


def test_milestone_reached_round_trips_with_every_field_written() -> None:
    message = MilestoneReached.model_validate_json(json.dumps(MILESTONE_REACHED))
    written = json.loads(message.model_dump_json())
    assert set(written) == set(MILESTONE_REACHED)
    assert MilestoneReached.model_validate_json(message.model_dump_json()) == message


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(with_(ACTIVITY_LOGGED, occurred_at="2025-12-31T23:30:00Z"), id="utc Z"),
        pytest.param(with_(ACTIVITY_LOGGED, activity_type="x" * 100), id="type of 100 chars"),
        pytest.param(with_(ACTIVITY_LOGGED, activity_type="ø" * 100), id="100 non-ascii chars"),
        pytest.param(with_(ACTIVITY_LOGGED, activity_type="Group session"), id="free text"),
        pytest.param(with_(ACTIVITY_LOGGED, extra="ignored"), id="unknown extra field"),
        pytest.param(
            with_(ACTIVITY_LOGGED, mentor_id="0B6C3F0E-8A51-4C1E-9D7A-2F4E6A8B1C3D"),
            id="uppercase uuid",
        ),
    ],
)
def test_valid_variants_are_accepted(message: dict[str, Any]) -> None:
    accept(message)


# --- what the contract rejects -------------------------------------------------------------

BAD_MESSAGES = [
    pytest.param(with_(ACTIVITY_LOGGED, occurred_at="2026-03-14T10:00:00"), id="naive occurred_at"),
    pytest.param(with_(ACTIVITY_LOGGED, occurred_at="2026-03-14"), id="date only occurred_at"),
    pytest.param(with_(ACTIVITY_DELETED, deleted_at="2026-03-20T08:00:00"), id="naive deleted_at"),
    pytest.param(
        with_(PREFERENCES_CHANGED, changed_at="2026-03-01T12:00:00"), id="naive changed_at"
    ),
    pytest.param(with_(ACTIVITY_LOGGED, schema_version=True), id="schema_version true"),
    pytest.param(with_(ACTIVITY_LOGGED, schema_version=2), id="schema_version 2"),
    pytest.param(with_(ACTIVITY_LOGGED, schema_version=0), id="schema_version 0"),
    pytest.param(with_(ACTIVITY_LOGGED, schema_version="1"), id="schema_version string"),
    pytest.param(with_(ACTIVITY_LOGGED, schema_version=1.0), id="schema_version float"),
    pytest.param(with_(PREFERENCES_CHANGED, schema_version=True), id="prefs schema_version true"),
    pytest.param(with_(ACTIVITY_LOGGED, mentor_id="not-a-uuid"), id="non-uuid mentor_id"),
    pytest.param(with_(ACTIVITY_LOGGED, activity_id="1234"), id="non-uuid activity_id"),
    pytest.param(with_(ACTIVITY_LOGGED, event_id=""), id="empty event_id"),
    pytest.param(with_(ACTIVITY_LOGGED, organization_id=42), id="number organization_id"),
    pytest.param(with_(ACTIVITY_DELETED, activity_id="zzz"), id="non-uuid deleted activity"),
    pytest.param(with_(PREFERENCES_CHANGED, mentor_id="mentor-1"), id="non-uuid prefs mentor"),
    pytest.param(with_(ACTIVITY_LOGGED, activity_type="sess\u0000ion"), id="NUL in activity_type"),
    pytest.param(with_(ACTIVITY_LOGGED, activity_type="x" * 101), id="activity_type of 101 chars"),
    pytest.param(with_(ACTIVITY_LOGGED, activity_type="\ud800"), id="lone surrogate in type"),
    pytest.param(with_(ACTIVITY_LOGGED, activity_type=""), id="empty activity_type"),
    pytest.param(with_(ACTIVITY_LOGGED, activity_type=7), id="number activity_type"),
    pytest.param(with_(ACTIVITY_LOGGED, event_type="activity.updated"), id="unknown event_type"),
    pytest.param(with_(ACTIVITY_LOGGED, event_type=None), id="null event_type"),
    pytest.param(without(ACTIVITY_LOGGED, "event_type"), id="missing event_type"),
    pytest.param(MILESTONE_REACHED, id="an output message on an input topic"),
    pytest.param(without(ACTIVITY_LOGGED, "occurred_at"), id="missing occurred_at"),
    pytest.param(without(ACTIVITY_DELETED, "activity_id"), id="missing deleted activity_id"),
    pytest.param(
        with_(PREFERENCES_CHANGED, milestone_notifications="false"), id="string boolean"
    ),
    pytest.param(with_(PREFERENCES_CHANGED, milestone_notifications=0), id="number boolean"),
]


@pytest.mark.parametrize("message", BAD_MESSAGES)
def test_contract_rejects(message: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        accept(message)


@pytest.mark.parametrize(
    "raw", [b"", b"null", b"[]", b"\"activity.logged\"", b"{", b"\xff\xfe{}"]
)
def test_values_that_are_not_a_json_object_are_rejected(raw: bytes) -> None:
    with pytest.raises(ValidationError):
        INPUT.validate_json(raw)


# --- the generated JSON Schema files -------------------------------------------------------


def test_committed_json_schemas_are_up_to_date() -> None:
    stale = generate.stale_files(generate.JSON_DIR)
    assert stale == [], "run `python -m schemas.generate` and commit schemas/json/"


def test_one_schema_file_per_message_model() -> None:
    assert sorted(generate.expected_files()) == [
        "activity.deleted.schema.json",
        "activity.logged.schema.json",
        "milestone.reached.schema.json",
        "preferences.changed.schema.json",
        "thresholds.changed.schema.json",
    ]


def test_rendering_is_deterministic_pretty_and_sorted() -> None:
    first, second = generate.expected_files(), generate.expected_files()
    assert first == second
    for text in first.values():
        assert text.endswith("}\n")
        assert not text.endswith("\n\n")
        schema = json.loads(text)
        assert text == json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def test_check_lists_stale_files_and_write_fixes_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = ["--out", str(tmp_path)]
    assert generate.main(["--check", *out]) == 1
    err = capsys.readouterr().err
    assert err.count("stale: ") == len(generate.expected_files())
    assert "activity.logged.schema.json" in err

    assert generate.main(out) == 0
    assert generate.main(["--check", *out]) == 0
    assert capsys.readouterr().err == ""

    edited = tmp_path / "preferences.changed.schema.json"
    edited.write_text(edited.read_text(encoding="utf-8").replace("Mentor Id", "Mentor"),
                      encoding="utf-8")
    leftover = tmp_path / "activity.updated.schema.json"
    leftover.write_text("{}\n", encoding="utf-8")
    (tmp_path / "notes.json").write_text("{}\n", encoding="utf-8")  # not ours: left alone
    assert generate.main(["--check", *out]) == 1
    err = capsys.readouterr().err
    assert sorted(line.removeprefix("stale: ") for line in err.splitlines()
                  if line.startswith("stale: ")) == sorted([str(edited), str(leftover)])

    assert generate.main(out) == 0
    assert generate.main(["--check", *out]) == 0
    assert not leftover.exists()
    assert (tmp_path / "notes.json").exists()


def test_generator_does_not_rewrite_fresh_files(tmp_path: Path) -> None:
    generate.write(tmp_path)
    assert generate.write(tmp_path) == []


def load_schema(name: str) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(generate.expected_files()[name + ".schema.json"])
    return schema


@pytest.mark.parametrize("name", sorted(ALL_EXAMPLES))
def test_contract_example_fits_the_json_schema(name: str) -> None:
    """A light structural check, without a JSON Schema validator among the dependencies."""
    schema, example = load_schema(name), ALL_EXAMPLES[name]
    assert set(schema["required"]) <= set(example)
    assert set(example) <= set(schema["properties"])
    for field, value in example.items():
        prop = schema["properties"][field]
        if "const" in prop:
            assert value == prop["const"]
        if prop.get("type") == "string":
            assert isinstance(value, str)
        if prop.get("type") == "integer":
            assert isinstance(value, int)
            assert not isinstance(value, bool)


@pytest.mark.parametrize("name", sorted(INPUT_EXAMPLES))
def test_input_schemas_pin_schema_version_to_1(name: str) -> None:
    assert load_schema(name)["properties"]["schema_version"] == {
        "const": 1,
        "title": "Schema Version",
        "type": "integer",
    }


def test_activity_type_bounds_and_nul_are_in_the_json_schema() -> None:
    prop = load_schema("activity.logged")["properties"]["activity_type"]
    assert (prop["minLength"], prop["maxLength"]) == (1, 100)
    pattern = re.compile(prop["pattern"])
    assert pattern.search("group session")
    assert not pattern.search("sess\x00ion")


def test_every_field_of_milestone_reached_is_required() -> None:
    schema = load_schema("milestone.reached")
    assert set(schema["required"]) == set(schema["properties"]) == set(MILESTONE_REACHED)


@pytest.mark.parametrize("name", sorted(ALL_EXAMPLES))
def test_json_schemas_use_draft_07_only(name: str) -> None:
    schema = load_schema(name)
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    newer = {"$defs", "prefixItems", "dependentRequired", "dependentSchemas",
             "unevaluatedProperties", "unevaluatedItems", "$anchor", "$dynamicRef"}
    text = json.dumps(schema)
    assert not [keyword for keyword in newer if f'"{keyword}"' in text]


# --- the AsyncAPI document -----------------------------------------------------------------


def test_asyncapi_payload_refs_point_at_the_generated_files() -> None:
    text = ASYNCAPI.read_text(encoding="utf-8")
    refs = re.findall(r"\$ref: '\./json/([^']+)'", text)
    assert sorted(refs) == sorted(generate.expected_files())
    for ref in refs:
        assert (generate.JSON_DIR / ref).is_file()


def test_asyncapi_names_the_topics_and_dead_letter_headers() -> None:
    text = ASYNCAPI.read_text(encoding="utf-8")
    assert "\nasyncapi: 3.0.0\n" in text
    for topic in ("activity-logged", "mentor-preferences", "milestone-notifications",
                  "activity-logged.dlq"):
        assert f"address: {topic}\n" in text
        assert f"topic: {topic}\n" in text
    for header in ("error", "source_topic", "source_partition", "source_offset", "error_kind"):
        assert f"- {header}\n" in text
        assert f"    {header}:\n" in text


def test_asyncapi_document_structure() -> None:
    yaml = pytest.importorskip("yaml")
    document = yaml.safe_load(ASYNCAPI.read_text(encoding="utf-8"))
    assert document["asyncapi"] == "3.0.0"
    channels = document["channels"]
    assert {c["address"] for c in channels.values()} == {
        "activity-logged", "mentor-preferences", "milestone-notifications", "activity-logged.dlq",
        "milestone-thresholds",
    }
    actions = {name: op["action"] for name, op in document["operations"].items()}
    assert sorted(actions.values()) == ["receive", "receive", "receive", "send", "send", "send"]
    headers = document["components"]["messages"]["deadLetter"]["headers"]
    assert set(headers["required"]) == {"error", "source_topic", "source_partition",
                                        "source_offset", "error_kind"}
