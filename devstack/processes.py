"""Process handling for the throwaway servers of the demo and the tests: free ports, waiting
for a port, each server in its own session with a parent-death signal, work directories that
a later run sweeps when their owner died, and an ``atexit`` hook that stops what is left.

Why these pieces:

- Each server runs in its own session (process group), so stopping it can sweep the whole group
  with SIGKILL after the graceful signal, and a Ctrl-C in the terminal does not reach it before
  we stop it in order.
- On Linux each server also gets a parent-death signal (``PR_SET_PDEATHSIG``): if the Python
  process dies without running its ``finally`` blocks (SIGKILL, an unhandled SIGTERM), the
  kernel still ends the servers. The signal follows the *thread* that spawned the child, so the
  servers are spawned from the caller's thread (the event loop's, in the async helpers) and only
  the waiting runs in worker threads.
- An ``atexit`` hook stops whatever is still running when the interpreter exits normally.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import ctypes.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

LOCALHOST = "127.0.0.1"
LOG_TAIL_BYTES = 4000
BIND_GRACE_S = 0.05


# --------------------------------------------------------------------------- ports


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port that was free a moment ago (the OS picks it; another process may still race us,
    which the servers' start-up retries cover)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_for_port(
    host: str,
    port: int,
    timeout_s: float,
    *,
    process: subprocess.Popen[bytes] | None = None,
) -> None:
    """Block until ``host:port`` accepts a TCP connection.

    Raises ``TimeoutError`` after ``timeout_s``, or ``RuntimeError`` at once when ``process`` (the
    server expected to listen there) has exited.
    """
    deadline = time.monotonic() + timeout_s
    while not port_open(host, port):
        _give_up_waiting(host, port, process, deadline, timeout_s)
        time.sleep(0.02)


async def async_wait_for_port(
    host: str,
    port: int,
    timeout_s: float,
    *,
    process: subprocess.Popen[bytes] | None = None,
) -> None:
    """:func:`wait_for_port` without blocking the event loop."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 0.5)
        except (OSError, TimeoutError):
            pass
        else:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return
        _give_up_waiting(host, port, process, deadline, timeout_s)
        await asyncio.sleep(0.02)


def _give_up_waiting(
    host: str, port: int, process: subprocess.Popen[bytes] | None, deadline: float, timeout_s: float
) -> None:
    """Raise when waiting for ``host:port`` is pointless: its server exited, or time is up."""
    if process is not None and process.poll() is not None:
        raise RuntimeError(
            f"process {process.pid} exited with {process.returncode} before listening on {host}:{port}"
        )
    if time.monotonic() >= deadline:
        raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s:g} s")


# --------------------------------------------------------------------------- processes

_PR_SET_PDEATHSIG = 1
_libc: Any = None
if sys.platform.startswith("linux"):
    _libc_name = ctypes.util.find_library("c")
    if _libc_name:
        with contextlib.suppress(OSError):
            _libc = ctypes.CDLL(_libc_name, use_errno=True)


def _parent_death_signal(signum: int) -> Any:
    """A ``preexec_fn`` asking the kernel to send ``signum`` when the spawning thread dies; on
    platforms without ``prctl`` none (the ``finally`` and ``atexit`` paths still apply)."""
    if _libc is None:
        return None
    libc = _libc

    def _preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)

    return _preexec


_live: set[Server] = set()
_live_lock = threading.Lock()


@dataclass(eq=False)
class Server:
    """A server process in its own session, with its log file."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    stop_signal: signal.Signals
    stop_timeout_s: float
    escalation_signal: signal.Signals | None = None
    _log_file: IO[bytes] | None = field(default=None, repr=False)
    _stopped: bool = field(default=False, repr=False)

    @classmethod
    def spawn(
        cls,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        stop_signal: signal.Signals,
        stop_timeout_s: float,
        death_signal: signal.Signals,
        escalation_signal: signal.Signals | None = None,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
        cwd: Path | None = None,
    ) -> Server:
        log_file = log_path.open("ab")
        extra: dict[str, Any] = {}
        if user is not None:
            entry = pwd.getpwnam(user)
            extra.update(user=entry.pw_uid, group=entry.pw_gid, extra_groups=[])
        try:
            process = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_parent_death_signal(death_signal),
                env=dict(env) if env is not None else None,
                cwd=cwd,
                close_fds=True,
                **extra,
            )
        except BaseException:
            log_file.close()
            raise
        server = cls(name, process, log_path, stop_signal, stop_timeout_s, escalation_signal, log_file)
        with _live_lock:
            _live.add(server)
        return server

    def log_tail(self) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(0, os.SEEK_END)
                size = log.tell()
                log.seek(max(0, size - LOG_TAIL_BYTES))
                return log.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with status {self.process.returncode} at start; "
                f"its log ends with:\n{self.log_tail()}"
            )

    def stop(self) -> None:
        """Graceful signal, a bounded wait, then SIGKILL to the whole process group. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        try:
            if self.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self.process.send_signal(self.stop_signal)
                try:
                    self.process.wait(self.stop_timeout_s)
                except subprocess.TimeoutExpired:
                    if self.escalation_signal is not None:
                        with contextlib.suppress(ProcessLookupError):
                            self.process.send_signal(self.escalation_signal)
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            self.process.wait(5)
            # Sweep the group even after a clean exit: helpers it forked must not outlive it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(5)
        finally:
            if self._log_file is not None:
                self._log_file.close()
            with _live_lock:
                _live.discard(self)


@atexit.register
def _stop_leftovers() -> None:
    with _live_lock:
        leftovers = list(_live)
    for server in leftovers:
        with contextlib.suppress(Exception):
            server.stop()


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


_WORKDIR_PREFIX = "milestones-"
_OWNER_FILE = "owner.pid"


def new_workdir(kind: str) -> Path:
    """A temporary directory tagged with our pid, after removing those whose owner is gone
    (a parent killed by SIGKILL or an unhandled SIGTERM cannot clean up after itself; its
    servers died with it through the parent-death signal)."""
    _sweep_stale_workdirs()
    workdir = Path(tempfile.mkdtemp(prefix=f"{_WORKDIR_PREFIX}{kind}-"))
    (workdir / _OWNER_FILE).write_text(f"{os.getpid()}\n")
    return workdir


def _sweep_stale_workdirs() -> None:
    for candidate in Path(tempfile.gettempdir()).glob(f"{_WORKDIR_PREFIX}*-*"):
        try:
            owner = int((candidate / _OWNER_FILE).read_text().strip())
        except (OSError, ValueError):
            continue  # not ours, or still being created
        if not _pid_alive(owner):
            remove_tree(candidate)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def stop_in_thread(stop: Callable[[], None]) -> None:
    # Shielded: a second Ctrl-C (cancellation) must not leave a half-stopped server behind; the
    # thread finishes, and asyncio.run waits for its executor before the interpreter exits.
    await asyncio.shield(asyncio.to_thread(stop))
