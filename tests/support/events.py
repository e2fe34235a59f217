"""The contract's input events as plain dicts, field for field as in docs/contract.md.

Every id argument takes a ``UUID`` or a string (a string is sent as given, so a test can send a
malformed one); ``None`` for an id means a fresh ``uuid4``.
"""

from __future__ import annotations

import uuid
from typing import Any

ORG = "0b6c1f0e-7a4d-4c1e-9a53-2f8e6d1c0a01"
OTHER_ORG = "5d2f7c3a-1b8e-4f60-8c9d-3e4a5b6c7d02"

NOTIFICATION_NAMESPACE = uuid.UUID("6f1c2a8e-4d3b-5a7f-9e21-0c8b7d6a5f43")

Id = uuid.UUID | str


def new_id() -> str:
    """A fresh UUID in canonical text form."""
    return str(uuid.uuid4())


def _id(value: Id | None) -> str:
    return new_id() if value is None else str(value)


def logged(
    mentor_id: Id,
    activity_id: Id | None = None,
    occurred_at: str = "2026-03-14T10:00:00+01:00",
    organization_id: Id = ORG,
    activity_type: str = "session",
    event_id: Id | None = None,
) -> dict[str, Any]:
    """An ``activity.logged`` event."""
    return {
        "event_type": "activity.logged",
        "schema_version": 1,
        "event_id": _id(event_id),
        "activity_id": _id(activity_id),
        "mentor_id": str(mentor_id),
        "organization_id": str(organization_id),
        "occurred_at": occurred_at,
        "activity_type": activity_type,
    }


def deleted(
    mentor_id: Id,
    activity_id: Id,
    deleted_at: str = "2026-03-20T08:00:00+00:00",
    organization_id: Id = ORG,
    event_id: Id | None = None,
) -> dict[str, Any]:
    """An ``activity.deleted`` event."""
    return {
        "event_type": "activity.deleted",
        "schema_version": 1,
        "event_id": _id(event_id),
        "activity_id": str(activity_id),
        "mentor_id": str(mentor_id),
        "organization_id": str(organization_id),
        "deleted_at": deleted_at,
    }


def preference(
    mentor_id: Id,
    enabled: bool,
    changed_at: str = "2026-03-01T12:00:00+00:00",
    event_id: Id | None = None,
) -> dict[str, Any]:
    """A ``preferences.changed`` event; ``enabled=False`` opts the mentor out."""
    return {
        "event_type": "preferences.changed",
        "schema_version": 1,
        "event_id": _id(event_id),
        "mentor_id": str(mentor_id),
        "milestone_notifications": enabled,
        "changed_at": changed_at,
    }


def notification_id(mentor_id: Id, year: int, milestone_value: int) -> str:
    """The contract's deterministic ``notification_id``, computed independently of the engine."""
    canonical = str(uuid.UUID(str(mentor_id)))
    return str(uuid.uuid5(NOTIFICATION_NAMESPACE, f"{canonical}:{year}:{milestone_value}"))
