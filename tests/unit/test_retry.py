"""The one back-off (consumer/retry.py): its delays, its bound in time, and how a wait ends."""

from __future__ import annotations

import asyncio
import time

import pytest

from consumer.retry import Backoff, sleep_unless


def test_delays_double_up_to_the_cap_without_jitter() -> None:
    backoff = Backoff(0.2, 2.0, jitter=False)
    assert [backoff.next() for _ in range(6)] == pytest.approx([0.2, 0.4, 0.8, 1.6, 2.0, 2.0])
    assert backoff.attempts == 6


def test_each_jittered_delay_lies_between_half_and_all_of_its_step() -> None:
    backoff = Backoff(0.1, 0.8)
    delays = []
    for _ in range(50):
        backoff.reset()
        for step in (0.1, 0.2, 0.4, 0.8, 0.8):
            delay = backoff.next()
            assert step / 2 <= delay <= step
            delays.append(delay / step)
    assert max(delays) - min(delays) > 0.25  # drawn, not fixed


def test_reset_starts_again_from_the_first_step() -> None:
    backoff = Backoff(0.5, 4.0, jitter=False)
    backoff.next()
    backoff.next()
    assert backoff.step_s == 2.0
    backoff.reset()
    assert (backoff.step_s, backoff.attempts) == (0.5, 0)


def test_a_first_step_above_the_cap_is_refused() -> None:
    with pytest.raises(ValueError, match="first_s"):
        Backoff(1.0, 0.5)


async def test_wait_gives_up_without_waiting_once_the_bound_would_pass() -> None:
    backoff = Backoff(0.05, 0.05, jitter=False, give_up_after_s=0.12)
    waited = [await backoff.wait() for _ in range(3)]
    started = time.monotonic()
    assert waited == [True, True, False]
    assert time.monotonic() - started < 0.02


async def test_wait_uses_the_callers_sleep() -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    backoff = Backoff(0.3, 1.0, jitter=False)
    assert await backoff.wait(sleep=sleep)
    assert await backoff.wait(sleep=sleep)
    assert slept == pytest.approx([0.3, 0.6])


async def test_a_stop_event_ends_a_long_wait_at_once() -> None:
    stop = asyncio.Event()
    backoff = Backoff(30.0, 30.0)
    waiting = asyncio.create_task(backoff.wait(stop))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    stop.set()
    assert await asyncio.wait_for(waiting, 1.0)
    assert time.monotonic() - started < 0.5


@pytest.mark.parametrize("with_stop", [False, True])
async def test_a_cancelled_wait_raises_cancelled_error_at_once(with_stop: bool) -> None:
    backoff = Backoff(30.0, 30.0)
    waiting = asyncio.create_task(backoff.wait(asyncio.Event() if with_stop else None))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert time.monotonic() - started < 0.5


async def test_sleep_unless_sleeps_the_whole_time_when_not_stopped() -> None:
    started = time.monotonic()
    await sleep_unless(asyncio.Event(), 0.1)
    assert time.monotonic() - started >= 0.09
