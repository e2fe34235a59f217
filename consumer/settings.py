"""One frozen settings object, read from ``MILESTONES_*`` variables and validated at start.

A bad value raises :class:`SettingsError` naming the variable, which the CLI prints as one line
and turns into exit status 2.
"""

from __future__ import annotations

import ssl
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    Field,
    FilePath,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from consumer.domain.milestones import normalize_thresholds

ENV_PREFIX = "MILESTONES_"

KafkaSecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]

FaultPoint = Literal["after_db_commit", "after_offset_commit", "after_send_ack", "after_mark_published"]


class SettingsError(Exception):
    """A setting that cannot be used; ``str()`` is the one line shown to the operator."""


def _comma_list(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    # Each field's docstring is its description: `milestones --help` lists them.
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, frozen=True, extra="ignore", use_attribute_docstrings=True
    )

    kafka_bootstrap_servers: str | None = None
    """host:port[,host:port]; unset: only `demo` runs (embedded broker)"""
    database_url: SecretStr | None = None
    """postgresql://user:password@host:port/db; unset: only `demo` runs"""
    group_id: str = Field("milestone-engine", min_length=1)
    """the engine's consumer group (`replay` uses <group>-replay)"""
    activity_topic: str = Field("activity-logged", min_length=1)
    """in: activity.logged and activity.deleted"""
    preferences_topic: str = Field("mentor-preferences", min_length=1)
    """in: preferences.changed"""
    notification_topic: str = Field("milestone-notifications", min_length=1)
    """out: milestone.reached"""
    dlq_topic: str = Field("activity-logged.dlq", min_length=1)
    """out: rejected messages, byte for byte"""
    thresholds_topic: str = Field("milestone-thresholds", min_length=1)
    """compacted: the organizations' thresholds"""
    kafka_session_timeout_ms: int = Field(10_000, ge=1_000)
    """consumer group session timeout"""
    kafka_request_timeout_ms: int = Field(15_000, ge=1_000)
    """produce and fetch request timeout"""
    kafka_security_protocol: KafkaSecurityProtocol = "PLAINTEXT"
    """PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"""
    kafka_sasl_mechanism: SaslMechanism = "PLAIN"
    """PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"""
    kafka_sasl_username: str | None = Field(None, min_length=1)
    """SASL user"""
    kafka_sasl_password: SecretStr | None = None
    """SASL password (never printed)"""
    kafka_ssl_cafile: FilePath | None = None
    """PEM file of the CA to trust"""
    kafka_ssl_certfile: FilePath | None = None
    """PEM client certificate"""
    kafka_ssl_keyfile: FilePath | None = None
    """PEM client key"""
    thresholds: Annotated[tuple[int, ...], NoDecode] = (50, 100, 200)
    """default milestones; an organization's row wins"""
    timezone: str = "Europe/Oslo"
    """the calendar year of a session"""
    notify_grace_days: int = Field(31, ge=0)
    """how long into a new year a past year's milestone still congratulates"""
    shutdown_timeout_s: float = Field(20.0, gt=0)
    """time to finish the batch in hand on SIGTERM"""
    metrics_port: int = Field(9464, ge=0, le=65535)
    """/metrics, /healthz, /readyz; 0 turns them off"""
    fault_point: FaultPoint | None = None
    """testing only: SIGKILL at this step of the commit order"""
    fault_after: int = Field(1, ge=1)
    """testing only: at the Nth time the step is reached"""
    counted_activity_types: Annotated[frozenset[str] | None, NoDecode] = None
    """comma list of counted activity types; unset: all"""
    enable_idempotence: bool = False
    """idempotent producer (a broker that supports it)"""
    batch_max_records: int = Field(3_000, ge=1)
    """records per fetch, and so per batch"""
    poll_timeout_ms: int = Field(200, ge=1)
    """how long a fetch waits for records"""
    fetch_max_wait_ms: int = Field(100, ge=0, le=30_000)
    """how long the broker may hold a fetch that found nothing"""
    fetch_max_bytes: int = Field(52_428_800, ge=1024)
    """bytes per fetch response"""
    max_partition_fetch_bytes: int = Field(1_048_576, ge=1024)
    """bytes per partition per fetch"""
    database_connect_timeout_s: float = Field(15.0, gt=0)
    """retries at start before exit 2"""
    retry_backoff_max_s: float = Field(5.0, gt=0)
    """cap of the back-off while Postgres is away"""
    transaction_retries: int = Field(5, ge=0)
    """immediate retries of a deadlocked batch"""
    batch_lanes: int = Field(2, ge=1, le=16)
    """concurrent transactions per batch"""
    publisher_batch_max: int = Field(5_000, ge=1)
    """notifications per publisher round"""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """DEBUG, INFO, WARNING or ERROR"""
    log_format: Literal["text", "json"] = "text"
    """text or json"""
    status_timeout_s: float = Field(5.0, gt=0, le=300)
    """status: seconds to wait for the broker"""
    status_max_lag: int | None = Field(None, ge=0)
    """status: exit 1 above this total lag; unset: not checked"""
    status_max_pending_age_s: float | None = Field(None, ge=0)
    """status: exit 1 when a notification waits longer; unset: not checked"""
    status_max_dead_letters_today: int | None = Field(None, ge=0)
    """status: exit 1 above this many dead letters today; unset: not checked"""
    status_broker_required: bool = True
    """status: exit 1 when the broker cannot be reached"""

    @field_validator("thresholds", mode="before")
    @classmethod
    def _parse_thresholds(cls, value: object) -> object:
        items = _comma_list(value)
        if isinstance(items, list):
            try:
                numbers = [int(item) for item in items]
            except (TypeError, ValueError):
                raise ValueError(f"not a comma list of integers: {value!r}") from None
            if not numbers:
                # An organization's empty row means "no milestones"; an empty default is far
                # more likely a broken deployment than a wish, so it is refused.
                raise ValueError("empty: give at least one threshold, e.g. 50,100,200")
            return normalize_thresholds(numbers)
        return value

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _any_case(cls, value: object, info: ValidationInfo) -> object:
        # The flag and the variable take any case: `debug` is as clear as `DEBUG`.
        if isinstance(value, str):
            return value.upper() if info.field_name == "log_level" else value.lower()
        return value

    @field_validator("counted_activity_types", mode="before")
    @classmethod
    def _parse_types(cls, value: object) -> object:
        if value is None:
            return None
        items = _comma_list(value)
        if isinstance(items, list):
            return frozenset(items) if items else None
        return value

    @field_validator("database_url")
    @classmethod
    def _usable_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            problem = database_url_problem(value.get_secret_value())
            if problem:
                raise ValueError(problem)
        return value

    @field_validator("kafka_bootstrap_servers")
    @classmethod
    def _usable_servers(cls, value: str | None) -> str | None:
        if value:
            problem = bootstrap_servers_problem(value)
            if problem:
                raise ValueError(problem)
        return value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value

    @model_validator(mode="after")
    def _usable_kafka_security(self) -> Settings:
        problem = kafka_security_problem(self)
        if problem:
            raise ValueError(problem)
        return self

    @property
    def kafka_uses_sasl(self) -> bool:
        return self.kafka_security_protocol in ("SASL_PLAINTEXT", "SASL_SSL")

    @property
    def kafka_uses_tls(self) -> bool:
        return self.kafka_security_protocol in ("SSL", "SASL_SSL")

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def input_topics(self) -> tuple[str, str]:
        return (self.activity_topic, self.preferences_topic)

    def require_database(self) -> str:
        if self.database_url is None:
            raise SettingsError(f"{ENV_PREFIX}DATABASE_URL is not set")
        return self.database_url.get_secret_value()

    def require_kafka(self) -> str:
        if not self.kafka_bootstrap_servers:
            raise SettingsError(f"{ENV_PREFIX}KAFKA_BOOTSTRAP_SERVERS is not set")
        return self.kafka_bootstrap_servers


