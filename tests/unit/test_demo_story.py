"""The demo's story predicts its own outcome, and its view fits a small terminal."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
from rich.console import Console

from devstack.demo_story import (
    MilestoneOutcome,
    Outcome,
    Story,
    build_story,
    check_outcome,
)
from devstack.demo_view import DemoState, ShownDeadLetter, ShownMilestone, render

OSLO = ZoneInfo("Europe/Oslo")
NOW = datetime(2026, 3, 14, 12, 0, tzinfo=UTC)


def _story(now: datetime = NOW, thresholds: tuple[int, ...] = (50, 100, 200)) -> Story:
    return build_story(now, OSLO, thresholds, 31, run_id="test")


def test_story_has_each_case_the_demo_promises_in_order() -> None:
    titles = [step.title for step in _story().steps]
    assert titles == ["opt-out", "traffic", "duplicate", "deletion", "poison", "new year"]


def test_story_predicts_counts_milestones_and_dead_letters() -> None:
    predicted = _story().predicted
    assert predicted is not None
    assert predicted.counts == {
        ("Astrid", 2026): 104, ("Bjørn", 2026): 55, ("Camilla", 2026): 60,
        ("Daniel", 2026): 29, ("Eva", 2025): 1, ("Eva", 2026): 1,
    }
    assert predicted.milestones == {
        MilestoneOutcome("Astrid", 2026, 50, "published", None),
        MilestoneOutcome("Astrid", 2026, 100, "published", None),
        MilestoneOutcome("Bjørn", 2026, 50, "published", None),
        MilestoneOutcome("Camilla", 2026, 50, "suppressed", "opted_out"),
    }
    assert predicted.dead_letter_kinds == {"invalid_json": 1, "out_of_range": 1}


def test_session_at_2330_utc_on_new_years_eve_counts_for_next_year_in_oslo() -> None:
    new_year = _story().steps[-1]
    stamps = [json.loads(message.value)["occurred_at"] for message in new_year.messages]
    assert stamps == ["2025-12-31T22:30:00+00:00", "2025-12-31T23:30:00+00:00"]
    assert "one session in 2025 and one in 2026" in new_year.look_for


def test_duplicate_step_resends_a_session_of_the_traffic_byte_for_byte() -> None:
    story = _story()
    traffic, duplicate = story.steps[1], story.steps[2]
    assert duplicate.messages[0] in traffic.messages


def test_traffic_on_new_years_morning_still_counts_for_the_new_year() -> None:
    story = _story(now=datetime(2026, 1, 1, 0, 30, tzinfo=OSLO).astimezone(UTC))
    assert story.predicted is not None
    assert {year for (name, year) in story.predicted.counts if name != "Eva"} == {2026}


def test_a_past_years_milestone_is_predicted_suppressed_after_the_grace_period() -> None:
    predicted = _story(thresholds=(1,)).predicted
    assert predicted is not None
    assert MilestoneOutcome("Eva", 2025, 1, "suppressed", "grace_period_over") in predicted.milestones


def test_checks_name_what_differs() -> None:
    predicted = _story().predicted
    assert predicted is not None
    assert all(check.ok for check in check_outcome(predicted, predicted))
    counted_twice = replace(predicted, duplicates=0, counts={**predicted.counts, ("Daniel", 2026): 30})
    failed = [check.label for check in check_outcome(predicted, counted_twice) if not check.ok]
    assert failed == ["the duplicate counted once", "Daniel counts (duplicate, deletion)"]
    empty = Outcome(counts={}, milestones=frozenset(), dead_letter_kinds=predicted.dead_letter_kinds,
                    duplicates=1, removed=1)
    assert not check_outcome(predicted, empty)[-1].ok


@pytest.mark.parametrize(("width", "height"), [(80, 24), (120, 40)])
def test_view_fits_the_terminal_and_shows_every_panel(width: int, height: int) -> None:
    story = _story()
    state = DemoState("127.0.0.1:9092", (50, 100, 200), story.steps)
    state.begin_step(4)
    assert story.predicted is not None
    state.counts = dict(story.predicted.counts)
    state.set_milestones([ShownMilestone("Camilla", 2026, 50, "suppressed", "opted_out")])
    state.add_dead_letter(ShownDeadLetter("invalid_json", "2@131", '{"event_type": '))
    console = Console(width=width, height=height, record=True, force_terminal=True)
    console.print(render(state, width, height - 1))
    lines = console.export_text().splitlines()
    screen = "\n".join(lines)
    assert len(lines) == height - 1
    assert all(len(line) <= width for line in lines)
    for title in ("Story 5/6: poison", "Engine", "Counts per mentor and year", "Publisher",
                  "Milestones", "Dead letters", "suppressed (opted_out)", "invalid_json",
                  "Eva         2025"):
        assert title in screen, screen
    assert ("What happened" in screen) == (height >= 32)
