"""Which limits a ``milestones status`` report crosses: the rule behind its exit status."""

from __future__ import annotations

from typing import Any

import pytest

from consumer.commands.status import BrokerView, Limits, PartitionLag, StatusReport, crossed_limits


def report(*, lag: list[int | None] | None = None, pending_age_s: float | None = None,
           dead_letters: int | None = 0, broker_error: str | None = None,
           configured: bool = True) -> StatusReport:
    partitions = [PartitionLag("t", n, 0, value) for n, value in enumerate(lag or [])]
    oldest: list[dict[str, Any]] = [] if pending_age_s is None else [{"age_s": pending_age_s}]
    return StatusReport(2026, "Europe/Oslo", {}, {}, oldest, BrokerView(
        configured=configured, error=broker_error, partitions=partitions,
        dead_letters_today=dead_letters,
    ))


@pytest.mark.parametrize(
    ("given", "limits", "expected"),
    [
        (report(lag=[5, 5]), Limits(), []),
        (report(lag=[5, 5]), Limits(max_lag=10), []),
        (report(lag=[5, 6]), Limits(max_lag=10), ["lag 11 > 10 (max lag)"]),
        (report(lag=[5, None]), Limits(max_lag=10), ["lag unknown"]),
        (report(lag=[5, None]), Limits(), []),
        (report(pending_age_s=60.0), Limits(max_pending_age_s=60), []),
        (report(pending_age_s=61.0), Limits(max_pending_age_s=60), ["oldest pending"]),
        (report(), Limits(max_pending_age_s=0), []),
        (report(dead_letters=3), Limits(max_dead_letters_today=3), []),
        (report(dead_letters=4), Limits(max_dead_letters_today=3), ["dead letters today 4 > 3"]),
        (report(broker_error="refused"), Limits(max_lag=10), ["broker unreachable: refused"]),
        (report(broker_error="refused"), Limits(broker_required=False, max_lag=0), []),
        (report(configured=False), Limits(), ["MILESTONES_KAFKA_BOOTSTRAP_SERVERS"]),
        (report(configured=False), Limits(broker_required=False), []),
        (report(lag=[9], pending_age_s=9.0, dead_letters=9),
         Limits(max_lag=1, max_pending_age_s=1, max_dead_letters_today=1),
         ["lag 9", "oldest pending", "dead letters today 9"]),
    ],
)
def test_each_limit_crossed_is_one_line(
    given: StatusReport, limits: Limits, expected: list[str]
) -> None:
    crossed = crossed_limits(given, limits)
    assert len(crossed) == len(expected), crossed
    for line, start in zip(crossed, expected, strict=True):
        assert start in line
