"""Clean-up steps that finish on time, whatever the client does.

``asyncio.wait_for`` is not enough for them, for two reasons met in the fault tests:
it waits for a cancelled step to unwind, and aiokafka shields its requests (a ``stop()`` against
a stalled broker outlived its timeout); and aiokafka's ``AIOKafkaConsumer.stop()`` re-raises
the cancellation of its own fetch tasks, which a caller cannot tell from its own cancellation
(``suppress(Exception)`` let it through and the service died with a traceback at shutdown).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

log = logging.getLogger(__name__)


async def within(step: Awaitable[Any], timeout_s: float, what: str) -> bool:
    """Run ``step`` for at most ``timeout_s``; True if it finished cleanly.

    A step that overruns is cancelled and left to unwind on its own; one that fails (with any
    exception, a ``CancelledError`` of its own included) is logged. Only the caller's own
    cancellation propagates.
    """
    task = asyncio.ensure_future(step)
    task.add_done_callback(_retrieve)
    done, _ = await asyncio.wait({task}, timeout=max(timeout_s, 0.01))
    if not done:
        task.cancel()
        log.warning("%s did not finish in %.1f s; left behind", what, timeout_s)
        return False
    if task.cancelled():
        log.info("%s was cancelled from inside", what)
        return False
    error = task.exception()
    if error is not None:
        log.info("%s failed: %s: %s", what, type(error).__name__, error)
        return False
    return True


def _retrieve(task: asyncio.Future[Any]) -> None:
    # Mark the outcome as seen: a step left behind must not log "exception never retrieved".
    if not task.cancelled():
        task.exception()
