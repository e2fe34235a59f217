"""The composition root: what ``run`` and every command build from the settings.

Pools, Kafka clients (through the security-aware options of ``consumer/stream/kafka.py``), the
batch writer, the engine and the publisher are assembled here and nowhere else, so a command
differs from ``run`` only in what it does with them. Commands parse, call and print; the SQL
they need is in ``consumer/store``. This module imports nothing from ``consumer.commands``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar
from uuid import UUID

import asyncpg

from consumer.domain.batch import Event
from consumer.faults import FaultInjector
from consumer.ops.metrics import Metrics
from consumer.settings import ENV_PREFIX, Settings, SettingsError
from consumer.store.errors import DatabaseRefused, StoreUnavailable
from consumer.store.migrate import ensure_schema, pending_migrations
from consumer.store.outbox_sql import still_pending
from consumer.store.postgres import BatchOptions, PostgresBatchStore, connect_pool
from consumer.stream.decode import ACTIVITY_EVENTS, PREFERENCE_EVENTS
from consumer.stream.engine import Engine
from consumer.stream.kafka import make_consumer, make_producer, start_client, verify_kafka_access
from consumer.stream.outbox import Publisher
from consumer.stream.teardown import within
from consumer.stream.writer import BatchWriter, Wait

log = logging.getLogger(__name__)

_Writer = TypeVar("_Writer", bound=BatchWriter)
_Engine = TypeVar("_Engine", bound=Engine)


def install_stop_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


class ShutdownClock:
    """Counts down ``MILESTONES_SHUTDOWN_TIMEOUT_S`` from the moment ``stop`` is set.

    Every step of the teardown waits at most :meth:`left` (and its own cap), so the sum of the
    steps cannot exceed the timeout however the broker or the database behaves.
    """

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._stopped_at: float | None = None

    async def watch(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._stopped_at = time.monotonic()

    def left(self, cap_s: float | None = None) -> float:
        if self._stopped_at is None:
            left = self.timeout_s
        else:
            left = max(0.0, self._stopped_at + self.timeout_s - time.monotonic())
        return left if cap_s is None else min(left, cap_s)


# --- Postgres ---------------------------------------------------------------------------------
async def open_pool(
    settings: Settings, *, max_size: int = 4, statement_timeouts: bool = True
) -> asyncpg.Pool:
    """The pool, or a :class:`SettingsError` naming the variable after the start timeout."""
    try:
        return await connect_pool(
            settings.require_database(),
            timeout_s=settings.database_connect_timeout_s,
            # One connection per write lane, plus the probe's and a spare.
            max_size=max(max_size, settings.batch_lanes + 2),
            statement_timeouts=statement_timeouts,
        )
    except DatabaseRefused as error:
        raise SettingsError(f"{ENV_PREFIX}DATABASE_URL: {error}") from None
    except StoreUnavailable as error:
        raise SettingsError(
            f"{ENV_PREFIX}DATABASE_URL: database unreachable after "
            f"{settings.database_connect_timeout_s:g} s ({error})"
        ) from None


@asynccontextmanager
async def command_pool(
    settings: Settings, *, max_size: int = 4, migrate: bool = True,
    statement_timeouts: bool = True,
) -> AsyncIterator[asyncpg.Pool]:
    """A pool on an up-to-date schema: migrated when this role may, as ``run`` does, or, with
    ``migrate`` False (commands that only read, and dry runs, which change nothing), checked:
    a schema that is behind is a :class:`SettingsError` (one line, exit 2) saying to run
    ``migrate``, not a traceback from the first query that meets a missing table.

    ``statement_timeouts`` False for commands whose single statements may run long.
    """
    pool = await open_pool(settings, max_size=max_size, statement_timeouts=statement_timeouts)
    try:
        async with pool.acquire() as connection:
            if migrate:
                await ensure_schema(connection)
            elif pending := await pending_migrations(connection):
                raise SettingsError(
                    f"{ENV_PREFIX}DATABASE_URL: the database lacks {len(pending)} of the"
                    " engine's schema migrations: run `milestones migrate` first"
                )
        yield pool
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(pool.close(), 5)


# --- Kafka clients ------------------------------------------------------------------------------
async def started_consumer(settings: Settings, *, group_id: str | None) -> Any:
    """A consumer of the input topics' settings, started (retried while the broker comes up)."""
    consumer = make_consumer(settings, group_id=group_id)
    await start_client(consumer, settings)
    return consumer


async def started_producer(settings: Settings) -> Any:
    """The dead-letter producer, started (retried while the broker comes up)."""
    producer = make_producer(settings)
    await start_client(producer, settings)
    return producer


# --- the engine -------------------------------------------------------------------------------
def batch_options(settings: Settings, *, suppress_before_ms: int | None = None) -> BatchOptions:
    return BatchOptions(
        tz=settings.tz,
        default_thresholds=settings.thresholds,
        grace_days=settings.notify_grace_days,
        suppress_before_ms=suppress_before_ms,
    )


