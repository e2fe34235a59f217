"""Step 1 of the publisher: the lease, one publisher at a time across every process.

The lease is a session-level advisory lock held on a dedicated connection, and every statement
that marks rows published runs on that connection, so a publisher that lost its connection
(and with it the lock) can mark nothing. The connection has a client-side command timeout: one
that went silent fails instead of hanging while it looks like the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import TypeVar

import asyncpg

from consumer.ops.metrics import Metrics
from consumer.store.errors import classify
from consumer.store.outbox_sql import PUBLISHER_LOCK_KEY, TRY_LEASE
from consumer.store.postgres import SERVER_SETTINGS

log = logging.getLogger(__name__)

LEASE_COMMAND_TIMEOUT_S = 30.0

# Every statement of the publisher finds rows by key (the acknowledged ids, what the read-back
# found) or walks the pending index in its order, whatever the table holds: those plans are
# right at any size. Left to itself the planner hashes or bitmap-scans the whole table per
# round, above all right after a sweep has recorded 160,000 rows in one transaction that the
# statistics do not know yet: 110 to 140 ms per statement instead of 30 to 75, every round.
KEYED_PLANS = {
    "enable_seqscan": "off",
    "enable_bitmapscan": "off",
    "enable_hashjoin": "off",
    "enable_mergejoin": "off",
}

_T = TypeVar("_T")


async def on_lease(call: Awaitable[_T]) -> _T:
    """Await a call on the lease connection, mapping its failures to the store's family."""
    try:
        return await call
    except Exception as error:
        mapped = classify(error)
        if mapped is None:
            raise
        raise mapped from error


class PublisherLease:
    """The lease connection and whether it holds the lock; :meth:`hold` takes or confirms it."""

    def __init__(self, dsn: str, metrics: Metrics) -> None:
        self._dsn = dsn
        self._metrics = metrics
        self._connection: asyncpg.Connection | None = None
        self.held = False
        # Set by the :meth:`hold` that took the lock: the caller reads the topic back before
        # its first send.
        self.taken_now = False

    @property
    def connection(self) -> asyncpg.Connection:
        """The lease connection; only while :attr:`held`."""
        assert self._connection is not None
        assert self.held
        return self._connection

    async def hold(self) -> bool:
        """True while this process holds the lease; False when another one does."""
        self.taken_now = False
        if self._connection is None or self._connection.is_closed():
            self.held = False
            self._connection = None
            # command_timeout: a connection that went silent (no reset) must fail, not hang
            # while it still looks like the lease.
            self._connection = await on_lease(asyncpg.connect(
                self._dsn, timeout=5, command_timeout=LEASE_COMMAND_TIMEOUT_S,
                # the pool's timeouts and custom plans, and plans by key
                server_settings={**SERVER_SETTINGS, **KEYED_PLANS},
            ))
        if self.held:
            return True
        connection: asyncpg.Connection = self._connection
        took = bool(await on_lease(connection.fetchval(TRY_LEASE, PUBLISHER_LOCK_KEY)))
        if took:
            log.info("publisher: lease taken; reading the topic back before sending")
            self.held = True
            self.taken_now = True
            self._metrics.set("milestones_publisher_leader", 1)
        return took

    async def drop(self) -> None:
        """Close the connection, and with it the lock (Postgres releases it with the session)."""
        self.held = False
        self._metrics.set("milestones_publisher_leader", 0)
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), 2)
            if not connection.is_closed():
                connection.terminate()
