"""Per-test topic names: the contract's four topics with a random suffix."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

DEFAULT_PARTITIONS: dict[str, int] = {
    "activity": 4,
    "preferences": 2,
    "notifications": 2,
    "dlq": 1,
}


@dataclass(frozen=True)
class Topics:
    activity: str
    preferences: str
    notifications: str
    dlq: str
    partitions: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PARTITIONS), compare=False)

    @classmethod
    def unique(cls, partitions: dict[str, int] | None = None) -> Topics:
        """Fresh names; ``partitions`` overrides counts by role (``activity``, ``preferences``,
        ``notifications``, ``dlq``)."""
        unknown = set(partitions or {}) - set(DEFAULT_PARTITIONS)
        if unknown:
            raise ValueError(f"unknown topic roles: {sorted(unknown)}")
        suffix = secrets.token_hex(4)
        return cls(
            activity=f"activity-logged-{suffix}",
            preferences=f"mentor-preferences-{suffix}",
            notifications=f"milestone-notifications-{suffix}",
            dlq=f"activity-logged-{suffix}.dlq",
            partitions={**DEFAULT_PARTITIONS, **(partitions or {})},
        )

    @property
    def names(self) -> tuple[str, str, str, str]:
        return (self.activity, self.preferences, self.notifications, self.dlq)

    def partitions_by_name(self) -> dict[str, int]:
        return {
            self.activity: self.partitions["activity"],
            self.preferences: self.partitions["preferences"],
            self.notifications: self.partitions["notifications"],
            self.dlq: self.partitions["dlq"],
        }

    def env(self) -> dict[str, str]:
        """The engine's ``MILESTONES_*_TOPIC`` variables for these names."""
        return {
            "MILESTONES_ACTIVITY_TOPIC": self.activity,
            "MILESTONES_PREFERENCES_TOPIC": self.preferences,
            "MILESTONES_NOTIFICATION_TOPIC": self.notifications,
            "MILESTONES_DLQ_TOPIC": self.dlq,
        }
