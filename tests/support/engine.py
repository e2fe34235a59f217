"""The engine as a real process: ``python -m consumer ...`` with the test's environment.

Each process runs in its own session, so teardown can kill it together with anything it
started (``milestones demo`` starts servers). Output goes to files in the test's ``tmp_path``
(pipes could fill up and stall the engine).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from devstack.processes import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
ENGINE_COMMAND = (sys.executable, "-m", "consumer")


async def http_get(host: str, port: int, path: str, timeout_s: float = 2.0) -> tuple[int, str]:
    """A minimal HTTP/1.0 GET (no client dependency): status code and body text.
    ``OSError``/``TimeoutError`` when nothing answers."""

    async def exchange() -> tuple[int, str]:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            request = f"GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n"
            writer.write(request.encode("ascii"))
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            length = None
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            body = await (reader.readexactly(length) if length is not None else reader.read())
            return status, body.decode("utf-8", "replace")
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    try:
        return await asyncio.wait_for(exchange(), timeout_s)
    except asyncio.IncompleteReadError as exc:
        raise OSError(f"connection closed early by {host}:{port}") from exc


CLEAN_ENV = {key: value for key, value in os.environ.items() if not key.startswith("MILESTONES_")}


def milestones(
    *args: str, env: Mapping[str, str] | None = None, timeout_s: float = 60.0, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """Run ``milestones *args`` to its end: the shell's ``MILESTONES_*`` variables dropped,
    ``env`` added; output captured unless ``kwargs`` say otherwise."""
    if "stdout" not in kwargs and "stderr" not in kwargs:
        kwargs["capture_output"] = True
    return subprocess.run(
        [*ENGINE_COMMAND, *args], env={**CLEAN_ENV, **(env or {})}, cwd=REPO_ROOT, text=True,
        timeout=timeout_s, stdin=subprocess.DEVNULL, check=False, **kwargs,
    )


def assert_one_line(result: subprocess.CompletedProcess[str], *expected: str) -> str:
    """Exit 2 and nothing but one line on stderr, which contains each of ``expected``."""
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


class EngineProcess:
    """One ``python -m consumer`` process. Signals go to the engine's pid only (as a supervisor
    sends them); :meth:`kill_group` and the fixture's teardown reach its whole session."""

    def __init__(
        self,
        args: Sequence[str],
        env: Mapping[str, str],
        workdir: Path,
        index: int,
        command: Sequence[str] | None = None,
    ) -> None:
        self.args = tuple(args)
        self.command = tuple(command) if command is not None else ENGINE_COMMAND
        self.env = dict(env)
        port = self.env.get("MILESTONES_METRICS_PORT", "0")
        self.metrics_port = int(port) if port.isdigit() else 0
        self.stdout_path = workdir / f"engine-{index}.stdout.log"
        self.stderr_path = workdir / f"engine-{index}.stderr.log"
        with self.stdout_path.open("wb") as stdout, self.stderr_path.open("wb") as stderr:
            self.popen = subprocess.Popen(
                [*self.command, *self.args],
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                env=self.env,
                cwd=REPO_ROOT,
                start_new_session=True,
            )
        self.started_at = time.monotonic()

    def __repr__(self) -> str:
        return f"EngineProcess(pid={self.pid}, args={self.args}, returncode={self.returncode})"

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def running(self) -> bool:
        return self.popen.poll() is None

    async def wait(self, timeout_s: float = 30.0) -> int:
        """The exit status once the process ends (``-N`` for a signal N); ``TimeoutError`` with
        its output if it is still running after ``timeout_s`` seconds."""
        deadline = time.monotonic() + timeout_s
        while (code := self.popen.poll()) is None:
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"engine {self.args} still running after {timeout_s:g} s; output:\n" + self.output()
                )
            await asyncio.sleep(0.05)
        return code

    def send_signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signum)

    def terminate(self) -> None:
        """SIGTERM: the engine finishes the batch in hand and exits 0."""
        self.send_signal(signal.SIGTERM)

    def interrupt(self) -> None:
        """SIGINT, as Ctrl-C would."""
        self.send_signal(signal.SIGINT)

    def kill(self) -> None:
        """SIGKILL to the engine alone: a crash."""
        self.send_signal(signal.SIGKILL)

    def freeze(self) -> None:
        """SIGSTOP: a member frozen past its session timeout (:meth:`thaw` resumes it)."""
        self.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.send_signal(signal.SIGCONT)

    def kill_group(self) -> None:
        """SIGKILL to the process and everything in its session."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)

    async def stop(self, timeout_s: float = 15.0) -> int:
        """SIGTERM, wait up to ``timeout_s``, then SIGKILL to its session; the exit status."""
        self.terminate()
        try:
            return await self.wait(timeout_s)
        except TimeoutError:
            self.kill_group()
            return await self.wait(5.0)

    def stdout(self) -> str:
        return _read(self.stdout_path)

    def stderr(self) -> str:
        return _read(self.stderr_path)

    def output(self) -> str:
        """Standard output then standard error, as text."""
        out, err = self.stdout(), self.stderr()
        return out + ("\n--- stderr ---\n" + err if err else "")

    async def get(self, path: str, timeout_s: float = 2.0) -> tuple[int, str]:
        """GET ``path`` on the metrics port (``/metrics``, ``/healthz``, ``/readyz``)."""
        if not self.metrics_port:
            raise RuntimeError("this engine runs without a metrics port")
        return await http_get("127.0.0.1", self.metrics_port, path, timeout_s)

    async def metrics(self) -> str:
        status, body = await self.get("/metrics")
        assert status == 200, f"/metrics answered {status}"
        return body

    async def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Poll ``/readyz`` until it answers 200. Fails at once, with the output, if the
        process exits first, and after ``timeout_s`` otherwise."""
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while True:
            if self.popen.poll() is not None:
                raise AssertionError(
                    f"engine exited with {self.popen.returncode} before ready; output:\n" + self.output()
                )
            try:
                status, body = await self.get("/readyz", timeout_s=1.0)
            except (OSError, TimeoutError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if status == 200:
                    return
                last = f"{status} {body.strip()[:200]}"
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"engine not ready after {timeout_s:g} s (last: {last}); output:\n" + self.output()
                )
            await asyncio.sleep(0.1)

    async def wait_for_output(self, text: str, timeout_s: float = 20.0) -> str:
        """Wait until ``text`` appears in the output; return the whole output."""
        deadline = time.monotonic() + timeout_s
        while True:
            output = self.output()
            if text in output:
                return output
            if time.monotonic() >= deadline or self.popen.poll() is not None:
                output = self.output()
                if text in output:
                    return output
                raise AssertionError(f"{text!r} not in the engine's output:\n{output}")
            await asyncio.sleep(0.1)


