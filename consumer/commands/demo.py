"""``milestones demo``."""

from __future__ import annotations

from consumer.settings import Settings


async def demo_command(settings: Settings, *, seconds: float | None) -> int:
    raise NotImplementedError
