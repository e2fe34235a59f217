"""A small asyncio TCP proxy that the fault tests put between the engine and Postgres or Kafka.

What it can do to the traffic, each as one call:

- :meth:`Proxy.cut` resets every open connection (both sides see a reset, as after a network
  failure or a server restart);
- :meth:`Proxy.refuse` stops listening, so new connections are refused, until
  :meth:`Proxy.accept` listens again on the same port;
- :attr:`Proxy.latency_s` delays every chunk, both ways, without reordering it (pipelined: the
  delay is added to each chunk, not summed over them);
- :meth:`Proxy.drop_response_to_produce` watches the Kafka framing: the next Produce request
  (api_key 0) naming a topic is forwarded to the broker, and from its response on nothing more
  goes back to the client on that connection, which is held open: the broker has written the
  records, the client never hears so and times out.

Kafka framing, as far as it is read here: every request and response is a 4-byte big-endian
length and that many bytes. A request header starts with api_key (int16), api_version (int16)
and correlation_id (int32); a response header starts with the correlation_id. That is all the
proxy needs to pick the one response to drop.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from dataclasses import dataclass, field

PRODUCE_API_KEY = 0
_CHUNK = 65_536


@dataclass(eq=False)
class _Link:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    requests: bytearray = field(default_factory=bytearray)
    responses: bytearray = field(default_factory=bytearray)
    # Kafka: the correlation id whose response (and everything after it) is never returned.
    drop_from_correlation: int | None = None
    muted: bool = False


@dataclass
class _ProduceTrap:
    topic: bytes
    reset_after_s: float | None
    hit: asyncio.Event = field(default_factory=asyncio.Event)


class Proxy:
    """Forwards ``127.0.0.1:port`` to ``target_host:target_port``; see the module docstring."""

    def __init__(
        self, target_host: str, target_port: int, *, port: int = 0, kafka: bool = False
    ) -> None:
        self.target_host = target_host
        self.kafka = kafka
        self.target_port = target_port
        self._port = port
        self._server: asyncio.Server | None = None
        self._placeholder: socket.socket | None = None
        self._links: set[_Link] = set()
        self._trap: _ProduceTrap | None = None
        self._watches: list[tuple[bytes, asyncio.Event]] = []
        self.latency_s = 0.0
        self.connections_made = 0

    @property
    def port(self) -> int:
        return self._port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self._port}"

    async def start(self) -> Proxy:
        await self.accept()
        return self

    async def close(self) -> None:
        await self.refuse()
        tasks = [task for link in self._links for task in link.tasks]
        self.cut()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._placeholder is not None:
            self._placeholder.close()
            self._placeholder = None

    # --------------------------------------------------------------------------- faults

    async def accept(self) -> None:
        """Listen (again) on the same port."""
        if self._server is not None:
            return
        placeholder, self._placeholder = self._placeholder, None
        deadline = time.monotonic() + 10
        while True:
            if placeholder is not None:
                placeholder.close()
                placeholder = None
            try:
                self._server = await asyncio.start_server(
                    self._handle, "127.0.0.1", self._port, reuse_address=True
                )
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        sockets = self._server.sockets
        self._port = sockets[0].getsockname()[1]

    async def refuse(self) -> None:
        """Stop listening: new connections are refused (open ones are left alone).

        The port stays reserved by a bound socket that does not listen (a connection attempt
        is answered with a reset, ECONNREFUSED), so no other process on the machine can take
        it meanwhile and :meth:`accept` gets it back.
        """
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2)
        placeholder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        placeholder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            placeholder.bind(("127.0.0.1", self._port))
        except OSError:
            placeholder.close()
        else:
            self._placeholder = placeholder

    @property
    def listening(self) -> bool:
        return self._server is not None

    def describe(self) -> str:
        return (f"proxy {self.address} -> {self.target_host}:{self.target_port}:"
                f" {'listening' if self.listening else 'refusing'},"
                f" {len(self._links)} open, {self.connections_made} made,"
                f" latency {self.latency_s:g} s")

    def cut(self) -> int:
        """Reset every open connection; return how many there were."""
        links = list(self._links)
        for link in links:
            self._drop(link)
        return len(links)

    def drop_response_to_produce(
        self, topic: str, *, reset_after_s: float | None = None
    ) -> asyncio.Event:
        """Arm the trap for the next Produce request naming ``topic``; the event is set when it
        has been forwarded (and its response is about to be swallowed).

        With ``reset_after_s`` the connection is then reset after that delay instead of held
        open until the client gives up: a retriable connection error, the case in which a
        client that retries by itself sends the same records again.
        """
        self._trap = _ProduceTrap(topic.encode(), reset_after_s)
        return self._trap.hit

    def watch(self, pattern: bytes) -> asyncio.Event:
        """An event set the next time ``pattern`` goes from a client to the server (e.g.
        ``b"BEGIN"``: a transaction is starting)."""
        seen = asyncio.Event()
        self._watches.append((pattern, seen))
        return seen

    # --------------------------------------------------------------------------- plumbing

    async def _handle(self, client_reader: asyncio.StreamReader,
                      client_writer: asyncio.StreamWriter) -> None:
        self.connections_made += 1
        try:
            server_reader, server_writer = await asyncio.open_connection(
                self.target_host, self.target_port
            )
        except OSError:
            _reset(client_writer)
            return
        link = _Link(client_writer, server_writer)
        self._links.add(link)
        link.tasks = [
            asyncio.ensure_future(self._pump(link, client_reader, server_writer, upstream=True)),
            asyncio.ensure_future(self._pump(link, server_reader, client_writer, upstream=False)),
        ]
        try:
            await asyncio.gather(*link.tasks, return_exceptions=True)
        except asyncio.CancelledError:
            pass  # the loop is closing: the top of this connection's task, nothing to pass on
        finally:
            self._drop(link)

    async def _pump(self, link: _Link, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter, *, upstream: bool) -> None:
        """Copy one direction, with latency; read the Kafka framing on the way."""
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        sender = asyncio.ensure_future(_deliver(queue, writer))
        try:
            while True:
                data = await reader.read(_CHUNK)
                if not data:
                    break
                if upstream and self._watches:
                    self._match_watches(data)
                if self.kafka:
                    data = self._watch_requests(link, data) if upstream else self._filter(link, data)
                if data:
                    queue.put_nowait((time.monotonic() + self.latency_s, data))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            queue.put_nowait(None)
            with contextlib.suppress(Exception):
                await sender
            self._drop(link)

    def _match_watches(self, data: bytes) -> None:
        for pattern, seen in list(self._watches):
            if pattern in data:
                self._watches.remove((pattern, seen))
                seen.set()

    def _watch_requests(self, link: _Link, data: bytes) -> bytes:
        """Pass every byte on; note the correlation id of the trapped Produce request."""
        buffer = link.requests
        buffer += data
        while len(buffer) >= 4:
            size = struct.unpack(">i", buffer[:4])[0]
            if len(buffer) < 4 + size:
                break
            frame = bytes(buffer[4 : 4 + size])
            del buffer[: 4 + size]
            if len(frame) < 8:
                continue
            api_key, _version, correlation = struct.unpack(">hhi", frame[:8])
            trap = self._trap
            if (api_key == PRODUCE_API_KEY and trap is not None and trap.topic in frame
                    and link.drop_from_correlation is None):
                link.drop_from_correlation = correlation
                self._trap = None
                trap.hit.set()
                if trap.reset_after_s is not None:
                    asyncio.get_running_loop().call_later(trap.reset_after_s, self._drop, link)
        return data

    def _filter(self, link: _Link, data: bytes) -> bytes:
        """Return the whole response frames that may go back: those before the trapped one."""
        if link.muted:
            return b""
        buffer = link.responses
        buffer += data
        kept = bytearray()
        while len(buffer) >= 8:
            size, correlation = struct.unpack(">ii", buffer[:8])
            if correlation == link.drop_from_correlation:
                link.muted = True
                buffer.clear()
                break
            if len(buffer) < 4 + size:
                break
            kept += buffer[: 4 + size]
            del buffer[: 4 + size]
        return bytes(kept)

    def _drop(self, link: _Link) -> None:
        if link not in self._links:
            return
        self._links.discard(link)
        for writer in (link.client, link.server):
            _reset(writer)
        current = asyncio.current_task()
        for task in link.tasks:
            if task is not current and not task.done():
                task.cancel()


async def _deliver(queue: asyncio.Queue[tuple[float, bytes] | None],
                   writer: asyncio.StreamWriter) -> None:
    while (item := await queue.get()) is not None:
        due, data = item
        wait = due - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        try:
            writer.write(data)
            await writer.drain()
        except (OSError, RuntimeError):
            return


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a dropped network path or killed peer would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(Exception):
        writer.transport.abort()
