"""aiokafka on uvloop: a request written to a connection the broker closed.

uvloop raises ``RuntimeError`` ("the handler is closed") where aiokafka expects an ``OSError``;
in a fault test it ended aiokafka's fetch routine for good. ``tolerate_closed_transports`` turns
it into the ``KafkaConnectionError`` every caller handles. Run on uvloop, as the CLI is.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import uvloop
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaConnectionError
from aiokafka.protocol.metadata import MetadataRequest

from consumer.stream.kafka import tolerate_closed_transports


async def _send_on_a_closed_connection(broker: str) -> BaseException | None:
    client = AIOKafkaClient(bootstrap_servers=broker)
    await client.bootstrap()
    try:
        node_id = next(iter(client.cluster.brokers())).nodeId
        connection: Any = await client._get_conn(node_id)
        connection._writer.transport.abort()  # what a cut by the broker leaves behind
        await asyncio.sleep(0)
        try:
            await connection.send(MetadataRequest([]))
        except BaseException as error:  # the error is the result
            return error
        return None
    finally:
        await client.close()


def test_uvloop_raises_runtime_error_without_the_fix(
    broker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fix is needed: aiokafka as released lets uvloop's error out."""
    from aiokafka.conn import AIOKafkaConnection

    released = getattr(AIOKafkaConnection.send, "__wrapped__", AIOKafkaConnection.send)
    monkeypatch.setattr(AIOKafkaConnection, "send", released)
    error = uvloop.run(_send_on_a_closed_connection(broker))
    assert isinstance(error, RuntimeError)
    assert "handler is closed" in str(error)


def test_a_closed_transport_is_a_connection_error(broker: str) -> None:
    tolerate_closed_transports()
    tolerate_closed_transports()  # idempotent
    error = uvloop.run(_send_on_a_closed_connection(broker))
    assert isinstance(error, KafkaConnectionError), repr(error)
