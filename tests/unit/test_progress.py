"""The progress of long commands: the log lines written when stderr is not a terminal, and the
bar drawn when it is."""

from __future__ import annotations

import io
import logging

import pytest

from consumer.ops.progress import Progress, describe, format_duration


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def progress_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "consumer.ops.progress"]


def test_without_a_terminal_a_line_every_interval_and_one_at_the_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    clock = Clock()
    with Progress("replay", 3_000, tty=False, log_interval_s=10, clock=clock) as progress:
        for _ in range(4):  # 4 s at 100 events/s: no line yet
            clock.now += 1
            progress.advance(100)
        assert progress_lines(caplog) == []
        for _ in range(6):
            clock.now += 1
            progress.advance(100)
        clock.now += 1
        progress.advance(100)  # within the interval of the first line: no second line
        clock.now += 10
        progress.update(3_000)

    assert progress_lines(caplog) == [
        "replay: 1,000 of 3,000 events (33%), 100 events/s, about 20 s left",
        "replay: 3,000 of 3,000 events (100%), 143 events/s, about 0 s left",
        "replay: 3,000 of 3,000 events (100%), 143 events/s, done in 21 s",
    ]


def test_the_rate_follows_the_last_half_minute(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    clock = Clock()
    progress = Progress("sweep 2026", None, unit="mentor-years", tty=False, clock=clock)
    with progress:
        clock.now += 60  # a slow start (a group join, a cold cache)...
        progress.update(60)
        for _ in range(30):  # ...then 1,000 a second
            clock.now += 1
            progress.advance(1_000)
        assert progress.rate() == pytest.approx(1_000, rel=0.05)
    assert progress_lines(caplog)[-1] == (
        "sweep 2026: 30,060 mentor-years, 334 mentor-years/s, done in 1 min 30 s"
    )


def test_a_total_that_turns_out_too_small_and_a_failure() -> None:
    assert describe("prune", 120, 100, unit="rows", rate=None, elapsed_s=3) == (
        "prune: 120 of 100 rows (120%), 3 s so far"
    )
    assert describe("fix", 0, 0, unit="rows", rate=None, elapsed_s=0, finished=True) == (
        "fix: 0 of 0 rows (100%), done in 0 s"
    )
    assert format_duration(3_725) == "1 h 02 min"


def test_no_final_line_when_the_work_failed(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with pytest.raises(RuntimeError), Progress("reconcile", 10, tty=False):
        raise RuntimeError("database away")
    assert progress_lines(caplog) == []


def test_on_a_terminal_a_bar_with_counts_rate_and_time_left() -> None:
    screen = io.StringIO()
    clock = Clock()
    with Progress("replay", 2_000, tty=True, stream=screen, clock=clock) as progress:
        progress.update(500)
        progress.update(2_000)
    shown = screen.getvalue()
    assert "replay" in shown
    assert "2000/2000" in shown
    assert "events" in shown