def _read(path: Path) -> str:
    try:
        return path.read_text("utf-8", "replace")
    except FileNotFoundError:
        return ""


class EngineLauncher:
    """The ``engine_process`` fixture: call it to start an engine; every process it started is
    killed (with its session) at teardown.

    The first process gets ``engine_env``'s metrics port; each later one a fresh port, so
    several members of one group can run side by side (``extra_env`` may set it explicitly).
    """

    def __init__(self, base_env: Mapping[str, str], workdir: Path) -> None:
        self.base_env = dict(base_env)
        self.workdir = workdir
        self.processes: list[EngineProcess] = []

    def __call__(
        self,
        extra_env: Mapping[str, str] | None = None,
        args: Sequence[str] = ("run",),
        *,
        command: Sequence[str] | None = None,
    ) -> EngineProcess:
        return self.start(extra_env, args, command=command)

    def start(
        self,
        extra_env: Mapping[str, str] | None = None,
        args: Sequence[str] = ("run",),
        *,
        command: Sequence[str] | None = None,
    ) -> EngineProcess:
        """Start ``command`` (default ``python -m consumer``) with ``args``, in ``engine_env``
        updated by ``extra_env``. It is not waited for: see :meth:`EngineProcess.wait_ready`."""
        env = dict(self.base_env)
        if self.processes:
            env["MILESTONES_METRICS_PORT"] = str(free_port())
        env.update(extra_env or {})
        process = EngineProcess(args, env, self.workdir, len(self.processes), command)
        self.processes.append(process)
        return process

    def kill_all(self) -> None:
        for process in self.processes:
            process.thaw()
            process.kill_group()
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.popen.wait(10)