_URL_EXAMPLE = "postgresql://user:password@host:5432/database"


def database_url_problem(url: str) -> str | None:
    """Why asyncpg could not use ``url``, in words that never repeat the URL (it may hold a
    password); None when it looks usable. Checked at start, so that a typo is one line naming
    the variable rather than a traceback from inside the driver at the first connection."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        return f"not a URL: write it as {_URL_EXAMPLE}"
    if scheme not in ("postgresql", "postgres"):
        return (f"scheme {scheme!r} is not supported (asyncpg takes postgresql://):"
                f" write it as {_URL_EXAMPLE}")
    location = rest.split("?", 1)[0]
    location = location.rsplit("@", 1)[-1].split("/", 1)[0]  # after the credentials
    for host in filter(None, location.split(",")):
        port = host.rsplit("]", 1)[-1] if host.startswith("[") else host
        if ":" not in port:
            continue
        number = port.rsplit(":", 1)[1]
        if not (number.isdigit() and 1 <= int(number) <= 65535):
            return f"port {number!r} is not a number from 1 to 65535: write it as {_URL_EXAMPLE}"
    return None


def bootstrap_servers_problem(servers: str) -> str | None:
    """Why aiokafka could not use ``servers`` (``host:port[,host:port]``), or None. Checked at
    start: aiokafka would raise from deep inside the first client's start instead."""
    for server in filter(None, (part.strip() for part in servers.split(","))):
        host, separator, port = server.rpartition(":")
        if not separator or host.endswith(":"):  # no port (aiokafka's default 9092), or IPv6
            continue
        if not host or host == "[]":
            return f"{server!r} has no host: write it as host:9092[,host:9092]"
        if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
            return (f"port {port!r} of {server!r} is not a number from 1 to 65535:"
                    " write it as host:9092[,host:9092]")
    return None


