"""Assembling the running service: pool, clients, engine, publisher, health; and tearing down.

The CLI calls :func:`run_service`; tests may await it directly with ``install_signals=False``
and their own ``stop`` event.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import asyncpg
from aiokafka.errors import KafkaError

from consumer.domain.calendar import session_year
from consumer.faults import FaultInjector
from consumer.ops.health import HealthServer
from consumer.ops.metrics import Metrics
from consumer.ops.probes import BrokerContact, PendingGauge
from consumer.retry import Backoff
from consumer.settings import ENV_PREFIX, Settings, SettingsError
from consumer.store.catalog import estimated_rows
from consumer.store.errors import DatabaseRefused, StoreUnavailable
from consumer.store.migrate import ensure_schema
from consumer.store.postgres import BatchOptions, connect_pool
from consumer.store.reconcile_sql import startup_drift
from consumer.stream.decode import ACTIVITY_EVENTS, PREFERENCE_EVENTS
from consumer.stream.engine import Engine
from consumer.stream.kafka import make_consumer, make_producer, started, verify_kafka_access
from consumer.stream.outbox import Publisher
from consumer.stream.teardown import within
from consumer.stream.thresholds_topic import restore_thresholds
from consumer.stream.writer import BatchWriter

log = logging.getLogger(__name__)

BROKER_START_TIMEOUT_S = 15.0


# Of MILESTONES_SHUTDOWN_TIMEOUT_S, the share the batch in hand may use; the rest is for
# leaving the group and closing clients, so that the whole shutdown fits in the timeout.
BATCH_SHARE_OF_SHUTDOWN = 0.7


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


def arm_exit_watchdog(timeout_s: float) -> None:
    """Last resort of the ``run`` process: exit 0 when the shutdown overruns its timeout.

    A daemon thread, so that it fires even if the event loop is stuck. Exiting there leaves
    nothing a restart cannot finish: an uncommitted batch is redone, a sent but unmarked
    notification is found by the next publisher's read-back.
    """

    def _exit() -> None:
        log.warning("shutdown overran %.1f s: exiting now", timeout_s)
        for handler in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        os._exit(0)

    timer = threading.Timer(max(0.1, timeout_s - 0.25), _exit)
    timer.daemon = True
    timer.start()


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


async def start_client(client: Any, settings: Settings) -> None:
    """Start an aiokafka client, retrying while the broker is still coming up; refused
    credentials or an untrusted certificate stop at once (:class:`KafkaAccessRefused`)."""
    backoff = Backoff(0.5, 0.5, jitter=False, give_up_after_s=BROKER_START_TIMEOUT_S)
    while True:
        try:
            await started(client, settings)
            return
        except KafkaError as error:
            if not await backoff.wait():
                raise SettingsError(
                    f"{ENV_PREFIX}KAFKA_BOOTSTRAP_SERVERS: broker unreachable after "
                    f"{BROKER_START_TIMEOUT_S:g} s ({type(error).__name__})"
                ) from None


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
    settings: Settings,
    metrics: Metrics,
    faults: FaultInjector,
    stop: asyncio.Event,
    clock: ShutdownClock | None = None,
) -> AsyncIterator[Publisher]:
    """A publisher task for the duration of the block, closed after it within the clock."""
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


async def run_service(
    settings: Settings, stop: asyncio.Event | None = None, *, install_signals: bool = True,
    metrics: Metrics | None = None,
) -> int:
    """``milestones run``: consume until SIGTERM/SIGINT (or ``stop``), then exit 0.

    ``metrics``: a registry the caller reads in-process (the demo's view); a new one otherwise.
    """
    stop = stop or asyncio.Event()
    if install_signals:
        install_stop_signals(stop)
    settings.require_kafka()
    clock = ShutdownClock(settings.shutdown_timeout_s)
    clock_task = asyncio.ensure_future(clock.watch(stop))
    if install_signals:
        clock_task.add_done_callback(
            lambda task: None if task.cancelled() else arm_exit_watchdog(settings.shutdown_timeout_s)
        )
    try:
        return await _run_service(settings, stop, clock, metrics or Metrics())
    finally:
        clock_task.cancel()


async def _run_service(
    settings: Settings, stop: asyncio.Event, clock: ShutdownClock, metrics: Metrics
) -> int:
    faults = FaultInjector(settings.fault_point, settings.fault_after)
    # Everything local is checked before the consumer group is joined (the port here, the
    # database and its schema next): a member that joins and then fails makes the live
    # members rebalance for nothing.
    health = HealthServer(metrics, lambda: False, settings.metrics_port)
    await bind_health(health, settings)
    try:
        return await _run_with_health(settings, stop, clock, metrics, faults, health)
    finally:
        await health.stop()


async def bind_health(health: HealthServer, settings: Settings) -> None:
    """Bind the metrics port, or stop with a :class:`SettingsError` naming the variable."""
    try:
        await health.start()
    except OSError as error:
        raise SettingsError(
            f"{ENV_PREFIX}METRICS_PORT: cannot listen on port {settings.metrics_port}"
            f" ({error.strerror or error}): choose a free port, or 0 to turn the endpoints off"
        ) from None


async def _run_with_health(
    settings: Settings, stop: asyncio.Event, clock: ShutdownClock, metrics: Metrics,
    faults: FaultInjector, health: HealthServer,
) -> int:
    pool = await open_pool(settings)
    drift_check: asyncio.Future[None] | None = None
    try:
        async with pool.acquire() as connection:
            applied = await ensure_schema(connection)
        if applied:
            log.info("applied %d migration(s) at start", len(applied))
        await restore_thresholds(settings, pool, strict=False)  # before joining the group
        # In the background and bounded in time: without an index on (mentor, year) the
        # recount is a scan of the ledger, and consuming should not wait for a log line.
        drift_check = asyncio.ensure_future(report_summary_drift(pool, settings))
        dlq_producer = make_producer(settings)
        await start_client(dlq_producer, settings)
        try:
            consumer = make_consumer(settings, group_id=settings.group_id)
            await start_client(consumer, settings)
            tune_garbage_collector(settings.batch_max_records)
            try:
                await _serve(
                    settings, stop, clock, pool, consumer, dlq_producer, metrics, faults, health
                )
            finally:
                # Leaves the group, so the partitions move at once instead of after the
                # session timeout; nothing is committed here.
                await within(consumer.stop(), clock.left(cap_s=10.0), "leaving the group")
        finally:
            await within(dlq_producer.stop(), clock.left(cap_s=10.0), "stopping the producer")
    finally:
        if drift_check is not None:
            drift_check.cancel()
        if not await within(pool.close(), clock.left(cap_s=5.0), "closing the pool"):
            pool.terminate()
    log.info("stopped")
    return 0


async def _serve(
    settings: Settings,
    stop: asyncio.Event,
    clock: ShutdownClock,
    pool: asyncpg.Pool,
    consumer: Any,
    dlq_producer: Any,
    metrics: Metrics,
    faults: FaultInjector,
    health: HealthServer,
) -> None:
    probe = DatabaseProbe(pool)
    async with publisher_running(settings, metrics, faults, stop, clock) as publisher:
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
            lanes=settings.batch_lanes,
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
        broker = BrokerContact(consumer, metrics, limit_s=settings.kafka_session_timeout_ms / 1000)

        def ready() -> bool:
            return (current.assigned_once and probe.reachable and not current.paused
                    and broker.reached())

        health.ready = ready
        probe_tasks = [
            asyncio.ensure_future(task.run(stop))
            for task in (probe, broker, PendingGauge(pool, metrics))
        ]
        log.info("consuming %s as group %s", ", ".join(settings.input_topics), settings.group_id)
        try:
            await engine.run(
                stop, shutdown_timeout_s=settings.shutdown_timeout_s * BATCH_SHARE_OF_SHUTDOWN
            )
        finally:
            health.ready = lambda: False  # stopping: no longer a member to route traffic to
            for task in probe_tasks:
                task.cancel()


# Tracked (container) objects a batch keeps alive per record: the validated model, its dict
# and field set, four UUIDs, the Kafka record, envelope and rows; counted with gc.get_count().
_OBJECTS_PER_RECORD = 20


def tune_garbage_collector(batch_max_records: int) -> None:
    """Freeze what start-up allocated, and keep the young generation larger than what the
    batches in flight hold alive.

    The engine's per-event objects are acyclic and freed by reference counting, so the cyclic
    collector only costs time. A young collection walks every live object allocated since the
    last one: with a threshold below what two batches in flight (the one being written and the
    prefetched one) hold, every batch paid a collection of about 16 ms that walked the whole
    batch and found nothing. Measured on 300,000 events (py-spy, then ``gc.callbacks``):
    58 young collections took 0.93 s of an 8 s run; with the threshold above the in-flight
    objects, none ran, and end to end went from 37k to 42-44k events/s (alternating rounds).
    Cyclic garbage, rare here, is still collected every ``threshold`` net allocations.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(max(50_000, 2 * _OBJECTS_PER_RECORD * batch_max_records), 20, 100)


# The start-up drift check may spend this long scanning the ledger (see startup_drift).
STARTUP_DRIFT_BUDGET_S = 5.0


async def report_summary_drift(
    pool: asyncpg.Pool, settings: Settings, *, budget_s: float = STARTUP_DRIFT_BUDGET_S
) -> None:
    """At start, in the background: say in the log when annual_summary disagrees with the
    ledger this year. Bounded: on a ledger too large to recount within ``budget_s`` it says
    so and leaves the full check to ``milestones reconcile``."""
    year = session_year(datetime.now(UTC), settings.tz)  # this year where the mentors live
    try:
        found = await startup_drift(pool, year, budget_s=budget_s)
        if found is None:
            rows = await estimated_rows(pool, "activity_ledger")
    except Exception as error:  # a start-up check must never stop the service
        log.warning("could not compare annual_summary with the ledger: %s", error)
        return
    if found is None:
        log.info(
            "annual_summary not compared with the ledger: the recount of %d did not finish"
            " within %g s (ledger of about %s rows); `milestones reconcile --year %d` compares"
            " it in full", year, budget_s, "?" if rows is None else f"{rows:,}", year,
        )
    elif found.differing:
        log.warning(
            "annual_summary differs from the ledger for %d mentor(s) in %d (e.g. %s);"
            " run `milestones reconcile --year %d --fix`",
            found.differing, year, found.examples[0].mentor_id, year,
        )
    else:
        log.info("annual_summary agrees with the ledger for %d", year)