def batch_writer(
    settings: Settings,
    pool: asyncpg.Pool,
    metrics: Metrics,
    *,
    options: BatchOptions | None = None,
    wait: Wait | None = None,
    on_unavailable: Callable[[bool], None] | None = None,
    writer_class: type[_Writer],
) -> _Writer:
    """The batch writer (``writer_class``: replay counts what it wrote) with the settings'
    retries, back-off cap and lanes."""
    return writer_class(
        PostgresBatchStore(pool),
        options or batch_options(settings),
        metrics,
        counted_types=settings.counted_activity_types,
        conflict_retries=settings.transaction_retries,
        backoff_max_s=settings.retry_backoff_max_s,
        wait=wait,
        on_unavailable=on_unavailable,
        lanes=settings.batch_lanes,
    )


def engine_for(
    settings: Settings,
    consumer: Any,
    dead_letters: Any,
    writer: BatchWriter,
    metrics: Metrics,
    faults: FaultInjector,
    *,
    after_commit: Callable[[int], None],
    accepts: Mapping[str, tuple[type[Event], ...]] | None = None,
    engine_class: type[_Engine],
    **extra: Any,
) -> _Engine:
    """The consume loop over the settings' input topics (or ``accepts``)."""
    return engine_class(
        consumer,
        dead_letters,
        writer,
        metrics,
        faults,
        accepts=accepts or {
            settings.activity_topic: ACTIVITY_EVENTS,
            settings.preferences_topic: PREFERENCE_EVENTS,
        },
        dlq_topic=settings.dlq_topic,
        poll_timeout_ms=settings.poll_timeout_ms,
        max_records=settings.batch_max_records,
        revoke_deadline_s=min(settings.shutdown_timeout_s, settings.kafka_session_timeout_ms / 2000),
        after_commit=after_commit,
        **extra,
    )


@asynccontextmanager
async def publisher_running(
    settings: Settings,
    metrics: Metrics,
    faults: FaultInjector,
    clock: ShutdownClock | None = None,
) -> AsyncIterator[Publisher]:
    """A publisher task for the duration of the block, closed after it within the clock.

    It stops when the block ends, not on the caller's stop event: the batch in hand may still
    commit during the shutdown, and its notifications get this last round."""
    clock = clock or ShutdownClock(settings.shutdown_timeout_s)
    await verify_kafka_access(settings)  # refused credentials: the command stops, exit 2
    publisher = Publisher(settings, settings.require_database(), metrics, faults)
    own_stop = asyncio.Event()
    task = asyncio.ensure_future(publisher.run(own_stop))
    try:
        yield publisher
    finally:
        own_stop.set()
        publisher.wake()
        # A send in flight may finish and be marked; one cut short is read back next time.
        await within(task, clock.left(cap_s=5.0), "the publisher's last round")
        await within(publisher.close(), clock.left(cap_s=5.0), "closing the publisher")


# Tracked (container) objects a batch keeps alive per record: the validated model, its dict
# and field set, four UUIDs, the Kafka record, envelope and rows; counted with gc.get_count().
_OBJECTS_PER_RECORD = 20


def tune_garbage_collector(batch_max_records: int) -> None:
    """Freeze what start-up allocated, and keep the young generation larger than what the
    batches in flight hold alive.

    The engine's per-event objects are acyclic and freed by reference counting, so the cyclic
    collector only costs time. A young collection walks every live object allocated since the
    last one: with a threshold below what two batches in flight (the one being written and the
    prefetched one) hold, every batch pays a collection of about 16 ms that walks the whole
    batch and finds nothing. Measured on 300,000 events (py-spy, then ``gc.callbacks``, rounds
    alternating): below, 58 young collections took 0.93 s of an 8 s run, 37k events/s end to
    end; above the in-flight objects, none ran, 42-44k events/s.
    Cyclic garbage, rare here, is still collected every ``threshold`` net allocations.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(max(50_000, 2 * _OBJECTS_PER_RECORD * batch_max_records), 20, 100)


# How long a command waits for the notifications it recorded to be sent before it leaves them
# to the running service (they stay pending in the outbox: nothing is lost either way).
PUBLISH_WAIT_S = 60.0


async def publish_and_wait(
    settings: Settings, pool: asyncpg.Pool, ids: Sequence[UUID], *, timeout_s: float = PUBLISH_WAIT_S
) -> int:
    """Run a publisher until none of ``ids`` is pending (or the timeout); return those left.

    The publisher lease is shared by every process: when ``run`` holds it, ours waits and the
    service sends them; either way this returns once they have left ``pending``.
    """
    if not ids or not await still_pending(pool, ids):  # the running service was quicker
        return 0
    async with publisher_running(settings, Metrics(), FaultInjector(None)) as publisher:
        return await wait_until_sent(pool, ids, publisher, timeout_s=timeout_s)


async def wait_until_sent(
    pool: asyncpg.Pool, ids: Sequence[UUID], publisher: Publisher, *, timeout_s: float = PUBLISH_WAIT_S
) -> int:
    """Wake ``publisher`` until none of ``ids`` is pending or the timeout; return those left."""
    deadline = time.monotonic() + timeout_s
    left = await still_pending(pool, ids) if ids else 0
    while left and time.monotonic() < deadline:
        publisher.wake()
        # The check looks up every id still in the list: with 160,000 of them, a check every
        # 0.2 s would take half the time the publisher (same event loop and database) needs.
        await asyncio.sleep(min(2.0, 0.2 + left / 50_000))
        left = await still_pending(pool, ids)
    if left:
        log.warning(
            "%d notification(s) still pending after %.0f s; the running service will send them",
            left, timeout_s,
        )
    return left
