"""Progress of a long operator command: done of the total it set out to do, rate, time left.

On a terminal it is a rich progress bar on stderr; anywhere else (a pipe, a job's log
collector) it is a log line at most every ``LOG_INTERVAL_S`` seconds and one at the end, so a
job's log shows the command advancing without one line per chunk. ``replay``, ``sweep``,
``reconcile`` and ``prune`` use it; the work itself only calls :meth:`Progress.advance` or
:meth:`Progress.update`, which cost a comparison and an append between log lines.

The total is what the command measured before it started (a replay's end offsets, a count or
the planner's row estimate); work may end above or below it, and the lines say so plainly.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import IO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress
from rich.text import Text

log = logging.getLogger(__name__)

LOG_INTERVAL_S = 10.0
# The rate is measured over the last half minute: a replay's group join or a first slow chunk
# should not weigh on the estimate for the rest of the run.
RATE_WINDOW_S = 30.0


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def describe(
    what: str, done: int, total: int | None, *, unit: str, rate: float | None, elapsed_s: float,
    finished: bool = False,
) -> str:
    """One progress line, e.g. ``replay: 1,200 of 3,000 events (40%), 950 events/s, about
    2 s left``; at the end ``... done in 3 s``."""
    parts = [f"{what}: {done:,} of {total:,} {unit} ({_percent(done, total)})"
             if total is not None else f"{what}: {done:,} {unit}"]
    if rate is not None:
        parts.append(f"{rate:,.0f} {unit}/s")
    if finished:
        parts.append(f"done in {format_duration(elapsed_s)}")
    elif total is not None and rate:
        parts.append(f"about {format_duration(max(0, total - done) / rate)} left")
    else:
        parts.append(f"{format_duration(elapsed_s)} so far")
    return ", ".join(parts)


def _percent(done: int, total: int) -> str:
    return f"{100 * done / total:.0f}%" if total > 0 else "100%"


class _RateColumn(ProgressColumn):
    """rich has a bytes-per-second column only; this one counts the command's own units."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self._unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.0f} {self._unit}/s")


class Progress:
    """A context manager around one command's work; see the module docstring."""

    def __init__(
        self,
        what: str,
        total: int | None,
        *,
        unit: str = "events",
        tty: bool | None = None,
        stream: IO[str] | None = None,
        log_interval_s: float = LOG_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what = what
        self.total = total
        self.unit = unit
        self.done = 0
        self._stream = stream if stream is not None else sys.stderr
        self._tty = self._stream.isatty() if tty is None else tty
        self._log_interval_s = log_interval_s
        self._clock = clock
        self._started = clock()
        self._logged_at = self._started
        self._samples: deque[tuple[float, int]] = deque([(self._started, 0)])
        self._bar: RichProgress | None = None
        self._task: TaskID | None = None
        self._handlers: list[tuple[logging.StreamHandler[IO[str]], IO[str]]] = []

    # --- the work reports ------------------------------------------------------------------
    def advance(self, amount: int) -> None:
        self.update(self.done + amount)

    def update(self, done: int) -> None:
        self.done = done
        now = self._clock()
        self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[1][0] >= RATE_WINDOW_S:
            self._samples.popleft()
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, completed=done)
        elif not self._tty and now - self._logged_at >= self._log_interval_s:
            self._logged_at = now
            log.info("%s", self.line())

    def rate(self) -> float | None:
        (first_at, first_done), (last_at, last_done) = self._samples[0], self._samples[-1]
        if last_at <= first_at or last_done <= first_done:
            return None
        return (last_done - first_done) / (last_at - first_at)

    def line(self, *, finished: bool = False) -> str:
        elapsed = self._clock() - self._started
        rate = self.rate()
        if finished and elapsed > 0 and self.done:
            rate = self.done / elapsed  # the whole run's rate, for the record
        return describe(self.what, self.done, self.total, unit=self.unit, rate=rate,
                        elapsed_s=elapsed, finished=finished)

    # --- display ---------------------------------------------------------------------------
    def __enter__(self) -> Progress:
        if self._tty:
            console = Console(file=self._stream, force_terminal=True)
            self._bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn(self.unit),
                _RateColumn(self.unit),
                TimeRemainingColumn(),
                TimeElapsedColumn(),
                console=console,
                speed_estimate_period=RATE_WINDOW_S,
            )
            self._task = self._bar.add_task(self.what, total=self.total, completed=self.done)
            self._bar.start()
            self._route_logs_above()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
            for handler, stream in self._handlers:
                handler.setStream(stream)
            self._handlers.clear()
        elif kind is None:
            log.info("%s", self.line(finished=True))

    def _route_logs_above(self) -> None:
        """A log line written while the bar is shown would be torn by its next redraw: the
        handlers writing to this terminal print through the console for that time."""
        proxy = sys.stderr  # rich's live display swaps in a proxy that prints above the bar
        if proxy is self._stream:
            return
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is self._stream:
                self._handlers.append((handler, handler.stream))
                handler.setStream(proxy)
