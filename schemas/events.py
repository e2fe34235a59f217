"""Pydantic models of every message on the contract's topics.

Strict on purpose: a producer that sends ``"schema_version": "1"`` or a naive timestamp gets a
dead letter naming the field, not a silently coerced value. Unknown extra fields are ignored so
that producers can add fields before the engine reads them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal
from uuid import UUID

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, StrictInt

MAX_ACTIVITY_TYPE_CHARS = 100
SUPPORTED_SCHEMA_VERSION = 1


def _supported_version(value: int) -> int:
    if value != SUPPORTED_SCHEMA_VERSION:
        raise ValueError(f"unsupported schema_version {value}")
    return value


def _no_nul(value: str) -> str:
    # Postgres text cannot hold U+0000 or a lone surrogate; refusing them here keeps the batch
    # transaction clean.
    if "\x00" in value:
        raise ValueError("contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains a lone surrogate") from None
    return value


# StrictInt, not Literal[1]: a Literal would accept JSON `true` as 1.
SchemaVersion = Annotated[StrictInt, AfterValidator(_supported_version)]

ActivityType = Annotated[
    str,
    Field(min_length=1, max_length=MAX_ACTIVITY_TYPE_CHARS),
    AfterValidator(_no_nul),
]


class _Message(BaseModel):
    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")


class ActivityLogged(_Message):
    """A session held by a mentor; counted once per ``activity_id``."""

    event_type: Literal["activity.logged"]
    schema_version: SchemaVersion
    event_id: UUID
    activity_id: UUID
    mentor_id: UUID
    organization_id: UUID
    occurred_at: AwareDatetime
    activity_type: ActivityType


class ActivityDeleted(_Message):
    """Removes a session from the count it was counted under, or prevents a late log."""

    event_type: Literal["activity.deleted"]
    schema_version: SchemaVersion
    event_id: UUID
    activity_id: UUID
    mentor_id: UUID
    organization_id: UUID
    deleted_at: AwareDatetime


class PreferencesChanged(_Message):
    """A mentor's opt-in (true) or opt-out (false) of milestone notifications."""

    event_type: Literal["preferences.changed"]
    schema_version: SchemaVersion
    event_id: UUID
    mentor_id: UUID
    milestone_notifications: bool
    changed_at: AwareDatetime


InputEvent = Annotated[
    ActivityLogged | ActivityDeleted | PreferencesChanged,
    Field(discriminator="event_type"),
]


class MilestoneReached(_Message):
    """What the notifier receives; it deduplicates on ``notification_id``."""

    event_type: Literal["milestone.reached"] = "milestone.reached"
    schema_version: Literal[1] = 1
    notification_id: UUID
    mentor_id: UUID
    organization_id: UUID
    scenario_type: Literal["milestone"] = "milestone"
    year: int
    milestone_value: int = Field(gt=0)
    session_count: int = Field(ge=0)
    activity_id: UUID | None
    reached_at: datetime
    created_at: datetime


class ThresholdsChanged(_Message):
    """An organization's thresholds, as set by ``milestones thresholds`` (key: the organization).

    Written to the compacted thresholds topic, and read back by ``run`` at start and by
    ``replay`` to restore ``milestone_thresholds``. ``thresholds``: ``[]`` means no milestones
    for that organization; ``null`` removes its row, so the default thresholds apply again.
    """

    event_type: Literal["thresholds.changed"] = "thresholds.changed"
    schema_version: SchemaVersion = SUPPORTED_SCHEMA_VERSION
    organization_id: UUID
    thresholds: list[Annotated[StrictInt, Field(gt=0)]] | None
    changed_at: AwareDatetime
