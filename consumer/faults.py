"""The testing hook ``MILESTONES_FAULT_POINT``: SIGKILL this process at a named step."""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)


class FaultInjector:
    def __init__(self, point: str | None, after: int = 1) -> None:
        self._point = point
        self._after = after
        self._seen = 0

    def reached(self, point: str) -> None:
        """Kill the process (no clean-up, like a power cut) the Nth time ``point`` is reached."""
        if point != self._point:
            return
        self._seen += 1
        if self._seen >= self._after:
            log.warning("fault point %s reached: killing the process", point)
            for handler in logging.getLogger().handlers:
                handler.flush()
            os.kill(os.getpid(), signal.SIGKILL)
