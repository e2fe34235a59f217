"""What the demo shows: one state object, drawn as a live rich view or told as plain lines.

The demo's tasks (the story, the topic watchers, the half-second poll of the database and the
engine's in-process metrics) only update :class:`DemoState`; on a terminal :func:`render` draws
it four times a second, otherwise each new fact is printed once as a line (``echo``), so a log
file or a pipe gets a readable transcript of the same story.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.layout import Layout
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from devstack.demo_story import Check, Step

Echo = Callable[[str], None]


@dataclass(frozen=True)
class ShownMilestone:
    name: str
    year: int
    value: int
    status: str
    reason: str | None


@dataclass(frozen=True)
class ShownDeadLetter:
    kind: str
    position: str
    value_prefix: str


@dataclass
class DemoState:
    """Everything on the screen. ``echo`` set: plain mode, each change told as one line."""

    broker: str
    thresholds: Sequence[int]
    steps: Sequence[Step]
    echo: Echo | None = None
    started: float = field(default_factory=time.monotonic)
    step: int = -1
    story_done: bool = False
    rate_per_s: float = 0.0
    outcomes: dict[str, int] = field(default_factory=dict)
    batches: int = 0
    lag: int | None = None
    leader: bool = False
    pending: int = 0
    published: int = 0
    suppressed: int = 0
    counts: dict[tuple[str, int], int] = field(default_factory=dict)
    milestones: list[ShownMilestone] = field(default_factory=list)
    dead_letters: list[ShownDeadLetter] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    # the transcript's latest lines, for the view's feed on a tall terminal
    feed: deque[str] = field(default_factory=lambda: deque(maxlen=40))

    def _say(self, line: str) -> None:
        if line.strip() and not line.lstrip().startswith("look for:"):  # the story panel has it
            self.feed.append(line.strip())
        if self.echo is not None:
            self.echo(line)

    def elapsed(self) -> str:
        return f"[{time.monotonic() - self.started:5.1f}s]"

    def begin_step(self, index: int) -> None:
        self.step = index
        step = self.steps[index]
        self._say(f"\nstep {index + 1}/{len(self.steps)} {step.title}: {step.caption}")
        self._say(f"  look for: {step.look_for}")

    def published_notification(self, name: str, value: int, year: int, notification: str) -> None:
        """One ``milestone.reached`` read from the notification topic (the notifier's view)."""
        self._say(
            f"{self.elapsed()} milestone.reached: {name} reached {value} sessions in {year}"
            f" (notification {notification[:8]}…)"
        )

    def set_milestones(self, milestones: list[ShownMilestone]) -> None:
        """The recorded milestones, from the database; a suppressed one is told when first seen
        (a published one is told by the notification topic, as the notifier receives it)."""
        known = {(m.name, m.year, m.value, m.status) for m in self.milestones}
        for milestone in milestones:
            if milestone.status == "suppressed" and (
                milestone.name, milestone.year, milestone.value, milestone.status
            ) not in known:
                self._say(
                    f"{self.elapsed()} milestone suppressed: {milestone.name} reached"
                    f" {milestone.value} sessions in {milestone.year}, recorded as suppressed"
                    f" ({milestone.reason}), never sent"
                )
        self.milestones = milestones

    def add_dead_letter(self, letter: ShownDeadLetter) -> None:
        self.dead_letters.append(letter)
        self._say(
            f"{self.elapsed()} dead letter: {letter.kind} from {letter.position}:"
            f" {letter.value_prefix}"
        )

    def finish(self, checks: list[Check]) -> None:
        self.checks = checks
        self.story_done = True
        self._say("")
        for line in check_lines(checks):
            self._say(line)


def check_lines(checks: Sequence[Check]) -> list[str]:
    matched = all(check.ok for check in checks)
    lines = [
        "story done: the database holds what the story predicted" if matched
        else "story done: the database differs from what the story predicted"
    ]
    for check in checks:
        if check.ok:
            lines.append(f"  ✓ {check.label}: {check.observed}")
        else:
            lines.append(f"  ✗ {check.label}: expected {check.expected}, saw {check.observed}")
    return lines


def summary_lines(state: DemoState) -> list[str]:
    """The counts, the publisher and the milestones at the end, for the plain transcript."""
    counts = ", ".join(f"{name} {year}: {count}" for (name, year), count in sorted(state.counts.items()))
    return [
        f"counts: {counts or 'none'}",
        f"publisher: {state.pending} pending, {state.published} published,"
        f" {state.suppressed} suppressed",
    ]


# ---- the live view -------------------------------------------------------------------------

_STATUS_STYLE = {"published": "green", "pending": "yellow", "suppressed": "magenta"}


def _progress(state: DemoState) -> Text:
    """The steps on one line: done, current, to come."""
    text = Text()
    for index, step in enumerate(state.steps):
        if index < state.step or state.story_done:
            text.append(f"✓ {step.title}", style="green")
        elif index == state.step:
            text.append(f"▶ {step.title}", style="bold yellow")
        else:
            text.append(f"· {step.title}", style="dim")
        text.append("  ")
    return text


def _story_panel(state: DemoState) -> Panel:
    if state.story_done:
        ok = all(check.ok for check in state.checks)
        body = Text.assemble(
            ("The end: ", "bold"),
            ("every count, milestone and dead letter is what the story predicted."
             if ok else "the database differs from the prediction (see below)."),
            style="green" if ok else "red",
        )
        failed = [check for check in state.checks if not check.ok]
        for check in failed[:2]:
            body.append(f"\n✗ {check.label}: expected {check.expected}, saw {check.observed}")
        body.append("\nCtrl-C to stop: the broker and Postgres go with it.", style="dim")
        title = "Story: done"
    elif state.step < 0:
        body = Text("Starting the engine...")
        title = "Story"
    else:
        step = state.steps[state.step]
        body = Text.assemble((f"{step.caption}\n", "bold"), ("look for: ", "cyan"), step.look_for)
        title = f"Story {state.step + 1}/{len(state.steps)}: {step.title}"
    body.append("\n")
    body.append_text(_progress(state))
    return Panel(body, title=title, title_align="left", border_style="blue")


def _engine_panel(state: DemoState) -> Panel:
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="cyan", no_wrap=True)
    grid.add_column(justify="right", no_wrap=True)
    grid.add_row("input", f"{state.rate_per_s:,.0f} msg/s")
    grid.add_row("lag", "-" if state.lag is None else f"{state.lag:,}")
    outcomes = state.outcomes
    for label, key in (("counted", "counted"), ("duplicate", "duplicate"),
                       ("removed", "removed"), ("preference", "preference")):
        grid.add_row(label, f"{outcomes.get(key, 0):,}")
    grid.add_row("dead letters", f"{len(state.dead_letters):,}")
    return Panel(grid, title="Engine", title_align="left")


