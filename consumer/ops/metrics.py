"""A small Prometheus registry: counters and gauges with labels, rendered as text format 0.0.4.

Kept in-house (about sixty lines) instead of prometheus_client so that the metrics, /healthz
and /readyz share one asyncio server and no thread.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

Labels = tuple[tuple[str, str], ...]


@dataclass
class _Family:
    name: str
    help: str
    kind: str
    values: dict[Labels, float] = field(default_factory=lambda: defaultdict(float))


class Metrics:
    """Every metric the engine exports, by name; tests read them through :meth:`value`."""

    def __init__(self) -> None:
        self._families: dict[str, _Family] = {}
        for name, help_text in _COUNTERS.items():
            self._families[name] = _Family(name, help_text, "counter")
        for name, help_text in _GAUGES.items():
            self._families[name] = _Family(name, help_text, "gauge")

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        if amount:
            self._families[name].values[tuple(sorted(labels.items()))] += amount

    def set(self, name: str, value: float, **labels: str) -> None:
        self._families[name].values[tuple(sorted(labels.items()))] = value

    def value(self, name: str, **labels: str) -> float:
        return self._families[name].values.get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> str:
        lines: list[str] = []
        for family in self._families.values():
            lines.append(f"# HELP {family.name} {family.help}")
            lines.append(f"# TYPE {family.name} {family.kind}")
            for labels, number in sorted(family.values.items()):
                rendered = ",".join(f'{key}="{_escape(val)}"' for key, val in labels)
                suffix = f"{{{rendered}}}" if rendered else ""
                lines.append(f"{family.name}{suffix} {number:g}")
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


_COUNTERS = {
    "milestones_events_total": "Input messages by outcome (counted, duplicate, conflict, ...).",
    "milestones_dead_letters_total": "Messages sent to the dead-letter topic, by reason kind.",
    "milestones_key_mismatch_total": "Messages whose key differs from the value's mentor_id.",
    "milestones_batches_total": "Batch transactions committed.",
    "milestones_batch_retries_total": "Batch transactions retried, by cause.",
    "milestones_records_total": "Milestone records inserted, by status.",
    "milestones_published_total": "Notifications sent and marked published.",
    "milestones_suppressed_at_publish_total": "Pending rows suppressed by the publisher's opt-out check.",
    "milestones_readback_hits_total": "Pending rows found already on the topic by the read-back.",
    "milestones_offset_commit_failures_total": "Offset commits skipped (rebalance in progress).",
    "milestones_abandoned_batches_total": "Batches abandoned uncommitted (revocation, shutdown).",
    "milestones_threshold_rows_invalid_total": (
        "Batches times organizations whose milestone_thresholds row was unusable (milestones wait)."
    ),
}
_GAUGES = {
    "milestones_consumer_lag": "High watermark minus position, per input partition.",
    "milestones_paused": "1 while fetching is suspended because the database is unreachable.",
    "milestones_publisher_leader": "1 while this process holds the publisher lease.",
    "milestones_last_batch_seconds": "Duration of the last batch transaction.",
}
