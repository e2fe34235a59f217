"""Writing decoded envelopes to Postgres: retries, backoff, and isolating refused messages.

Kept apart from the consume loop so that tests and ``replay`` drive the same path with the
real database and no broker. The store is the port of :mod:`consumer.store.port`: Postgres in
the service, the in-memory adapter in tests of the loop.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from uuid import UUID

import asyncpg

from consumer.domain.batch import Envelope, plan_batch, split_lanes
from consumer.ops.logs import fields
from consumer.ops.metrics import Metrics
from consumer.retry import Backoff
from consumer.store.errors import RefusedContent, StoreConflict, StoreUnavailable, classify
from consumer.store.port import BatchOptions, BatchResult, BatchStore
from consumer.stream.decode import exception_reason
from schemas.events import PreferencesChanged

log = logging.getLogger(__name__)

Wait = Callable[[float], Awaitable[None]]

# How often the closed-years watermark (``milestones prune``) is read again; the database's
# guard trigger covers the seconds in between.
CLOSED_YEARS_REFRESH_S = 30.0


@dataclass(slots=True)
class WriteOutcome:
    """What one batch did; ``refused`` are the envelopes the database would not take."""

    results: list[BatchResult] = field(default_factory=list)
    # (envelope, one-line reason, reason kind): dead-lettered by the engine
    refused: list[tuple[Envelope, str, str]] = field(default_factory=list)

    @property
    def pending(self) -> int:
        return sum(result.pending for result in self.results)


class Unprocessable(Exception):
    """Writing a batch raised something other than the database being away or refusing."""


class BatchWriter:
    def __init__(
        self,
        store: BatchStore,
        options: BatchOptions,
        metrics: Metrics,
        *,
        counted_types: frozenset[str] | None,
        conflict_retries: int = 5,
        backoff_max_s: float = 5.0,
        wait: Wait | None = None,
        on_unavailable: Callable[[bool], None] | None = None,
        lanes: int = 1,
    ) -> None:
        self._store = store
        self._options = options
        self._metrics = metrics
        self._counted_types = counted_types
        self._conflict_retries = conflict_retries
        self._backoff_max_s = backoff_max_s
        self._wait: Wait = wait or asyncio.sleep
        self._on_unavailable = on_unavailable or (lambda _: None)
        self._lanes = lanes
        # Lanes back off at the same time during an outage; one waits (and polls) at a time.
        self._wait_lock = asyncio.Lock()
        self.closed_through_year: int | None = None
        self._invalid_logged_at: dict[UUID, float] = {}
        self._closed_read_at = float("-inf")

    async def write(self, envelopes: Sequence[Envelope]) -> WriteOutcome:
        """Write the batch; return only once it is committed (or its offenders isolated).

        With one lane the batch is one transaction. With more, the batch's preference changes
        are committed first (they apply before its activities), then its partitions are
        written in concurrent transactions, one per lane, on separate connections: a single
        transaction stream keeps one Postgres backend busy and leaves the other core idle.
        """
        await self._refresh_closed_years()
        outcome = WriteOutcome()
        if self._lanes <= 1:
            await self._write(list(envelopes), outcome)
            return outcome
        # type(), not isinstance: a pydantic model's isinstance goes through ABCMeta
        preferences = [e for e in envelopes if type(e.event) is PreferencesChanged]
        activities = [e for e in envelopes if type(e.event) is not PreferencesChanged]
        await self._write(preferences, outcome)
        lanes = split_lanes(activities, self._lanes)
        if len(lanes) == 1:
            await self._write(lanes[0], outcome)
        elif lanes:
            await asyncio.gather(*(self._write(lane, outcome) for lane in lanes))
        return outcome

    async def _write(self, envelopes: list[Envelope], outcome: WriteOutcome) -> None:
        if not envelopes:
            return
        try:
            outcome.results.append(await self._commit_with_retries(envelopes, outcome))
        except (RefusedContent, Unprocessable) as error:
            if len(envelopes) == 1:
                envelope = envelopes[0]
                where = _where(envelope)
                if isinstance(error, RefusedContent):
                    log.warning("database refused the message at %s[%d]@%d: %s", envelope.topic,
                                envelope.partition, envelope.offset, error, extra=where)
                    reason, kind = f"database refused the message: {error}", "refused_by_database"
                else:
                    log.error("isolated a message whose batch raised: %s", error,
                              exc_info=error.__cause__, extra=where)
                    reason, kind = str(error), "unprocessable"
                outcome.refused.append((envelope, reason, kind))
                return
            # Halve until the offender is alone; order is kept, and each half is a batch.
            middle = len(envelopes) // 2
            await self._write(envelopes[:middle], outcome)
            await self._write(envelopes[middle:], outcome)

    async def _refresh_closed_years(self) -> None:
        """Read the watermark at the first batch and every 30 s; keep the old one on failure.

        Best effort and bounded (2 s): during an outage the batch meets the error itself.
        """
        if time.monotonic() - self._closed_read_at < CLOSED_YEARS_REFRESH_S:
            return
        self._closed_read_at = time.monotonic()
        try:
            self.closed_through_year = await asyncio.wait_for(
                self._store.closed_through_year(), 2.0
            )
        except Exception as error:
            log.debug("could not read the closed-years watermark: %s", error)

    async def _commit_with_retries(
        self, envelopes: list[Envelope], outcome: WriteOutcome
    ) -> BatchResult:
        """Plan and write ``envelopes``; retry while the database is away or conflicts.

        Raises :class:`RefusedContent` when the database refuses a value, and
        :class:`Unprocessable` when writing raised anything else that is not the database
        being away (the evaluator meeting a value it cannot handle, say): both make
        :meth:`_write` halve the batch until the offender is alone. An asyncpg error the store
        does not classify (a missing table, a permission) concerns every record, so it stops
        the engine instead of dead-lettering the stream.
        """
        plan = plan_batch(
            envelopes,
            tz=self._options.tz,
            counted_types=self._counted_types,
            closed_through_year=self.closed_through_year,
        )
        conflicts = 0
        backoff = Backoff(0.1, self._backoff_max_s)
        while True:
            started = time.perf_counter()
            try:
                result = await self._store.apply(plan, self._options)
            except RefusedContent:
                raise
            except Exception as error:
                mapped = classify(error)
                if isinstance(mapped, StoreConflict) and conflicts < self._conflict_retries:
                    conflicts += 1
                    self._metrics.inc("milestones_batch_retries_total", cause="conflict")
                    log.info("batch transaction conflicted (%s); retrying", mapped)
                    # Not the outage back-off: the other transaction ends within milliseconds,
                    # so a short pause, spread at random over a range that grows per conflict.
                    await asyncio.sleep(random.uniform(0, 0.05 * conflicts))
                    continue
                if mapped is None and not isinstance(error, asyncpg.PostgresError):
                    raise Unprocessable(exception_reason(error)) from error
                if not isinstance(mapped, StoreUnavailable | StoreConflict):
                    raise
                self._metrics.inc("milestones_batch_retries_total", cause="unavailable")
                self._on_unavailable(True)
                log.warning("database unavailable (%s); retrying in %.1f s", mapped,
                            backoff.step_s)
                async with self._wait_lock:
                    await backoff.wait(sleep=self._wait)
                conflicts = 0
                continue
            self._on_unavailable(False)
            took = time.perf_counter() - started
            self._metrics.set("milestones_last_batch_seconds", took)
            self._metrics.observe("milestones_batch_duration_seconds", took)
            self._record_metrics(result)
            # Only now, with the rest committed: a retry of a refused batch plans again.
            for envelope, raised in plan.unprocessable:
                log.error("isolated a message whose planning raised: %s",
                          exception_reason(raised), exc_info=raised, extra=_where(envelope))
                outcome.refused.append((envelope, exception_reason(raised), "unprocessable"))
            return result

    def _record_metrics(self, result: BatchResult) -> None:
        metrics = self._metrics
        metrics.inc("milestones_batches_total")
        for outcome, number in result.outcomes.items():
            if number >= 0:
                metrics.inc("milestones_events_total", number, outcome=outcome)
            else:  # an accounting bug must not stop a committed batch
                log.error("negative count %d of outcome %s", number, outcome)
        if result.invalid_thresholds:
            self._report_invalid_thresholds(result.invalid_thresholds)
        if result.conflicts:
            log.warning("%d activity.logged conflicted with an earlier log of the same id",
                        result.conflicts)
        for record in result.records:
            metrics.inc("milestones_records_total", status=record.status)
            log.info(
                "milestone %d recorded for mentor %s year %d (%s)",
                record.milestone_value, record.mentor_id, record.year, record.status,
                extra=fields(mentor_id=record.mentor_id, activity_id=record.activity_id,
                             notification_id=record.id),
            )

    def _report_invalid_thresholds(self, organizations: set[UUID]) -> None:
        """Counted per batch and organization; logged once a minute per organization."""
        self._metrics.inc("milestones_threshold_rows_invalid_total", len(organizations))
        now = time.monotonic()
        for organization_id in sorted(organizations):
            if now - self._invalid_logged_at.get(organization_id, float("-inf")) >= 60:
                self._invalid_logged_at[organization_id] = now
                log.error(
                    "milestone_thresholds row of organization %s is unusable (a NULL element or"
                    " a nested array): its milestones wait until the row is fixed, then"
                    " `milestones sweep` records them", organization_id,
                )


def _where(envelope: Envelope) -> dict[str, object]:
    """The log fields of one message: its position and ids."""
    return fields(topic=envelope.topic, partition=envelope.partition, offset=envelope.offset,
                  mentor_id=envelope.event.mentor_id,
                  activity_id=getattr(envelope.event, "activity_id", None))