def _publisher_panel(state: DemoState) -> Panel:
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="cyan", no_wrap=True)
    grid.add_column(justify="right", no_wrap=True)
    grid.add_row("leader", "yes" if state.leader else "no")
    grid.add_row("pending", f"{state.pending:,}")
    grid.add_row("published", f"{state.published:,}")
    grid.add_row("suppressed", f"{state.suppressed:,}")
    return Panel(grid, title="Publisher", title_align="left")


def _counts_panel(state: DemoState) -> Panel:
    table = Table(box=None, pad_edge=False, show_edge=False)
    table.add_column("mentor", no_wrap=True, min_width=10)
    table.add_column("year", justify="right", no_wrap=True)
    table.add_column("sessions", justify="right", no_wrap=True)
    for (name, year), count in sorted(state.counts.items()):
        table.add_row(name, str(year), str(count))
    thresholds = ", ".join(map(str, state.thresholds))
    return Panel(table, title="Counts per mentor and year", title_align="left",
                 subtitle=f"milestones at {thresholds}", subtitle_align="right")


def _milestones_panel(state: DemoState) -> Panel:
    table = Table(box=None, pad_edge=False, expand=True, show_edge=False)
    table.add_column("mentor", no_wrap=True)
    table.add_column("year", justify="right", no_wrap=True)
    table.add_column("reached", justify="right", no_wrap=True)
    table.add_column("status", no_wrap=True, overflow="ellipsis")
    for milestone in state.milestones:
        status = Text(milestone.status, style=_STATUS_STYLE.get(milestone.status, ""))
        if milestone.reason:
            status.append(f" ({milestone.reason})", style="dim")
        table.add_row(milestone.name, str(milestone.year), str(milestone.value), status)
    return Panel(table, title="Milestones", title_align="left")


def _dead_letters_panel(state: DemoState) -> Panel:
    table = Table(box=None, pad_edge=False, expand=True, show_edge=False)
    table.add_column("reason", no_wrap=True, style="red")
    table.add_column("position", no_wrap=True)
    table.add_column("value", no_wrap=True, overflow="ellipsis", ratio=1)
    for letter in state.dead_letters[-6:]:
        table.add_row(letter.kind, letter.position, letter.value_prefix)
    return Panel(table, title="Dead letters", title_align="left")


class _Sized:
    """A renderable drawn ``height`` lines tall (a Layout otherwise takes the whole console:
    one line more than a live view can redraw in place without scrolling)."""

    def __init__(self, renderable: RenderableType, height: int) -> None:
        self.renderable = renderable
        self.height = height

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield from console.render(self.renderable, options.update(height=self.height))


def _feed_panel(state: DemoState, rows: int) -> Panel:
    text = Text(no_wrap=True, overflow="ellipsis")
    for line in list(state.feed)[-rows:]:
        style = "bold" if line.startswith(("step ", "story done")) else (
            "red" if "dead letter:" in line else "")
        text.append(line + "\n", style=style)
    text.rstrip()
    return Panel(text, title="What happened", title_align="left")


def render(state: DemoState, width: int, height: int) -> RenderableType:
    """The whole view, ``height`` lines tall (readable from 80x24 up)."""
    # caption, what to look for and the steps; below 100 columns a caption may take two lines
    story_height = 5 if width >= 100 else 6
    if state.story_done and not all(check.ok for check in state.checks):
        story_height += 2
    top_height = 9  # the engine's seven numbers
    # On a tall terminal the rest below the milestones is a feed of what happened, in order.
    tables_height = 9
    feed_rows = height - story_height - top_height - tables_height - 2
    layout = Layout()
    parts = [
        Layout(_story_panel(state), size=story_height),
        Layout(name="top", size=top_height),
        Layout(name="bottom", size=tables_height) if feed_rows >= 4 else Layout(name="bottom"),
    ]
    if feed_rows >= 4:
        parts.append(Layout(_feed_panel(state, feed_rows)))
    layout.split_column(*parts)
    layout["top"].split_row(
        Layout(_engine_panel(state), size=25),
        Layout(_counts_panel(state)),
        Layout(_publisher_panel(state), size=19),
    )
    layout["bottom"].split_row(
        Layout(_milestones_panel(state), ratio=5), Layout(_dead_letters_panel(state), ratio=3)
    )
    return _Sized(layout, max(story_height + top_height + 4, height))
