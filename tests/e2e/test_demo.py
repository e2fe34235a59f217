"""``milestones demo``, the README's first command, run as a newcomer would run it: piped (plain
lines) and on a terminal (the live view, read through a pseudo-terminal and a terminal
emulator)."""

from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import re
import signal
import socket
import struct
import sys
import termios
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import psutil
import pyte
import pytest

from tests.support.engine import assert_one_line, milestones

pytestmark = pytest.mark.e2e

# In the live view's milestones table: mentor, year, milestone, status.
MILESTONE_ROW = re.compile(r"│ (Astrid|Bjørn) +\d{4} +(50|100) +published")
FRAME_BOTTOM = re.compile(r"╰─+╯╰─+╯")


def _env() -> dict[str, str]:
    return {key: value for key, value in os.environ.items()
            if not key.startswith("MILESTONES_") and key not in ("COLUMNS", "LINES")}


def _this_year() -> int:
    return datetime.now(UTC).astimezone(ZoneInfo("Europe/Oslo")).year


async def _assert_nothing_left(children: set[int]) -> None:
    assert children, "the demo started its broker and Postgres as child processes"
    await asyncio.sleep(0.5)
    leftovers = [
        pid for pid in children
        if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    ]
    assert not leftovers, f"processes left behind: {leftovers}"


def _children(pid: int) -> set[int]:
    with_children = psutil.Process(pid).children(recursive=True)
    return {child.pid for child in with_children}


@pytest.mark.parametrize("stop", ["by itself", "ctrl-c"])
async def test_demo_tells_its_story_and_leaves_nothing_behind(stop: str) -> None:
    args = ["--seconds", "28", "--step-seconds", "0.5"] if stop == "by itself" else []
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "consumer", "demo", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=_env(),
        start_new_session=True,
    )
    assert process.stdout is not None
    lines: list[str] = []
    children: set[int] = set()
    try:
        async with asyncio.timeout(90):
            while line := (await process.stdout.readline()).decode():
                lines.append(line)
                children |= _children(process.pid)
                fired = sum("milestone.reached" in entry for entry in lines)
                if fired >= 3 and stop == "ctrl-c" and process.returncode is None:
                    process.send_signal(signal.SIGINT)
            code = await process.wait()
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
    output = "".join(lines)
    assert code == 0, output
    year = _this_year()
    assert f"Astrid reached 50 sessions in {year}" in output, output
    assert f"Astrid reached 100 sessions in {year}" in output, output
    assert f"Bjørn reached 50 sessions in {year}" in output, output
    assert "milestone.reached: Camilla" not in output  # opted out: never sent
    if stop == "by itself":
        for expected in [
            "step 3/6 duplicate:", "step 4/6 deletion:", "step 5/6 poison:", "step 6/6 new year:",
            f"milestone suppressed: Camilla reached 50 sessions in {year}, recorded as suppressed"
            " (opted_out)",
            "dead letter: invalid_json from ", "dead letter: out_of_range from ",
            "story done: the database holds what the story predicted",
            "✓ the duplicate counted once: 1",
            "✓ the deletion removed one session: 1",
            f"✓ Daniel counts (duplicate, deletion): {year}: 29",
            "✓ the dead letters by kind: invalid_json 1, out_of_range 1",
            f"✓ the new year: {year - 1}: 1, {year}: 1",
            "publisher: 0 pending, 3 published, 1 suppressed",
        ]:
            assert expected in output, output
        assert "✗" not in output, output
    else:  # stopped during the story: said so, no verdict
        assert "before the story's end: no verdict" in output, output
        assert "story done" not in output, output
    await _assert_nothing_left(children)


async def test_demo_on_a_terminal_draws_the_live_view_and_exits_by_itself() -> None:
    """80x24, the smallest terminal the view is made for."""
    columns, rows = 80, 24
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    env = _env() | {"TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "consumer", "demo", "--seconds", "26", "--step-seconds", "0.5",
        stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True,
    )
    os.close(slave)
    screen = pyte.Screen(columns, rows)
    stream = pyte.ByteStream(screen)
    seen: dict[str, str] = {}  # what the screen showed, by moment
    children: set[int] = set()
    loop = asyncio.get_running_loop()
    output = asyncio.Queue[bytes]()

    def readable() -> None:
        try:
            output.put_nowait(os.read(master, 65536))
        except OSError:  # the demo exited and closed the terminal
            output.put_nowait(b"")

    loop.add_reader(master, readable)
    try:
        async with asyncio.timeout(90):
            while chunk := await output.get():
                stream.feed(chunk)
                children |= _children(process.pid) if process.returncode is None else set()
                shown = "\n".join(screen.display)
                # Only whole frames: rich erases the view, then draws it top down, so a frame
                # is whole once its last line (the bottom of the two lower panels) is drawn.
                if not any(FRAME_BOTTOM.fullmatch(line.rstrip()) for line in screen.display):
                    continue
                if MILESTONE_ROW.search(shown):
                    seen.setdefault("milestone", shown)
                if "The end: every count, milestone and dead letter" in shown:
                    seen.setdefault("end", shown)
            code = await process.wait()
    finally:
        loop.remove_reader(master)
        os.close(master)
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
    last = "\n".join(screen.display)
    assert code == 0, last
    assert "milestone" in seen, last
    for title in ("/6: ", "Engine", "Counts per mentor and year", "Publisher", "Milestones",
                  "Dead letters"):
        assert title in seen["milestone"], seen["milestone"]
    assert "end" in seen, last
    end = seen["end"]
    assert "suppressed (opted_out)" in end, end
    assert "invalid_json" in end, end
    assert "out_of_range" in end, end
    assert all(len(line.rstrip()) <= columns for line in end.splitlines())
    await _assert_nothing_left(children)


def test_demo_whose_engine_cannot_start_is_one_line_and_exit_2() -> None:
    """The engine fails after the broker and Postgres are up and the story has begun: its one
    line is all that stderr shows (the story's clients are stopped before the broker)."""
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = milestones("demo", "--seconds", "20",
                            env={"MILESTONES_METRICS_PORT": str(port)}, timeout_s=90)
    assert_one_line(result, "MILESTONES_METRICS_PORT", str(port))
