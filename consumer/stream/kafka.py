"""Building aiokafka clients from the settings, in one place.

Every client the engine makes (consumer, producers, the publisher's reader, replay, status,
topic creation) takes its connection options from :func:`kafka_client_options`, so the
security settings reach them all; a client built elsewhere would silently talk plaintext.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
import struct
import time
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.conn import AIOKafkaConnection, CloseReason, collect_hosts, create_conn
from aiokafka.errors import (
    IllegalSaslStateError,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)

from consumer.retry import Backoff
from consumer.settings import ENV_PREFIX, Settings, SettingsError, kafka_ssl_context
from consumer.stream.teardown import within

log = logging.getLogger(__name__)

_Client = TypeVar("_Client", AIOKafkaConsumer, AIOKafkaProducer)

CLIENT_ID = "milestone-engine"


class KafkaAccessRefused(SettingsError):
    """The broker answered but refused our credentials or certificate: retrying cannot help."""


def kafka_client_options(settings: Settings) -> dict[str, Any]:
    """The keyword arguments every aiokafka client of the engine is built with."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.require_kafka(),
        "security_protocol": settings.kafka_security_protocol,
        "client_id": CLIENT_ID,
    }
    if settings.kafka_uses_tls:
        options["ssl_context"] = kafka_ssl_context(settings)
    if settings.kafka_uses_sasl:
        password = settings.kafka_sasl_password
        options.update(
            sasl_mechanism=settings.kafka_sasl_mechanism,
            sasl_plain_username=settings.kafka_sasl_username,
            sasl_plain_password=password.get_secret_value() if password is not None else None,
        )
    return options


_verified: set[tuple[object, ...]] = set()


async def verify_kafka_access(settings: Settings) -> None:
    """Open one connection with the configured security and raise :class:`KafkaAccessRefused`
    (one line naming the variable, no secret) when the broker refuses the credentials or its
    certificate is not trusted.

    aiokafka's own start logs such a refusal and reports only "unable to bootstrap", which the
    start-up retries would wait out as if the broker were down. A broker that does not answer
    at all is left to those retries. Checked once per process and configuration.
    """
    if settings.kafka_security_protocol == "PLAINTEXT":
        return
    key = (settings.kafka_bootstrap_servers, settings.kafka_security_protocol,
           settings.kafka_sasl_mechanism, settings.kafka_sasl_username,
           settings.kafka_sasl_password, settings.kafka_ssl_cafile, settings.kafka_ssl_certfile)
    if key in _verified:
        return
    options = kafka_client_options(settings)
    options.pop("bootstrap_servers")
    host, port, _ = collect_hosts(settings.require_kafka())[0]
    try:
        connection = await create_conn(
            host, port, request_timeout_ms=settings.kafka_request_timeout_ms, **options
        )
    except ssl.SSLCertVerificationError as error:
        raise KafkaAccessRefused(
            f"{ENV_PREFIX}KAFKA_SSL_CAFILE: the certificate of {host}:{port} is not trusted"
            f" ({error.verify_message})"
        ) from None
    except ssl.SSLError as error:
        raise _tls_refused(host, port, error) from None
    except SaslAuthenticationFailed:
        raise KafkaAccessRefused(
            f"{ENV_PREFIX}KAFKA_SASL_PASSWORD: {host}:{port} refused user"
            f" {settings.kafka_sasl_username!r} with {settings.kafka_sasl_mechanism}"
        ) from None
    except (UnsupportedSaslMechanismError, IllegalSaslStateError):
        raise KafkaAccessRefused(
            f"{ENV_PREFIX}KAFKA_SASL_MECHANISM: {host}:{port} does not accept"
            f" {settings.kafka_sasl_mechanism}"
        ) from None
    except (TimeoutError, OSError, KafkaError) as error:
        # With TLS 1.3 a refused client certificate arrives as an alert after the handshake:
        # aiokafka reports the closed connection, the TLS error is its cause.
        cause = error.__cause__ or error.__context__
        if isinstance(cause, ssl.SSLError):
            raise _tls_refused(host, port, cause) from None
        return  # not answering (yet): the callers' start-up retries decide
    connection.close()
    _verified.add(key)


def _tls_refused(host: str, port: int, error: ssl.SSLError) -> KafkaAccessRefused:
    reason = error.reason or str(error)
    if "CERTIFICATE_REQUIRED" in reason.upper() or "BAD_CERTIFICATE" in reason.upper():
        return KafkaAccessRefused(
            f"{ENV_PREFIX}KAFKA_SSL_CERTFILE: {host}:{port} wants a client certificate it"
            f" trusts ({reason})"
        )
    return KafkaAccessRefused(
        f"{ENV_PREFIX}KAFKA_SECURITY_PROTOCOL: the TLS handshake with {host}:{port} failed"
        f" ({reason})"
    )


