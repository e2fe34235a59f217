"""The messages of the milestone engine's outside contract (see CONTRACT.md)."""

from schemas.events import (
    ActivityDeleted,
    ActivityLogged,
    InputEvent,
    MilestoneReached,
    PreferencesChanged,
)

__all__ = [
    "ActivityDeleted",
    "ActivityLogged",
    "InputEvent",
    "MilestoneReached",
    "PreferencesChanged",
]
