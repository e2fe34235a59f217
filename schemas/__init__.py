"""The messages of the milestone engine's outside contract; docs/contract.md explains them."""

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