def make_admin(settings: Settings) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(
        request_timeout_ms=settings.kafka_request_timeout_ms, **kafka_client_options(settings)
    )

# The publisher builds one record batch per partition and round; Kafka's default limit for a
# record batch (``message.max.bytes``) is about 1 MiB, so half of it leaves room.
PUBLISHER_MAX_BATCH_BYTES = 512 * 1024


def tolerate_closed_transports() -> None:
    """Make aiokafka treat uvloop's "handler is closed" like the ``OSError`` it expects.

    aiokafka turns an ``OSError`` from writing a request into ``KafkaConnectionError``, which
    every caller handles. On asyncio a write to a connection the broker just closed is silently
    dropped; uvloop raises ``RuntimeError`` instead. In a fault test that error escaped into
    aiokafka's fetch routine and ended it: the consumer fetched nothing, forever, and said
    nothing. uvloop is kept: it gave 54k against 43k events/s. Idempotent; a test pins it.
    """
    original = AIOKafkaConnection.send
    if getattr(original, "_tolerates_closed_transports", False):
        return

    def send(self: AIOKafkaConnection, request: Any, expect_response: bool = True) -> Any:
        try:
            return original(self, request, expect_response)
        except RuntimeError as error:
            if "handler is closed" not in str(error):
                raise
            self.close(reason=CloseReason.CONNECTION_BROKEN)
            raise KafkaConnectionError(
                f"Connection at {self.host}:{self.port} broken: {error}"
            ) from error

    send._tolerates_closed_transports = True  # type: ignore[attr-defined]
    send.__wrapped__ = original  # type: ignore[attr-defined]
    AIOKafkaConnection.send = send


def broker_trouble(error: BaseException | None) -> bool:
    """An error that says the broker or the connection to it failed, not the engine.

    aiokafka raises its own errors, except in one race: a request written just as the broker
    closed the connection gets uvloop's ``RuntimeError`` ("the handler is closed"). An offset
    commit that met it in a fault test stopped the engine; it is a lost connection like any
    other, so the commit is skipped and the batch read again.
    """
    if isinstance(error, KafkaError | TimeoutError):
        return True
    return isinstance(error, RuntimeError) and "handler is closed" in str(error)


def make_producer(
    settings: Settings, *, retry_internally: bool = True, max_batch_bytes: int = 16384
) -> AIOKafkaProducer:
    """A producer with ``acks=all``.

    ``retry_internally=False`` is for the notification publisher: without idempotence, an
    internal re-send after a lost response can write a record twice, so the publisher wants the
    error instead and settles the doubt itself by reading the topic back. The publisher also
    hands over whole record batches (``send_batch``), up to ``PUBLISHER_MAX_BATCH_BYTES``.
    """
    tolerate_closed_transports()
    producer = AIOKafkaProducer(
        acks="all",
        enable_idempotence=settings.enable_idempotence,
        request_timeout_ms=settings.kafka_request_timeout_ms,
        linger_ms=0,
        max_batch_size=max_batch_bytes,
        **kafka_client_options(settings),
    )
    if not retry_internally and not settings.enable_idempotence:
        _disable_internal_retries(producer)
    return producer


async def started(client: _Client, settings: Settings) -> _Client:
    """Start an aiokafka client after checking the broker accepts us
    (:func:`verify_kafka_access`); one that fails to start is stopped, not leaked."""
    try:
        await verify_kafka_access(settings)
        await client.start()
    except BaseException:
        await within(client.stop(), 5.0, "stopping a client that did not start")
        raise
    return client


# How long a command or the service waits at start for a broker that is still coming up.
BROKER_START_TIMEOUT_S = 15.0


async def start_client(client: Any, settings: Settings) -> None:
    """Start an aiokafka client, retrying while the broker is still coming up; refused
    credentials or an untrusted certificate stop at once (:class:`KafkaAccessRefused`), a
    broker still away after :data:`BROKER_START_TIMEOUT_S` is a :class:`SettingsError`."""
    backoff = Backoff(0.5, 0.5, jitter=False, give_up_after_s=BROKER_START_TIMEOUT_S)
    deadline = time.monotonic() + BROKER_START_TIMEOUT_S
    with _quiet_refused_connections():
        while True:
            try:
                # The attempt too is bounded: against a frozen broker (connections accepted,
                # never answered) one start alone would wait aiokafka's request timeout, 40 s
                # for a consumer, well past the bound the one-line refusal names.
                async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                    await started(client, settings)
                return
            except (KafkaError, TimeoutError) as error:
                if not await backoff.wait():
                    why = "no answer" if isinstance(error, TimeoutError) else type(error).__name__
                    raise SettingsError(
                        f"{ENV_PREFIX}KAFKA_BOOTSTRAP_SERVERS: broker unreachable after "
                        f"{BROKER_START_TIMEOUT_S:g} s ({why})"
                    ) from None


