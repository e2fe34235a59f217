"""A SASL front for the test broker: verifies PLAIN and SCRAM-SHA-256/512 logins, then pipes.

Why it exists: the embedded Tansu (0.6.0) serves only the SCRAM mechanisms, and with its
in-memory storage no SCRAM user can ever be created once ``--authentication`` is on (creating
one is itself a request that needs an authenticated connection). So the broker stays real and
this gateway in front of it plays the part of the broker's authenticator, the way a managed
Kafka checks logins: it answers ``SaslHandshake`` and ``SaslAuthenticate`` itself (RFC 4616
PLAIN, RFC 5802 SCRAM with a real salted-password check), forwards ``ApiVersions`` before the
login, refuses anything else before it, and after a good login passes every byte through.
A wrong password gets error 58 (``SASL_AUTHENTICATION_FAILED``), as Apache Kafka answers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import struct
from dataclasses import dataclass, field

from aiokafka.protocol.admin import (
    SaslAuthenticateResponse_v0,
    SaslAuthenticateResponse_v1,
    SaslHandShakeResponse_v1,
)

_API_VERSIONS, _HANDSHAKE, _AUTHENTICATE = 18, 17, 36
_AUTHENTICATION_FAILED, _UNSUPPORTED_MECHANISM, _ILLEGAL_STATE = 58, 33, 34
_HASHES = {"SCRAM-SHA-256": "sha256", "SCRAM-SHA-512": "sha512"}
_ITERATIONS = 4096


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    size = struct.unpack(">i", await reader.readexactly(4))[0]
    return await reader.readexactly(size)


def _frame(correlation_id: int, body: bytes) -> bytes:
    payload = struct.pack(">i", correlation_id) + body
    return struct.pack(">i", len(payload)) + payload


def _request_body(frame: bytes) -> tuple[int, int, int, bytes]:
    """api key, version, correlation id and the body after a non-flexible (v1) header."""
    api_key, version, correlation_id, client_len = struct.unpack(">hhih", frame[:10])
    return api_key, version, correlation_id, frame[10 + max(client_len, 0):]


def _attributes(message: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in message.split(",") if "=" in part)


@dataclass
class _Scram:
    """The server side of one SCRAM exchange (RFC 5802, no channel binding)."""

    hash_name: str
    users: dict[str, str]
    client_first_bare: str = ""
    server_first: str = ""
    nonce: str = ""
    salted: bytes = b""

    def _hmac(self, key: bytes, message: bytes) -> bytes:
        return hmac.new(key, message, self.hash_name).digest()

    def first(self, message: str) -> bytes | None:
        self.client_first_bare = message.split(",", 2)[2]
        attributes = _attributes(self.client_first_bare)
        password = self.users.get(attributes.get("n", ""))
        salt = os.urandom(16)
        # An unknown user gets a salt and fails at the proof, as a real server does.
        self.salted = hashlib.pbkdf2_hmac(
            self.hash_name, (password or os.urandom(8).hex()).encode(), salt, _ITERATIONS
        )
        self.nonce = attributes["r"] + base64.b64encode(os.urandom(18)).decode()
        salt_text = base64.b64encode(salt).decode()
        self.server_first = f"r={self.nonce},s={salt_text},i={_ITERATIONS}"
        return self.server_first.encode()

    def final(self, message: str) -> bytes | None:
        without_proof, _, proof_part = message.rpartition(",p=")
        if _attributes(without_proof).get("r") != self.nonce:
            return None
        auth_message = f"{self.client_first_bare},{self.server_first},{without_proof}".encode()
        client_key = self._hmac(self.salted, b"Client Key")
        stored_key = hashlib.new(self.hash_name, client_key).digest()
        signature = self._hmac(stored_key, auth_message)
        proof = base64.b64decode(proof_part)
        recovered = bytes(a ^ b for a, b in zip(proof, signature, strict=False))
        if not hmac.compare_digest(hashlib.new(self.hash_name, recovered).digest(), stored_key):
            return None
        server_key = self._hmac(self.salted, b"Server Key")
        return b"v=" + base64.b64encode(self._hmac(server_key, auth_message))


@dataclass
class SaslGateway:
    """Listens on ``port`` and forwards authenticated connections to ``upstream_port``."""

    upstream_port: int
    users: dict[str, str]
    mechanisms: tuple[str, ...] = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
    host: str = "127.0.0.1"
    port: int = 0
    refused: int = 0
    _server: asyncio.Server | None = field(default=None, repr=False)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set, repr=False)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        upstream: asyncio.StreamWriter | None = None
        try:
            up_reader, upstream = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            if await self._login(reader, writer, up_reader, upstream):
                await asyncio.gather(_pipe(reader, upstream), _pipe(up_reader, writer))
        except (OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            for stream in (writer, upstream):
                if stream is not None:
                    stream.close()
            self._tasks.discard(task)

    async def _login(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        upstream: asyncio.StreamWriter,
    ) -> bool:
        mechanism: str | None = None
        scram: _Scram | None = None
        while True:
            frame = await _read_frame(reader)
            api_key, version, correlation_id, body = _request_body(frame)
            if api_key == _API_VERSIONS:
                upstream.write(struct.pack(">i", len(frame)) + frame)
                await upstream.drain()
                answer = await _read_frame(up_reader)
                writer.write(struct.pack(">i", len(answer)) + answer)
            elif api_key == _HANDSHAKE:
                length = struct.unpack(">h", body[:2])[0]
                asked = body[2:2 + length].decode()
                error = 0 if asked in self.mechanisms else _UNSUPPORTED_MECHANISM
                mechanism = asked if error == 0 else None
                if mechanism in _HASHES:
                    scram = _Scram(_HASHES[mechanism], self.users)
                writer.write(_frame(correlation_id, SaslHandShakeResponse_v1(
                    error_code=error, enabled_mechanisms=list(self.mechanisms)).encode()))
            elif api_key == _AUTHENTICATE and mechanism is not None:
                token = body[4:4 + struct.unpack(">i", body[:4])[0]].decode()
                reply, done = self._step(mechanism, scram, token)
                error = 0 if reply is not None else _AUTHENTICATION_FAILED
                response = SaslAuthenticateResponse_v1 if version >= 1 else SaslAuthenticateResponse_v0
                fields: dict[str, object] = {
                    "error_code": error,
                    "error_message": None if error == 0 else "Authentication failed: invalid credentials",
                    "sasl_auth_bytes": reply or b"",
                }
                if version >= 1:
                    fields["session_lifetime_ms"] = 0
                writer.write(_frame(correlation_id, response(**fields).encode()))
                await writer.drain()
                if error:
                    self.refused += 1
                    return False
                if done:
                    return True
            else:
                return False  # anything else before a login: the connection is closed
            await writer.drain()

    def _step(self, mechanism: str, scram: _Scram | None, token: str) -> tuple[bytes | None, bool]:
        if mechanism == "PLAIN":
            _, user, password = token.split("\0", 2)
            good = self.users.get(user)
            ok = good is not None and hmac.compare_digest(good.encode(), password.encode())
            return (b"", True) if ok else (None, True)
        assert scram is not None
        if not scram.client_first_bare:
            return scram.first(token), False
        return scram.final(token), True


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    finally:
        writer.close()