def _shown_default(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple | list | frozenset):
        return ",".join(map(str, value))
    return str(value)


def describe_setting(field: str) -> str:
    """``MILESTONES_NAME, default: value``: what a flag's help says about its setting."""
    info = Settings.model_fields[field]
    return f"{ENV_PREFIX}{field.upper()}, default: {_shown_default(info.default)}"


def environment_help() -> str:
    """Every variable with its default and description, read from the model (the epilog of
    ``milestones --help``, so a new setting appears there by itself)."""
    lines = ["environment variables (a flag, where there is one, overrides its variable):"]
    for name, info in Settings.model_fields.items():
        lines.append(f"  {ENV_PREFIX}{name.upper()}={_shown_default(info.default)}")
        if info.description:
            lines.append(f"      {info.description}")
    return "\n".join(lines) + "\n"


def kafka_security_problem(settings: Settings) -> str | None:
    """A contradiction among the Kafka security settings, as one line naming the variable.

    Credentials or certificates given for a protocol that does not use them are refused rather
    than ignored: a deployment that believes it authenticates but does not is the worse outcome.
    The TLS files are loaded once here, so a file that is not PEM (or a key that does not match
    its certificate) stops the start instead of every connection attempt failing later.
    """
    protocol = f"{ENV_PREFIX}KAFKA_SECURITY_PROTOCOL is {settings.kafka_security_protocol}"
    if settings.kafka_uses_sasl:
        for name in ("kafka_sasl_username", "kafka_sasl_password"):
            if getattr(settings, name) is None:
                return f"{ENV_PREFIX}{name.upper()}: not set, and {protocol}"
    else:
        for name in ("kafka_sasl_username", "kafka_sasl_password"):
            if getattr(settings, name) is not None:
                return (f"{ENV_PREFIX}{name.upper()}: set, but {protocol}, which sends no"
                        " credentials (use SASL_SSL or SASL_PLAINTEXT)")
    files = ("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile")
    if not settings.kafka_uses_tls:
        for name in files:
            if getattr(settings, name) is not None:
                return (f"{ENV_PREFIX}{name.upper()}: set, but {protocol}, which does not use"
                        " TLS (use SSL or SASL_SSL)")
        return None
    if settings.kafka_ssl_keyfile is not None and settings.kafka_ssl_certfile is None:
        return f"{ENV_PREFIX}KAFKA_SSL_CERTFILE: not set, but {ENV_PREFIX}KAFKA_SSL_KEYFILE is"
    try:
        kafka_ssl_context(settings)
    except SettingsError as error:
        return str(error)
    return None


def _no_key_password() -> bytes:
    # Without this, OpenSSL would ask for the pass phrase of an encrypted key on the terminal.
    return b""


def kafka_ssl_context(settings: Settings) -> ssl.SSLContext:
    """The TLS context of every Kafka client: the system's trust store plus the CA file, host
    names checked, and the client certificate when one is set. A file that cannot be loaded
    raises :class:`SettingsError` naming its variable."""
    cafile = settings.kafka_ssl_cafile
    try:
        context = ssl.create_default_context(cafile=str(cafile) if cafile is not None else None)
    except ssl.SSLError as error:
        raise SettingsError(
            f"{ENV_PREFIX}KAFKA_SSL_CAFILE: not a PEM certificate file ({error.reason or error})"
        ) from None
    if settings.kafka_ssl_certfile is not None:
        keyfile = settings.kafka_ssl_keyfile
        try:
            context.load_cert_chain(
                str(settings.kafka_ssl_certfile),
                str(keyfile) if keyfile is not None else None,
                password=_no_key_password,
            )
        except ssl.SSLError as error:
            raise SettingsError(
                f"{ENV_PREFIX}KAFKA_SSL_CERTFILE: the certificate and its key (an unencrypted"
                f" PEM key in {ENV_PREFIX}KAFKA_SSL_KEYFILE or in the same file) cannot be"
                f" loaded ({error.reason or error})"
            ) from None
    return context


def load_settings(**overrides: object) -> Settings:
    """Read the environment (flags override it); raise :class:`SettingsError` on a bad value."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as error:
        first = error.errors()[0]
        message = first["msg"].removeprefix("Value error, ")
        if not first["loc"]:  # a check across fields: its message names the variable
            raise SettingsError(message) from None
        name = ENV_PREFIX + str(first["loc"][0]).upper()
        raise SettingsError(f"{name}: {message}") from None
