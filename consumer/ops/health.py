"""/metrics, /healthz and /readyz on one small asyncio HTTP server (no framework)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from consumer.ops.metrics import CONTENT_TYPE, Metrics

log = logging.getLogger(__name__)


class HealthServer:
    """Serves the three endpoints; ``ready`` is asked on every /readyz request.

    The service binds the port before anything else and sets ``ready`` once the engine exists.
    """

    def __init__(self, metrics: Metrics, ready: Callable[[], bool], port: int) -> None:
        self._metrics = metrics
        self.ready = ready
        self._port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        if self._port:
            self._server = await asyncio.start_server(self._handle, "0.0.0.0", self._port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            path = request.split(b" ", 2)[1].decode("ascii", "replace").split("?")[0]
            if path == "/metrics":
                status, payload, kind = 200, self._metrics.render(), CONTENT_TYPE
            elif path == "/healthz":
                status, payload, kind = 200, b"ok\n", "text/plain"
            elif path == "/readyz":
                ok = self.ready()
                status, payload, kind = (200, b"ready\n", "text/plain") if ok else (
                    503, b"not ready\n", "text/plain")
            else:
                status, payload, kind = 404, b"not found\n", "text/plain"
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
        except (TimeoutError, OSError, asyncio.IncompleteReadError, IndexError):
            pass
        finally:
            writer.close()
