"""The thresholds topic: each organization's latest thresholds, kept by compaction.

``milestone_thresholds`` is configuration, not something the input topics can rebuild; this
topic makes it durable beyond the database. ``milestones thresholds set|unset`` writes here
first (acks=all), then to Postgres; ``run`` at start and ``replay`` before the input topics
read it back and apply what is newer than the database knows.
"""

from __future__ import annotations

import logging

import asyncpg
from aiokafka import ConsumerRecord
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from consumer.domain.thresholds import ThresholdsChange, latest_changes, validate_thresholds
from consumer.ops.logs import fields
from consumer.settings import ENV_PREFIX, Settings, SettingsError
from consumer.store import thresholds_sql
from consumer.stream.admin import create_topics
from consumer.stream.decode import MAX_YEAR, MIN_YEAR
from consumer.stream.kafka import kafka_client_options, make_producer, start_client
from consumer.stream.teardown import within
from consumer.stream.topic_reader import TopicMissing, topic_records
from schemas.events import ThresholdsChanged

log = logging.getLogger(__name__)

# The latest value of every key is kept for ever; older values may go.
TOPIC_CONFIG = {"cleanup.policy": "compact"}


async def ensure_topic(settings: Settings, *, timeout_s: float = 10.0) -> None:
    """Create the topic compacted (a broker's auto-creation would make it
    ``cleanup.policy=delete``, and the thresholds would expire with its retention); an
    existing topic is left as it is.

    A broker that refuses (no permission) is only logged: the send that follows says whether
    the topic is usable.
    """
    try:
        await create_topics(
            settings.require_kafka(), [settings.thresholds_topic],
            configs={settings.thresholds_topic: TOPIC_CONFIG}, timeout_s=timeout_s,
            client_options=kafka_client_options(settings),
        )
    except Exception as error:
        log.warning(
            "could not create %s (%s); create it with cleanup.policy=compact",
            settings.thresholds_topic, error,
        )


def message_for(change: ThresholdsChange) -> ThresholdsChanged:
    return ThresholdsChanged(
        organization_id=change.organization_id,
        thresholds=None if change.thresholds is None else list(change.thresholds),
        changed_at=change.changed_at,
    )


async def publish_change(settings: Settings, change: ThresholdsChange) -> tuple[int, int]:
    """Send one change and wait for the acknowledgement; return its partition and offset."""
    producer = make_producer(settings)
    await start_client(producer, settings)  # a broker away: SettingsError, before anything else
    try:
        # The producer's own metadata (its connection settings): the admin client is needed
        # only the first time.
        if settings.thresholds_topic not in (await producer.client.fetch_all_metadata()).topics():
            await ensure_topic(settings)
        metadata = await producer.send_and_wait(
            settings.thresholds_topic,
            key=str(change.organization_id).encode(),
            value=message_for(change).model_dump_json().encode(),
        )
        return metadata.partition, metadata.offset
    finally:
        await within(producer.stop(), 10.0, "stopping the thresholds producer")


def change_of(record: ConsumerRecord[bytes, bytes]) -> ThresholdsChange | None:
    """The change a record holds, or None (logged) for one that is not a valid message."""
    if record.value is None:
        return None  # a tombstone written by hand: compaction's delete, nothing to apply
    try:
        message = ThresholdsChanged.model_validate_json(record.value)
        thresholds = (
            None if message.thresholds is None else validate_thresholds(message.thresholds)
        )
        if not MIN_YEAR <= message.changed_at.year <= MAX_YEAR:
            # The database could not take it (year 0 in UTC), and run restores at every start.
            raise ValueError(
                f"changed_at year {message.changed_at.year} is outside the years"
                f" {MIN_YEAR} to {MAX_YEAR}"
            )
    except (ValidationError, ValueError) as error:
        log.warning(
            "%s[%d]@%d is not a valid thresholds.changed message, skipped: %s",
            record.topic, record.partition, record.offset, str(error).splitlines()[0],
            extra=fields(topic=record.topic, partition=record.partition, offset=record.offset),
        )
        return None
    return ThresholdsChange(message.organization_id, thresholds, message.changed_at)


async def read_latest(settings: Settings) -> list[ThresholdsChange]:
    """The latest change of every organization on the topic ([] when the topic is missing)."""
    changes = []
    try:
        async with topic_records(settings, settings.thresholds_topic) as records:
            async for record in records:
                change = change_of(record)
                if change is not None:
                    changes.append(change)
    except TopicMissing:
        log.info("no thresholds topic %s: nothing to restore", settings.thresholds_topic)
        return []
    return sorted(latest_changes(changes).values(), key=lambda c: c.organization_id.int)


async def restore_thresholds(settings: Settings, pool: asyncpg.Pool, *, strict: bool) -> int:
    """Apply every organization's latest change from the thresholds topic that is newer than
    what the database knows; return how many were applied.

    ``run`` calls it at start and ``replay`` before it reads the input topics, so a database
    rebuilt from the topics has its organizations' thresholds before any session is evaluated.
    ``strict`` (replay): a topic that cannot be read to its end stops the command; ``run``
    logs it and goes on with the thresholds the database has.
    """
    try:
        changes = await read_latest(settings)
    except (KafkaError, TimeoutError) as error:
        if strict:
            raise SettingsError(
                f"{ENV_PREFIX}THRESHOLDS_TOPIC: {settings.thresholds_topic} could not be read"
                f" to its end ({type(error).__name__}): the thresholds were not restored"
            ) from None
        log.warning("thresholds not restored from %s: %s", settings.thresholds_topic, error)
        return 0
    if not changes:
        return 0
    async with pool.acquire() as connection:
        applied = await thresholds_sql.apply_changes(connection, changes, "topic")
    if applied:
        log.info(
            "restored %d organization(s)' thresholds from %s", applied, settings.thresholds_topic
        )
    return applied
