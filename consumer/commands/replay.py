"""``milestones replay``."""

from __future__ import annotations

from consumer.settings import Settings


async def replay_command(settings: Settings, *, from_beginning: bool, from_timestamp: str | None,
                         no_notify: bool) -> int:
    raise NotImplementedError
