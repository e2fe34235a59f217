"""Which errors of a Kafka call mean "the broker went away" (skip, retry) and which are bugs."""

from __future__ import annotations

import pytest
from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError, NotCoordinatorForGroupError

from consumer.stream.kafka import broker_trouble

# What uvloop raised in a fault test when aiokafka wrote an offset commit to a connection the
# broker had just closed; the engine stopped on it.
CLOSED_TRANSPORT = RuntimeError(
    "unable to perform operation on <TCPTransport closed=True reading=False 0x55cc287cc9f0>;"
    " the handler is closed"
)


@pytest.mark.parametrize(
    "error",
    [
        KafkaConnectionError(),
        KafkaTimeoutError(),
        NotCoordinatorForGroupError(),
        TimeoutError(),
        CLOSED_TRANSPORT,
    ],
)
def test_lost_connections_are_broker_trouble(error: BaseException) -> None:
    assert broker_trouble(error)


@pytest.mark.parametrize(
    "error", [None, RuntimeError("dictionary changed size during iteration"), ValueError("x"),
              ConnectionResetError()],  # the database's, mapped at its own edge
)
def test_other_errors_are_not(error: BaseException | None) -> None:
    assert not broker_trouble(error)
