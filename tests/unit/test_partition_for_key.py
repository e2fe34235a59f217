"""The publisher chooses each notification's partition itself: exactly as the default producer."""

from __future__ import annotations

from uuid import UUID

from aiokafka.partitioner import DefaultPartitioner
from hypothesis import given
from hypothesis import strategies as st

from consumer.stream.kafka import partition_for_key


@given(key=st.binary(max_size=80), count=st.integers(min_value=1, max_value=64))
def test_any_key_goes_where_the_default_partitioner_sends_it(key: bytes, count: int) -> None:
    partitions = list(range(count))
    assert partition_for_key(key, partitions) == DefaultPartitioner()(key, partitions, partitions)


@given(mentor=st.uuids(), count=st.integers(min_value=1, max_value=64))
def test_a_mentor_key_goes_where_the_default_partitioner_sends_it(mentor: UUID, count: int) -> None:
    key = str(mentor).encode()
    partitions = list(range(count))
    assert partition_for_key(key, partitions) == DefaultPartitioner()(key, partitions, partitions)
