"""The pure rules behind the operator commands: thresholds input, the mentor's explanation,
the dead-letter view."""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import uuid4

import pytest

from consumer.commands.dead_letters import printable
from consumer.domain.support import Recorded, explain
from consumer.domain.thresholds import (
    MAX_THRESHOLDS,
    ThresholdsChange,
    latest_changes,
    parse_thresholds,
)

T0 = datetime(2026, 3, 1, tzinfo=UTC)


@pytest.mark.parametrize(("text", "expected"), [
    ("25,10,10,50", (10, 25, 50)), (" 5 , 10 ", (5, 10)), ("none", ()), ("NONE", ()),
])
def test_thresholds_are_normalised(text: str, expected: tuple[int, ...]) -> None:
    assert parse_thresholds(text) == expected


@pytest.mark.parametrize("text", [
    "", " ", "0", "-1", "x", "1,,2", "1.5", "100001", "١٢", ",".join(map(str, range(1, MAX_THRESHOLDS + 2))),
])
def test_bad_thresholds_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"positive|integer|maximum|at most"):
        parse_thresholds(text)


def test_the_latest_change_per_organization_wins_whatever_the_order() -> None:
    org = uuid4()
    later = ThresholdsChange(org, (5,), T0.replace(day=2))
    earlier = ThresholdsChange(org, None, T0)
    assert latest_changes([later, earlier]) == {org: later}


def test_explain_says_the_next_threshold_and_the_opt_out() -> None:
    lines = explain(
        year=2026, count=47, thresholds=(10, 50), opted_out=True, opted_out_since=T0,
        recorded=[Recorded(10, "suppressed", "opted_out", T0, None)], late=False, deadline=T0,
    )
    assert lines[0].startswith("opted out since 2026-03-01 00:00:00 UTC")
    assert "10: not sent: the mentor had opted out when it was recorded" in lines
    assert lines[-1] == "count 47 < next threshold 50: not reached yet"


def test_explain_names_a_reached_milestone_without_a_record() -> None:
    lines = explain(year=2026, count=60, thresholds=(50,), opted_out=False, opted_out_since=None,
                    recorded=[], late=True, deadline=T0)
    assert lines[0].startswith("2026's grace period ended")
    assert lines[1].startswith("50: reached (count 60) but not recorded yet")


def test_a_value_prefix_is_safe_for_a_terminal() -> None:
    assert printable(b"\xff a\\b \x1b[31m \xc3\xa6 \x00") == "\\xff a\\\\b \\x1b[31m æ \\x00"
    assert printable(None) == "(null)"
    assert printable(b"x" * 100, 3) == "xxx…"
