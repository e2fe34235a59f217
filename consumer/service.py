"""Assembling the running service: pool, clients, engine, publisher, health; and tearing down.

The CLI calls :func:`run_service`; tests may await it directly with ``install_signals=False``
and their own ``stop`` event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from aiokafka.errors import KafkaError

from consumer.faults import FaultInjector
from consumer.ops.health import HealthServer
from consumer.ops.metrics import Metrics
from consumer.settings import ENV_PREFIX, Settings, SettingsError
from consumer.store.errors import StoreUnavailable
from consumer.store.migrate import ensure_schema
from consumer.store.postgres import BatchOptions, connect_pool
from consumer.stream.decode import ACTIVITY_EVENTS, PREFERENCE_EVENTS
from consumer.stream.engine import Engine
from consumer.stream.kafka import make_consumer, make_producer
from consumer.stream.outbox import Publisher
from consumer.stream.writer import BatchWriter

log = logging.getLogger(__name__)

BROKER_START_TIMEOUT_S = 15.0


def install_stop_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


async def open_pool(settings: Settings, *, max_size: int = 4) -> asyncpg.Pool:
    """The pool, or a :class:`SettingsError` naming the variable after the start timeout."""
    try:
        return await connect_pool(
            settings.require_database(),
            timeout_s=settings.database_connect_timeout_s,
            max_size=max_size,
        )
    except StoreUnavailable as error:
        raise SettingsError(
            f"{ENV_PREFIX}DATABASE_URL: database unreachable after "
            f"{settings.database_connect_timeout_s:g} s ({error})"
        ) from None


async def start_client(client: Any, settings: Settings) -> None:
    """Start an aiokafka client, retrying while the broker is still coming up."""
    deadline = time.monotonic() + BROKER_START_TIMEOUT_S
    while True:
        try:
            await client.start()
            return
        except KafkaError as error:
            with contextlib.suppress(Exception):
                await client.stop()
            if time.monotonic() > deadline:
                raise SettingsError(
                    f"{ENV_PREFIX}KAFKA_BOOTSTRAP_SERVERS: broker unreachable after "
                    f"{BROKER_START_TIMEOUT_S:g} s ({type(error).__name__})"
                ) from None
            await asyncio.sleep(0.5)


def batch_options(settings: Settings, *, suppress_before_ms: int | None = None) -> BatchOptions:
    return BatchOptions(
        tz=settings.tz,
        default_thresholds=settings.thresholds,
        grace_days=settings.notify_grace_days,
        suppress_before_ms=suppress_before_ms,
    )


class DatabaseProbe:
    """Pings the database every ``interval_s`` so /readyz knows even when no batch runs."""

    def __init__(self, pool: asyncpg.Pool, interval_s: float = 2.0) -> None:
        self._pool = pool
        self._interval_s = interval_s
        self.reachable = True

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                async with self._pool.acquire(timeout=2) as connection:
                    await connection.fetchval("SELECT 1", timeout=2)
                self.reachable = True
            except Exception:  # any failure means "not reachable now"
                self.reachable = False
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self._interval_s)


@asynccontextmanager
async def publisher_running(
    settings: Settings, metrics: Metrics, faults: FaultInjector, stop: asyncio.Event
) -> AsyncIterator[Publisher]:
    """A publisher task for the duration of the block, closed cleanly after it."""
    publisher = Publisher(settings, settings.require_database(), metrics, faults)
    own_stop = asyncio.Event()
    task = asyncio.ensure_future(publisher.run(own_stop))
    try:
        yield publisher
    finally:
        own_stop.set()
        publisher.wake()
        done, _ = await asyncio.wait({task}, timeout=settings.shutdown_timeout_s)
        if not done:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        await publisher.close()


async def run_service(
    settings: Settings, stop: asyncio.Event | None = None, *, install_signals: bool = True
) -> int:
    """``milestones run``: consume until SIGTERM/SIGINT (or ``stop``), then exit 0."""
    stop = stop or asyncio.Event()
    if install_signals:
        install_stop_signals(stop)
    settings.require_kafka()
    metrics = Metrics()
    faults = FaultInjector(settings.fault_point, settings.fault_after)
    pool = await open_pool(settings)
    try:
        async with pool.acquire() as connection:
            applied = await ensure_schema(connection)
        if applied:
            log.info("applied %d migration(s) at start", len(applied))
        await report_summary_drift(pool, settings)
        consumer = make_consumer(settings, group_id=settings.group_id)
        dlq_producer = make_producer(settings)
        await start_client(dlq_producer, settings)
        try:
            await start_client(consumer, settings)
            try:
                await _serve(settings, stop, pool, consumer, dlq_producer, metrics, faults)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(consumer.stop(), 10)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(dlq_producer.stop(), 10)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(pool.close(), 5)
    log.info("stopped")
    return 0


async def _serve(
    settings: Settings,
    stop: asyncio.Event,
    pool: asyncpg.Pool,
    consumer: Any,
    dlq_producer: Any,
    metrics: Metrics,
    faults: FaultInjector,
) -> None:
    probe = DatabaseProbe(pool)
    async with publisher_running(settings, metrics, faults, stop) as publisher:
        engine: Engine | None = None

        def on_unavailable(down: bool) -> None:
            if engine is not None:
                engine.set_paused(down)

        async def wait(seconds: float) -> None:
            if engine is not None:
                await engine.idle_poll(seconds)

        writer = BatchWriter(
            pool,
            batch_options(settings),
            metrics,
            counted_types=settings.counted_activity_types,
            conflict_retries=settings.transaction_retries,
            backoff_max_s=settings.retry_backoff_max_s,
            wait=wait,
            on_unavailable=on_unavailable,
        )
        engine = Engine(
            consumer,
            dlq_producer,
            writer,
            metrics,
            faults,
            accepts={
                settings.activity_topic: ACTIVITY_EVENTS,
                settings.preferences_topic: PREFERENCE_EVENTS,
            },
            dlq_topic=settings.dlq_topic,
            poll_timeout_ms=settings.poll_timeout_ms,
            max_records=settings.batch_max_records,
            revoke_deadline_s=min(settings.shutdown_timeout_s, settings.kafka_session_timeout_ms / 2000),
            after_commit=lambda pending: publisher.wake() if pending else None,
        )
        consumer.subscribe(list(settings.input_topics), listener=engine.listener)
        current = engine

        def ready() -> bool:
            return current.assigned_once and probe.reachable and not current.paused

        health = HealthServer(metrics, ready, settings.metrics_port)
        await health.start()
        probe_task = asyncio.ensure_future(probe.run(stop))
        log.info("consuming %s as group %s", ", ".join(settings.input_topics), settings.group_id)
        try:
            await engine.run(stop, shutdown_timeout_s=settings.shutdown_timeout_s)
        finally:
            probe_task.cancel()
            await health.stop()


async def report_summary_drift(pool: asyncpg.Pool, settings: Settings) -> None:
    """At start: say in the log when annual_summary disagrees with the ledger this year."""
    from consumer.commands.reconcile import summary_drift  # the reconcile command owns the SQL

    try:
        year = time_year(settings)
        async with pool.acquire() as connection:
            drift = await summary_drift(connection, year, limit=5)
    except Exception as error:  # a start-up check must never stop the service
        log.warning("could not compare annual_summary with the ledger: %s", error)
        return
    if drift:
        log.warning(
            "annual_summary differs from the ledger for %d mentor(s) in %d (e.g. %s);"
            " run `milestones reconcile --year %d --fix`",
            len(drift), year, drift[0].mentor_id, year,
        )
    else:
        log.info("annual_summary agrees with the ledger for %d", year)


def time_year(settings: Settings) -> int:
    from datetime import UTC, datetime

    return datetime.now(UTC).astimezone(settings.tz).year
