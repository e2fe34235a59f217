"""``milestones status``."""

from __future__ import annotations

from consumer.settings import Settings


async def status_command(settings: Settings) -> int:
    raise NotImplementedError
