"""``milestones mentor MENTOR_ID [--year Y] [--json]``: one mentor's year, and why.

Answers a support question in one command: the count and organization, the thresholds that
apply, the opt-out, each milestone with its status, crossing session, record and publication,
and for a suppressed one the reason; then the sentences that explain what the mentor got.
"""

from __future__ import annotations

import json
from typing import Any
from uuid import UUID

from consumer.commands.common import current_year, parse_uuid, write_out
from consumer.domain.calendar import is_late, notify_deadline
from consumer.domain.support import SUPPRESSED_REASON_TEXT, Recorded, explain, when
from consumer.runtime import command_pool
from consumer.settings import Settings
from consumer.store.mentor_sql import MentorFacts, mentor_facts


async def mentor_command(
    settings: Settings, *, mentor: str, year: int | None, as_json: bool = False
) -> int:
    mentor_id = parse_uuid(mentor, "MENTOR_ID")
    year = year if year is not None else current_year(settings)
    async with (
        command_pool(settings, max_size=1, migrate=False) as pool,
        pool.acquire() as connection,
    ):
        facts = await mentor_facts(connection, mentor_id, year)
    report = build_report(settings, mentor_id, year, facts)
    write_out((json.dumps(report, indent=2, default=str) if as_json else render(report)) + "\n")
    return 0


def build_report(
    settings: Settings, mentor_id: UUID, year: int, facts: MentorFacts
) -> dict[str, Any]:
    own = facts.organization_thresholds
    thresholds = own if own is not None else settings.thresholds
    opted_out = facts.milestone_notifications is False
    deadline = notify_deadline(year, settings.tz, settings.notify_grace_days)
    late = is_late(year, facts.db_now, settings.tz, settings.notify_grace_days)
    milestones = [
        {
            "milestone_value": row["milestone_value"],
            "status": row["status"],
            "suppressed_reason": row["suppressed_reason"],
            "organization_id": row["organization_id"],
            "session_count": row["session_count"],
            "activity_id": row["activity_id"],
            "reached_at": row["reached_at"],
            "recorded_at": row["created_at"],
            "published_at": row["published_at"],
            "published_partition": row["published_partition"],
            "published_offset": row["published_offset"],
            "notification_id": row["id"],
        }
        for row in facts.milestones
    ]
    why = explain(
        year=year, count=facts.session_count, thresholds=thresholds,
        recorded=[
            Recorded(row["milestone_value"], row["status"], row["suppressed_reason"],
                     row["created_at"], row["published_at"])
            for row in facts.milestones
        ],
        opted_out=opted_out, opted_out_since=facts.preference_changed_at if opted_out else None,
        late=late, deadline=deadline,
    )
    return {
        "mentor_id": mentor_id,
        "year": year,
        "timezone": settings.timezone,
        "session_count": facts.session_count,
        "organization_id": facts.organization_id,
        "thresholds": list(thresholds),
        "thresholds_source": "organization" if own is not None else "default",
        "opted_out": opted_out,
        "preference_changed_at": facts.preference_changed_at,
        "grace_deadline": deadline,
        "milestones": milestones,
        "other_years": {y: c for y, c in facts.years.items() if y != year},
        "explanation": why,
    }


def render(report: dict[str, Any]) -> str:
    source = (
        f"organization {report['organization_id']}'s own row"
        if report["thresholds_source"] == "organization" else "default, MILESTONES_THRESHOLDS"
    )
    thresholds = ",".join(map(str, report["thresholds"])) or "none (no milestones)"
    if report["preference_changed_at"] is None:
        preference = "opted in (no preference recorded)"
    else:
        state = "opted out" if report["opted_out"] else "opted in"
        preference = f"{state} since {when(report['preference_changed_at'])}"
    count = report["session_count"]
    lines = [
        f"mentor {report['mentor_id']}, year {report['year']} ({report['timezone']})",
        f"  sessions counted: {'none' if count is None else count}",
        f"  organization:     {report['organization_id'] or '-'}",
        f"  thresholds:       {thresholds} ({source})",
        f"  notifications:    {preference}",
    ]
    if report["other_years"]:
        other = ", ".join(f"{y}: {c}" for y, c in report["other_years"].items())
        lines.append(f"  other years:      {other}")
    lines.append("")
    for m in report["milestones"]:
        lines.append(f"milestone {m['milestone_value']}: {_outcome(m)}")
        crossing = (
            f"crossed by session {m['activity_id']}" if m["activity_id"] is not None
            else "reached before the evaluating event (no crossing session)"
        )
        lines.append(f"    {crossing}, session_count {m['session_count']}")
        lines.append(f"    reached {when(m['reached_at'])}, recorded {when(m['recorded_at'])}")
    if not report["milestones"]:
        lines.append("no milestone recorded for this year")
    lines.append("")
    lines.append("why:")
    lines.extend(f"  - {line}" for line in report["explanation"])
    return "\n".join(lines)


def _outcome(milestone: dict[str, Any]) -> str:
    status = milestone["status"]
    if status == "published":
        return (f"published {when(milestone['published_at'])}, partition"
                f" {milestone['published_partition']} offset {milestone['published_offset']}")
    if status == "suppressed":
        reason = milestone["suppressed_reason"]
        return f"suppressed ({reason or 'no reason recorded'}: {SUPPRESSED_REASON_TEXT[reason]})"
    return f"{status} (not sent yet)"