class _DropRefusedConnections(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Unable connect to")


_DROP_REFUSED = _DropRefusedConnections()
_quieted = 0


@contextlib.contextmanager
def _quiet_refused_connections() -> Iterator[None]:
    """While a client starts, aiokafka logs every refused attempt as an ERROR (30 of them in
    15 s); the refusal is reported once, by the line that ends the command. Later in a run,
    those lines are kept: they are how an operator sees the broker go away."""
    global _quieted
    aiokafka_log = logging.getLogger("aiokafka")
    _quieted += 1
    aiokafka_log.addFilter(_DROP_REFUSED)
    try:
        yield
    finally:
        _quieted -= 1
        if not _quieted:
            aiokafka_log.removeFilter(_DROP_REFUSED)


def _disable_internal_retries(producer: Any) -> None:
    # aiokafka re-enqueues a failed batch until it is older than its time-to-live; a
    # time-to-live of zero makes every error final. Private attribute, pinned by the
    # lost-acknowledgement fault test.
    accumulator = getattr(producer, "_message_accumulator", None)
    if accumulator is not None and hasattr(accumulator, "_batch_ttl"):
        accumulator._batch_ttl = 0
    else:  # pragma: no cover - a future aiokafka
        log.warning("cannot disable aiokafka's internal retries; duplicates are possible")


def make_consumer(settings: Settings, *, group_id: str | None, **extra: Any) -> AIOKafkaConsumer:
    tolerate_closed_transports()
    session_ms = settings.kafka_session_timeout_ms
    return AIOKafkaConsumer(
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=session_ms,
        heartbeat_interval_ms=max(100, session_ms // 4),
        rebalance_timeout_ms=max(session_ms, 30_000),
        max_poll_interval_ms=300_000,
        max_poll_records=settings.batch_max_records,
        fetch_max_bytes=settings.fetch_max_bytes,
        fetch_max_wait_ms=settings.fetch_max_wait_ms,
        max_partition_fetch_bytes=settings.max_partition_fetch_bytes,
        **kafka_client_options(settings),
        **extra,
    )


_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


@functools.cache
def _words(length: int) -> struct.Struct:
    return struct.Struct(f"<{length // 4}I")


def partition_for_key(key: bytes, partitions: Sequence[int]) -> int:
    """The partition the default producer (Java's and aiokafka's) chooses for ``key``.

    The publisher builds its record batches per partition itself, so it must choose as the
    default partitioner would: a mentor's notifications keep going to one partition whoever
    produced them. aiokafka's murmur2 walks the key byte by byte in Python, a fifth of the
    publisher's time when used here; this one reads four bytes at a time and gives the same hash (a test
    compares them on random keys).
    """
    length = len(key)
    h = 0x9747B28C ^ length
    whole = length & ~3
    for k in _words(whole).unpack_from(key):
        k = (k * _M) & _MASK
        k ^= k >> 24
        h = ((h * _M) & _MASK) ^ ((k * _M) & _MASK)
    extra = length & 3
    if extra:
        if extra >= 3:
            h ^= key[whole + 2] << 16
        if extra >= 2:
            h ^= key[whole + 1] << 8
        h = ((h ^ key[whole]) * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return partitions[(h & 0x7FFFFFFF) % len(partitions)]


async def high_watermarks(
    consumer: AIOKafkaConsumer, tps: Sequence[TopicPartition], *, timeout_s: float
) -> dict[TopicPartition, int]:
    """The end (high watermark) of each of ``tps``, which ``consumer`` has assigned.

    ``end_offsets()`` (ListOffsets) answers the end on Kafka, but on Tansu the base offset of
    the partition's last batch: a lower bound either way. A fetch from there returns at most
    that last batch, and every fetch response carries the true high watermark. The consumer's
    positions move, and each partition is paused once its end is known. ``KafkaTimeoutError``
    when the broker has not answered for every partition within ``timeout_s``.
    """
    if not tps:
        return {}
    lower: dict[TopicPartition, int] = await consumer.end_offsets(list(tps))
    for tp in tps:
        consumer.seek(tp, lower[tp])
    ends: dict[TopicPartition, int] = {}
    deadline = time.monotonic() + timeout_s
    while True:
        for tp in tps:
            high = consumer.highwater(tp)
            if tp not in ends and high is not None:
                ends[tp] = high
                consumer.pause(tp)
        missing = [tp for tp in tps if tp not in ends]
        if not missing:
            return ends
        if time.monotonic() > deadline:
            named = ", ".join(f"{tp.topic}[{tp.partition}]" for tp in missing[:5])
            raise KafkaTimeoutError(f"no high watermark for {named} after {timeout_s:g} s")
        await consumer.getmany(*missing, timeout_ms=200, max_records=1)
