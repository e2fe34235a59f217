"""One frozen settings object, read from ``MILESTONES_*`` variables and validated at start.

A bad value raises :class:`SettingsError` naming the variable, which the CLI prints as one line
and turns into exit status 2.
"""

from __future__ import annotations

from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from consumer.domain.milestones import normalize_thresholds

ENV_PREFIX = "MILESTONES_"

FaultPoint = Literal["after_db_commit", "after_offset_commit", "after_send_ack", "after_mark_published"]


class SettingsError(Exception):
    """A setting that cannot be used; ``str()`` is the one line shown to the operator."""


def _comma_list(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore")

    kafka_bootstrap_servers: str | None = None
    database_url: SecretStr | None = None
    group_id: str = Field("milestone-engine", min_length=1)
    activity_topic: str = Field("activity-logged", min_length=1)
    preferences_topic: str = Field("mentor-preferences", min_length=1)
    notification_topic: str = Field("milestone-notifications", min_length=1)
    dlq_topic: str = Field("activity-logged.dlq", min_length=1)
    kafka_session_timeout_ms: int = Field(10_000, ge=1_000)
    kafka_request_timeout_ms: int = Field(15_000, ge=1_000)
    thresholds: Annotated[tuple[int, ...], NoDecode] = (50, 100, 200)
    timezone: str = "Europe/Oslo"
    notify_grace_days: int = Field(31, ge=0)
    shutdown_timeout_s: float = Field(20.0, gt=0)
    metrics_port: int = Field(9464, ge=0, le=65535)
    fault_point: FaultPoint | None = None
    fault_after: int = Field(1, ge=1)
    counted_activity_types: Annotated[frozenset[str] | None, NoDecode] = None
    enable_idempotence: bool = False
    batch_max_records: int = Field(3_000, ge=1)
    poll_timeout_ms: int = Field(200, ge=1)
    fetch_max_wait_ms: int = Field(100, ge=0, le=30_000)
    fetch_max_bytes: int = Field(52_428_800, ge=1024)
    max_partition_fetch_bytes: int = Field(1_048_576, ge=1024)
    database_connect_timeout_s: float = Field(15.0, gt=0)
    retry_backoff_max_s: float = Field(5.0, gt=0)
    transaction_retries: int = Field(5, ge=0)
    batch_lanes: int = Field(2, ge=1, le=16)
    publisher_batch_max: int = Field(500, ge=1)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"

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

    @field_validator("counted_activity_types", mode="before")
    @classmethod
    def _parse_types(cls, value: object) -> object:
        if value is None:
            return None
        items = _comma_list(value)
        if isinstance(items, list):
            return frozenset(items) if items else None
        return value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value

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


def load_settings(**overrides: object) -> Settings:
    """Read the environment (flags override it); raise :class:`SettingsError` on a bad value."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as error:
        first = error.errors()[0]
        name = ENV_PREFIX + str(first["loc"][0]).upper() if first["loc"] else ENV_PREFIX
        message = first["msg"].removeprefix("Value error, ")
        raise SettingsError(f"{name}: {message}") from None
