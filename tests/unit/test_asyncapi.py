"""The AsyncAPI document says what the models and the code do: message names, payloads, topics,
headers and examples. A change on one side without the other turns these red.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from consumer.settings import Settings
from consumer.stream import outbox
from consumer.stream.dead_letters import dead_letter_headers
from consumer.stream.decode import Rejected
from schemas import generate

yaml = pytest.importorskip("yaml")

SCHEMAS_DIR = Path(generate.__file__).resolve().parent
OUTPUT_MODELS = generate.OUTPUT_MODELS
MODELS: dict[str, type[BaseModel]] = {
    generate.event_type(model): model for model in generate.INPUT_MODELS + generate.OUTPUT_MODELS
}


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((SCHEMAS_DIR / "asyncapi.yaml").read_text("utf-8"))
    return loaded


def _payload_messages(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: message
        for name, message in document["components"]["messages"].items()
        if "$ref" in message["payload"].get("schema", {})
    }


def test_every_model_has_one_message_whose_payload_is_its_generated_schema(
    document: dict[str, Any],
) -> None:
    messages = _payload_messages(document)
    assert sorted(message["name"] for message in messages.values()) == sorted(MODELS)
    for message in messages.values():
        ref = message["payload"]["schema"]["$ref"]
        on_disk = json.loads((SCHEMAS_DIR / ref).read_text("utf-8"))
        model = MODELS[message["name"]]
        assert on_disk == generate.schema_for(model, output=model in OUTPUT_MODELS), message["name"]


def test_every_example_is_accepted_by_its_model(document: dict[str, Any]) -> None:
    examples = 0
    for message in _payload_messages(document).values():
        for example in message.get("examples", []):
            MODELS[message["name"]].model_validate_json(json.dumps(example["payload"]))
            examples += 1
    assert examples >= 2


def test_the_milestone_header_is_the_one_the_publisher_writes(document: dict[str, Any]) -> None:
    message = document["components"]["messages"]["milestoneReached"]
    assert message["headers"]["required"] == [outbox.HEADER]
    assert set(message["headers"]["properties"]) == {outbox.HEADER}
    for example in message["examples"]:
        assert example["headers"][outbox.HEADER] == example["payload"]["notification_id"]


@dataclass(frozen=True)
class _Record:
    topic: str = "activity-logged"
    partition: int = 3
    offset: int = 42
    timestamp: int | None = None
    key: bytes | None = None
    value: bytes | None = None


def test_the_dead_letter_headers_are_the_ones_the_engine_writes(document: dict[str, Any]) -> None:
    headers = document["components"]["messages"]["deadLetter"]["headers"]
    rejected = Rejected(_Record(), "invalid_json: x", "invalid_json")
    written = [name for name, _ in dead_letter_headers(rejected)]
    assert sorted(headers["required"]) == sorted(written)
    assert set(headers["properties"]) == set(written)


def test_channel_addresses_are_the_default_topic_names(document: dict[str, Any]) -> None:
    defaults = {name: field.default for name, field in Settings.model_fields.items()}
    addresses = {channel["address"] for channel in document["channels"].values()}
    assert {
        defaults["activity_topic"], defaults["preferences_topic"],
        defaults["notification_topic"], defaults["dlq_topic"], defaults["thresholds_topic"],
    } <= addresses
