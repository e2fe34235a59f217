"""The engine's Prometheus metrics, on prometheus-client, rendered by the asyncio health server.

Every metric is declared once in the tables below (name, help, label names, buckets), so that
`/metrics` lists each family from the start, even before its first sample, and a dashboard or
an alert never refers to a name that a scrape cannot show. Call sites name a metric and its
labels (``metrics.inc("milestones_events_total", 3, outcome="counted")``); each
:class:`Metrics` has its own registry, so tests and concurrent writers keep separate counts.

Rendering is prometheus-client's ``generate_latest`` on that registry, called from the
existing asyncio handler: no exporter thread and no second port.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import disable_created_metrics as _disable_created_metrics

# The ``*_created`` series double the size of a scrape and no dashboard here reads them.
_disable_created_metrics()  # type: ignore[no-untyped-call]

# The text format 0.0.4, which ``generate_latest`` writes and every Prometheus reads.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# help text, then label names
_COUNTERS: Final[Mapping[str, tuple[str, Sequence[str]]]] = {
    "milestones_events_total": (
        "Accepted input messages by outcome (consumer/store/port.py EVENT_OUTCOMES).",
        ("outcome",)),
    "milestones_dead_letters_total": (
        "Messages sent to the dead-letter topic, by reason kind.", ("reason",)),
    "milestones_key_mismatch_total": ("Messages whose key differs from the value's mentor_id.", ()),
    "milestones_batches_total": ("Batch transactions committed.", ()),
    "milestones_batch_retries_total": ("Batch transactions retried, by cause.", ("cause",)),
    "milestones_records_total": ("Milestone records inserted, by status.", ("status",)),
    "milestones_published_total": ("Notifications sent and marked published.", ()),
    "milestones_suppressed_at_publish_total": (
        "Pending rows suppressed by the publisher's opt-out check.", ()),
    "milestones_readback_hits_total": (
        "Pending rows found already on the topic by the read-back.", ()),
    "milestones_offset_commit_failures_total": (
        "Offset commits skipped (rebalance, revocation, broker away).", ()),
    "milestones_abandoned_batches_total": (
        "Batches abandoned uncommitted (revocation, shutdown).", ()),
    "milestones_threshold_rows_invalid_total": (
        "Batches times organizations whose milestone_thresholds row was unusable (milestones wait).",
        ()),
}
_GAUGES: Final[Mapping[str, tuple[str, Sequence[str]]]] = {
    "milestones_consumer_lag": (
        "Fetch high watermark minus the next offset to consume, per owned input partition.",
        ("topic", "partition")),
    "milestones_paused": ("1 while fetching is suspended because the database is unreachable.", ()),
    "milestones_publisher_leader": ("1 while this process holds the publisher lease.", ()),
    "milestones_last_batch_seconds": ("Duration of the last batch transaction.", ()),
    "milestones_pending_notifications": (
        "Recorded milestones not yet published (status pending), read every few seconds.", ()),
    "milestones_oldest_pending_age_seconds": (
        "Age of the oldest pending notification by the database clock; 0 when none.", ()),
    "milestones_broker_contact_age_seconds": (
        "Seconds since the broker last answered the consumer (a fetch or a probe).", ()),
}
_SHORT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_LATENCY = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
# help text, label names, buckets
_HISTOGRAMS: Final[Mapping[str, tuple[str, Sequence[str], Sequence[float]]]] = {
    "milestones_batch_duration_seconds": (
        "Duration of one batch transaction (one write lane), retries excluded.", (), _SHORT),
    "milestones_counting_latency_seconds": (
        "Kafka record timestamp to offset commit, for the oldest record of each committed batch"
        " (an upper bound of every record's latency in that batch).", (), _LATENCY),
    "milestones_notification_latency_seconds": (
        "Pending row created to marked published, by the database clock, for the oldest row of"
        " each publisher round (an upper bound of the round's rows).", (), _LATENCY),
    "milestones_publisher_round_duration_seconds": (
        "Duration of a publisher round that had rows to send: select, send, await the"
        " acknowledgements, mark published.", (), _SHORT),
}

Family = Counter | Gauge | Histogram


class Metrics:
    """Every metric the engine exports, by name; tests read them through :meth:`value`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._families: dict[str, Family] = {}
        self._label_names: dict[str, Sequence[str]] = {}
        for name, (help_text, labels) in _COUNTERS.items():
            self._families[name] = Counter(name, help_text, labels, registry=self.registry)
            self._label_names[name] = labels
        for name, (help_text, labels) in _GAUGES.items():
            self._families[name] = Gauge(name, help_text, labels, registry=self.registry)
            self._label_names[name] = labels
        for name, (help_text, labels, buckets) in _HISTOGRAMS.items():
            self._families[name] = Histogram(
                name, help_text, labels, registry=self.registry, buckets=buckets
            )
            self._label_names[name] = labels

    @staticmethod
    def names() -> list[str]:
        """Every family name, as it appears in ``# TYPE`` lines."""
        return [*_COUNTERS, *_GAUGES, *_HISTOGRAMS]

    def _child(self, name: str, labels: Mapping[str, str]) -> Family:
        family = self._families[name]
        return family.labels(**labels) if labels else family

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        if amount:
            child = self._child(name, labels)
            assert isinstance(child, Counter | Gauge), name
            child.inc(amount)

    def set(self, name: str, value: float, **labels: str) -> None:
        child = self._child(name, labels)
        assert isinstance(child, Gauge), name
        child.set(value)

    def observe(self, name: str, value: float, **labels: str) -> None:
        child = self._child(name, labels)
        assert isinstance(child, Histogram), name
        child.observe(value)

    def remove(self, name: str, **labels: str) -> None:
        """Drop one labelled series (a partition this process no longer owns)."""
        values = [labels[label] for label in self._label_names[name]]  # in declared order
        with contextlib.suppress(KeyError):  # never set: nothing to drop
            self._families[name].remove(*values)

    def value(self, name: str, **labels: str) -> float:
        """A sample's value (0 when absent); a histogram by its ``_count`` or ``_sum`` name."""
        found = self.registry.get_sample_value(name, dict(labels))
        return 0.0 if found is None else found

    def render(self) -> bytes:
        return generate_latest(self.registry)
