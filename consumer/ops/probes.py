"""Background probes of ``run``: is the broker still answering, and how old is the outbox.

Both run as their own small tasks beside the consume loop, so the per-batch path does no extra
work for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import asyncpg

from consumer.ops.metrics import Metrics
from consumer.retry import sleep_unless
from consumer.store.status_sql import PENDING_GAUGE

log = logging.getLogger(__name__)



class BrokerContact:
    """When the broker last answered this process's consumer, for /readyz.

    aiokafka keeps polling a frozen broker without complaint (``getmany`` simply returns
    nothing), so readiness needs its own evidence. The cheapest comes first: the newest fetch
    response of an owned partition (``last_poll_timestamp``, set by every fetch response,
    with records or without; the consumer fetches every ``fetch_max_wait_ms`` while it owns a
    partition that is not paused). Only when no fetch answered lately (nothing owned, fetching
    paused, or the broker silent) is a metadata request sent, bounded. The broker counts as
    reached while its last answer is at most ``limit_s`` old (the session timeout: past it, the
    group has most likely given this member's partitions to another).
    """

    def __init__(self, consumer: Any, metrics: Metrics, *, limit_s: float) -> None:
        self._consumer = consumer
        self._metrics = metrics
        self._limit_s = limit_s
        # Checked at least four times per limit, and probed after two checks without a fetch
        # answer, so that an idle member (nothing to fetch) stays well within the limit.
        self._interval_s = min(1.0, limit_s / 4)
        self._probe_timeout_s = max(self._interval_s, limit_s / 2)
        self._contact = time.monotonic()  # start-up joined the group: the broker answered
        self._silent = False

    def age_s(self) -> float:
        return time.monotonic() - self._contact

    def reached(self) -> bool:
        return self.age_s() <= self._limit_s

    def _newest_fetch(self) -> float:
        """The newest fetch response of an owned partition, on the monotonic clock (0: none)."""
        newest_ms = 0
        with contextlib.suppress(AssertionError):  # a rebalance took the partition meanwhile
            for tp in self._consumer.assignment():
                newest_ms = max(newest_ms, self._consumer.last_poll_timestamp(tp) or 0)
        if not newest_ms:
            return 0.0
        # aiokafka stamps with time.time(): convert, so a wall clock step cannot fake contact.
        return time.monotonic() - max(0.0, time.time() - newest_ms / 1000)

    async def check(self) -> None:
        self._contact = max(self._contact, self._newest_fetch())
        if self.age_s() > 2 * self._interval_s:
            try:
                await asyncio.wait_for(self._consumer.topics(), self._probe_timeout_s)
            except Exception as error:  # any failure means "not reached now"
                log.debug("broker probe failed: %s", type(error).__name__)
            else:
                self._contact = time.monotonic()
        age_s = self.age_s()
        self._metrics.set("milestones_broker_contact_age_seconds", round(age_s, 3))
        if self._silent != (not self.reached()):
            self._silent = not self._silent
            if self._silent:
                log.warning("broker not reached for %.1f s (session timeout %.1f s): not ready",
                            age_s, self._limit_s)
            else:
                log.info("broker reached again")

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.check()
            await sleep_unless(stop, self._interval_s)


class PendingGauge:
    """Sets the pending-notification gauges every ``interval_s`` with one small query.

    Every ``run`` process reports it (not only the publisher's leader): the alert on an old
    pending row must fire precisely when no process publishes.
    """

    def __init__(self, pool: asyncpg.Pool, metrics: Metrics, interval_s: float = 5.0) -> None:
        self._pool = pool
        self._metrics = metrics
        self._interval_s = interval_s

    async def check(self) -> None:
        try:
            async with self._pool.acquire(timeout=2) as connection:
                row = await connection.fetchrow(PENDING_GAUGE, timeout=5)
        except Exception as error:  # the database probe and the batches report outages
            log.debug("pending-notification gauge not updated: %s", error)
            return
        assert row is not None
        self._metrics.set("milestones_pending_notifications", row["pending"])
        self._metrics.set("milestones_oldest_pending_age_seconds", row["oldest_age_s"])

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.check()
            await sleep_unless(stop, self._interval_s)
