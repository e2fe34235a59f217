"""Assembling the running service: pool, clients, engine, publisher, health; and tearing down.

The CLI calls :func:`run_service`; tests may await it directly with ``install_signals=False``
and their own ``stop`` event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from datetime import UTC, datetime
from typing import Any

import asyncpg

from consumer.domain.calendar import session_year
from consumer.faults import FaultInjector
from consumer.ops.health import HealthServer
from consumer.ops.metrics import Metrics
from consumer.ops.probes import BrokerContact, PendingGauge
from consumer.retry import sleep_unless
from consumer.runtime import (
    ShutdownClock,
    batch_writer,
    engine_for,
    install_stop_signals,
    open_pool,
    publisher_running,
    started_consumer,
    started_producer,
    tune_garbage_collector,
)
from consumer.settings import ENV_PREFIX, Settings, SettingsError
from consumer.store.catalog import estimated_rows
from consumer.store.migrate import ensure_schema
from consumer.store.reconcile_sql import startup_drift
from consumer.store.status_sql import PING
from consumer.stream.engine import Engine
from consumer.stream.teardown import within
from consumer.stream.thresholds_topic import restore_thresholds
from consumer.stream.writer import BatchWriter

log = logging.getLogger(__name__)

# Of MILESTONES_SHUTDOWN_TIMEOUT_S, the share the batch in hand may use; the rest is for
# leaving the group and closing clients, so that the whole shutdown fits in the timeout.
BATCH_SHARE_OF_SHUTDOWN = 0.7


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
                    await connection.fetchval(PING, timeout=2)
                self.reachable = True
            except Exception:  # any failure means "not reachable now"
                self.reachable = False
            await sleep_unless(stop, self._interval_s)


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
        dlq_producer = await started_producer(settings)
        try:
            consumer = await started_consumer(settings, group_id=settings.group_id)
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
    async with publisher_running(settings, metrics, faults, clock) as publisher:
        engine: Engine | None = None

        def on_unavailable(down: bool) -> None:
            if engine is not None:
                engine.set_paused(down)

        async def wait(seconds: float) -> None:
            if engine is not None:
                await engine.idle_poll(seconds)

        writer = batch_writer(
            settings, pool, metrics, wait=wait, on_unavailable=on_unavailable,
            writer_class=BatchWriter,
        )
        engine = engine_for(
            settings, consumer, dlq_producer, writer, metrics, faults,
            after_commit=lambda pending: publisher.wake() if pending else None,
            engine_class=Engine,
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
