"""Creating topics through the admin client: the thresholds topic (compacted), and the
demo's and the tests' topics, with the security options of the other clients."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# The broker's error code for a topic that exists: answered per topic, not raised.
_TOPIC_ALREADY_EXISTS = 36


async def create_topics(
    bootstrap_servers: str,
    names: Sequence[str],
    partitions: int | Mapping[str, int] = 1,
    *,
    configs: Mapping[str, Mapping[str, str]] | None = None,
    timeout_s: float = 30.0,
    client_options: Mapping[str, Any] | None = None,
) -> None:
    """Create ``names`` (replication factor 1); a topic that already exists is left as it is.

    ``partitions`` is one count for all or a count per name (missing names get 1); ``configs``
    maps a name to its topic configuration; ``client_options`` are more keyword arguments of
    the admin client (the security settings). Raises ``RuntimeError`` naming the topic and the
    broker's error code for any other refusal.
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    if not names:
        return
    new_topics = []
    for name in names:
        count = partitions if isinstance(partitions, int) else partitions.get(name, 1)
        topic_configs = dict((configs or {}).get(name, {}))
        new_topics.append(NewTopic(name, count, 1, topic_configs=topic_configs))
    admin = AIOKafkaAdminClient(
        **{"bootstrap_servers": bootstrap_servers, **(client_options or {})},
        request_timeout_ms=int(timeout_s * 1000),
    )
    await admin.start()
    try:
        try:
            response = await admin.create_topics(new_topics, timeout_ms=int(timeout_s * 1000))
        except TopicAlreadyExistsError:
            return
        failures = [
            f"{error[0]}: error {error[1]}" + (f" ({error[2]})" if len(error) > 2 else "")
            for error in response.topic_errors
            if error[1] not in (0, _TOPIC_ALREADY_EXISTS)
        ]
        if failures:
            raise RuntimeError("could not create topics: " + "; ".join(failures))
    finally:
        await admin.close()
