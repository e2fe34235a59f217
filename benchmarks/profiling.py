"""py-spy on a running engine, summarized as the few numbers that guide an optimization.

py-spy samples the process from outside (``--nonblocking``: the engine is never paused), only
while its thread is on the CPU, so the shares below are shares of the engine's CPU time, and
``on_cpu`` says how busy its thread was.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.engines import EngineProcess

RATE_HZ = 100
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^():]*)(?::\d+)?\)$")


def py_spy() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


class Profiler:
    def __init__(self, engine: EngineProcess, directory: Path) -> None:
        self._engine = engine
        self._directory = directory
        self._raw = directory / "py-spy.raw.txt"
        self._process: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._started = self._stopped = 0.0
        self.error: str | None = None

    def start_when_assigned(self) -> None:
        self._task = asyncio.ensure_future(self._start())

    async def _start(self) -> None:
        binary = py_spy()
        if binary is None:
            self.error = "py-spy is not installed (pip install py-spy)"
            return
        await self._engine.assigned.wait()
        if self._engine.exited:
            return
        self._directory.mkdir(parents=True, exist_ok=True)
        self._started = time.time()
        self._process = await asyncio.create_subprocess_exec(
            binary, "record", "--pid", str(self._engine.pid), "--rate", str(RATE_HZ),
            "--format", "raw", "--output", str(self._raw), "--nonblocking",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        process = self._process
        if process is None or process.returncode is not None:
            return
        self._stopped = time.time()
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(process.wait(), 30)
        except TimeoutError:
            process.kill()
            await process.wait()

    def summary(self, top: int = 15) -> dict[str, Any]:
        if self.error:
            return {"error": self.error}
        if not self._raw.exists():
            return {"error": "py-spy wrote no profile (is ptrace allowed?)"}
        return summarize_raw(self._raw.read_text(), seconds=self._stopped - self._started,
                             rate_hz=RATE_HZ, top=top) | {"raw": str(self._raw)}


def _location(frame: str) -> tuple[str, str]:
    match = _FRAME.match(frame)
    if not match:
        return frame, "?"
    return match["function"], match["file"]


def _area(file: str) -> str:
    """Where a frame's code lives: the engine's package, a library, or the standard library."""
    parts = file.split("/")
    if parts[0] in ("consumer", "schemas"):
        return "/".join(parts[:2]).removesuffix(".py")
    if parts[0] in ("asyncpg", "aiokafka", "pydantic", "pydantic_core", "uvloop"):
        return parts[0]
    return "stdlib/" + parts[0].removesuffix(".py") if len(parts) <= 2 else parts[0]


def summarize_raw(text: str, *, seconds: float, rate_hz: int, top: int = 15) -> dict[str, Any]:
    """Self and inclusive shares per function, and self shares per area, from py-spy's raw output."""
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_location(frame) for frame in stack.split(";")]
        function, file = frames[-1]
        self_time[f"{function} ({file})"] += count
        areas[_area(file)] += count
        for name in {f"{f} ({p})" for f, p in frames}:
            inclusive[name] += count

    def shares(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(100 * n / total, 1)) for name, n in counter.most_common(top)]

    # The entry-point chain (runpy, main, the event loop's run) is on every stack: it says
    # nothing, so the inclusive table starts below it.
    for name in [name for name, n in inclusive.items() if n >= 0.97 * total]:
        del inclusive[name]

    return {
        "samples": total,
        "seconds": round(seconds, 1),
        "on_cpu": round(total / (rate_hz * seconds), 2) if seconds > 0 else None,
        "self_percent": shares(self_time) if total else [],
        "inclusive_percent": shares(inclusive) if total else [],
        "area_self_percent": shares(areas) if total else [],
    }
