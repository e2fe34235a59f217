"""``milestones demo``, the README's first command, run as a newcomer would run it."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import psutil
import pytest

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("stop", ["by itself", "ctrl-c"])
async def test_demo_shows_milestones_firing_and_leaves_nothing_behind(stop: str) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MILESTONES_")}
    args = ["--seconds", "25"] if stop == "by itself" else []
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "consumer", "demo", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env,
        start_new_session=True,
    )
    assert process.stdout is not None
    lines: list[str] = []
    children: set[int] = set()
    try:
        async with asyncio.timeout(90):
            while line := (await process.stdout.readline()).decode():
                lines.append(line)
                with_children = psutil.Process(process.pid).children(recursive=True)
                children |= {child.pid for child in with_children}
                fired = sum("milestone.reached" in entry for entry in lines)
                if fired >= 3 and stop == "ctrl-c" and process.returncode is None:
                    process.send_signal(signal.SIGINT)
            code = await process.wait()
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
    output = "".join(lines)
    assert code == 0, output
    assert "Astrid reached 50 sessions" in output, output
    assert "Astrid reached 100 sessions" in output, output
    assert "Bjørn reached 50 sessions" in output, output
    assert "Camilla" not in output  # opted out: recorded as suppressed, never sent
    assert children, "the demo started its broker and Postgres as child processes"
    await asyncio.sleep(0.5)
    leftovers = [
        pid for pid in children
        if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    ]
    assert not leftovers, f"processes left behind: {leftovers}"
