"""Plain answers to "why did (or didn't) this mentor get a congratulation?".

Pure: ``milestones mentor`` reads the facts, this turns them into sentences by the same rules
the engine applies (thresholds ascending, stop at the first not reached, opt-out, grace).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

SUPPRESSED_REASON_TEXT: Mapping[str | None, str] = {
    "opted_out": "the mentor had opted out when it was recorded",
    "grace_period_over": "recorded after the year's grace period had passed",
    "replay_no_notify": "recorded by `replay --no-notify` from a session older than the replay",
    "opted_out_before_send": "the mentor opted out after it was recorded, before it was sent",
    "operator": "suppressed by an operator",
    None: "no reason recorded (suppressed before reasons were kept)",
}


def when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclass(frozen=True, slots=True)
class Recorded:
    milestone_value: int
    status: str
    suppressed_reason: str | None
    created_at: datetime
    published_at: datetime | None


def explain(
    *,
    year: int,
    count: int | None,
    thresholds: Sequence[int],
    recorded: Sequence[Recorded],
    opted_out: bool,
    opted_out_since: datetime | None,
    late: bool,
    deadline: datetime,
) -> list[str]:
    """One sentence per fact that decides what the mentor gets, most telling first."""
    lines: list[str] = []
    if count is None:
        lines.append(f"no counted session in {year}: nothing can be reached")
    if opted_out:
        lines.append(
            f"opted out since {when(opted_out_since)}: milestones reached meanwhile are recorded"
            " as suppressed and never sent"
        )
    if late:
        lines.append(
            f"{year}'s grace period ended {when(deadline)}: milestones recorded since are"
            " suppressed"
        )
    if not thresholds:
        lines.append("no thresholds apply (the organization's list is empty): no milestones")
    by_value = {record.milestone_value: record for record in recorded}
    running = count or 0
    for threshold in thresholds:
        record = by_value.get(threshold)
        if record is not None:
            lines.append(f"{threshold}: {_recorded(record)}")
        elif running < threshold:
            if count is not None:
                lines.append(f"count {running} < next threshold {threshold}: not reached yet")
            break
        else:
            lines.append(
                f"{threshold}: reached (count {running}) but not recorded yet: it is recorded at"
                " the mentor's next session, or by `milestones sweep`"
            )
    extra = sorted(set(by_value) - set(thresholds))
    for value in extra:
        lines.append(
            f"{value}: {_recorded(by_value[value])} (not among the thresholds that apply now)"
        )
    return lines


def _recorded(record: Recorded) -> str:
    if record.status == "published":
        return f"sent {when(record.published_at)}"
    if record.status == "pending":
        return (f"recorded {when(record.created_at)}, not sent yet (the publisher sends it;"
                " `milestones status` shows the outbox)")
    return f"not sent: {SUPPRESSED_REASON_TEXT.get(record.suppressed_reason, record.status)}"
