"""``milestones sweep``."""

from __future__ import annotations

from consumer.settings import Settings


async def sweep_command(settings: Settings, *, year: int | None, organization: str | None) -> int:
    raise NotImplementedError
