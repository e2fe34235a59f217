"""The one back-off every retrying loop of the service waits with.

Each site keeps its own loop and its own decision of what is worth retrying (a refused
password is not, a database still starting is); what they share is here: the delays (capped
exponential, optionally with jitter), the bound in time, and the rules of the wait itself:

- a cancellation (``CancelledError``) propagates at once: nothing here catches it;
- a shutdown event ends a wait early (``stop``), so SIGTERM is never held up by a back-off;
- the wait itself can be the caller's (``sleep``): the engine waits by polling its paused
  partitions so that it stays in the consumer group, the publisher by an event a commit sets.

Why not tenacity: its ``AsyncRetrying`` retries one call until it returns. The engine's and the
publisher's loops are long-lived and reset the back-off on every success in the middle of other
work (a fetch, a round of sends), the writer retries two kinds of failure with different pauses,
and each site logs its own line before waiting: wrapping them as single retried calls would
reshape the control flow that the numbered commit order is written against, for no gain over
the thirty lines below.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable

Sleep = Callable[[float], Awaitable[None]]


class Backoff:
    """Delays from ``first_s`` doubling up to ``cap_s``; with ``jitter`` each one is drawn in
    [½, 1] of its step, so processes that failed together do not retry together.

    With ``give_up_after_s``, :meth:`wait` returns False instead of waiting once a wait would
    end later than that many seconds after the back-off was made.
    """

    def __init__(
        self,
        first_s: float = 0.2,
        cap_s: float = 5.0,
        *,
        jitter: bool = True,
        give_up_after_s: float | None = None,
    ) -> None:
        if first_s <= 0 or cap_s < first_s:
            raise ValueError(f"need 0 < first_s <= cap_s, got {first_s} and {cap_s}")
        self._first_s = first_s
        self._cap_s = cap_s
        self._jitter = jitter
        self._step_s = first_s
        self._deadline = None if give_up_after_s is None else time.monotonic() + give_up_after_s
        self.attempts = 0  # failures since the last reset

    @property
    def step_s(self) -> float:
        """The step the next delay is drawn from (what a log line says it will wait)."""
        return self._step_s

    def reset(self) -> None:
        """After a success: the next failure waits the first step again."""
        self._step_s = self._first_s
        self.attempts = 0

    def next(self) -> float:
        """The delay to wait now; the step doubles (up to the cap) for the one after."""
        delay = self._step_s * random.uniform(0.5, 1.0) if self._jitter else self._step_s
        self._step_s = min(self._step_s * 2, self._cap_s)
        self.attempts += 1
        return delay

    async def wait(self, stop: asyncio.Event | None = None, sleep: Sleep | None = None) -> bool:
        """Wait the next delay; False, without waiting, when it would pass the bound in time.

        ``stop`` ends the wait early (the caller's loop then sees it set); ``sleep`` replaces
        the plain sleep. A cancellation propagates from either.
        """
        delay = self.next()
        if self._deadline is not None and time.monotonic() + delay > self._deadline:
            return False
        if sleep is not None:
            await sleep(delay)
        elif stop is not None:
            await sleep_unless(stop, delay)
        else:
            await asyncio.sleep(delay)
        return True


async def sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds``, or less when ``stop`` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
