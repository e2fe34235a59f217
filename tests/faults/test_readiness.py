"""/readyz follows the broker: a broker frozen (SIGSTOP) past the session timeout makes the
engine not ready while /healthz stays 200, and ready again once the broker answers."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.faults.checks import metric, outputs, wait_for_status
from tests.faults.conftest import ProxiedBroker
from tests.support.engine import EngineLauncher

pytestmark = [pytest.mark.e2e, pytest.mark.faults, pytest.mark.slow]


async def test_readyz_is_503_while_the_broker_is_frozen_past_the_session_timeout(
    proxied_broker: ProxiedBroker, database_url: str, engine_process: EngineLauncher
) -> None:
    engine = engine_process({**proxied_broker.env(), "MILESTONES_KAFKA_REQUEST_TIMEOUT_MS": "4000"})
    await engine.wait_ready(timeout_s=60)
    session_s = float(engine.env["MILESTONES_KAFKA_SESSION_TIMEOUT_MS"]) / 1000
    # Idle and ready: the fetches (or the probe) keep reaching the broker.
    await asyncio.sleep(2 * session_s)
    assert (await engine.get("/readyz"))[0] == 200, outputs([engine])

    proxied_broker.freeze()
    frozen_at = time.monotonic()
    try:
        await wait_for_status(engine, "/readyz", 503, timeout_s=session_s + 10)
        became_503_s = time.monotonic() - frozen_at
        assert became_503_s > session_s * 0.9, "not ready before the session timeout passed"
        # Stays so for as long as the broker is frozen; the process itself is healthy.
        while time.monotonic() - frozen_at < max(10.0, 4 * session_s):
            assert (await engine.get("/readyz"))[0] == 503
            assert (await engine.get("/healthz"))[0] == 200
            await asyncio.sleep(0.5)
        assert metric(await engine.metrics(), "milestones_broker_contact_age_seconds") > session_s
    finally:
        proxied_broker.thaw()

    await wait_for_status(engine, "/readyz", 200, timeout_s=30)
    assert metric(await engine.metrics(), "milestones_broker_contact_age_seconds") < session_s
    assert "broker not reached" in engine.output()
    assert await engine.stop() == 0
    print(f"\nfrozen broker: /readyz 503 after {became_503_s:.1f} s (session timeout {session_s:g} s)")
