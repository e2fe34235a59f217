"""What one benchmark run is configured with and shares between its scenarios.

Its own module because both the command (``cli.py``) and the scenarios use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import infra
from benchmarks.workload import Workload

DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"
ALL = "abcdef"


@dataclass
class Config:
    events: int = 1_000_000
    mentors: int = 10_000
    seed_rows: int = 5_000_000
    rounds: int = 3
    partitions: int = 8
    only: str = ALL
    seed: int = 1
    duplicate_share: float = 0.01
    per_event_seconds: float = 15.0
    latency_rate: int = 2_000
    latency_seconds: float = 15.0
    latency_mentors: int = 300
    # Steady state, not start-up: right after its assignment the engine's publisher is still
    # taking its lease and reading the notification topic back, which holds the first
    # notifications for about a second (seen as a p99 of ~1.2 s with a 1 s wait).
    latency_settle_s: float = 5.0
    postgres_url: str = DEFAULT_POSTGRES
    output: str = str(RESULTS)
    profile: bool = False
    quick: bool = False
    thresholds: tuple[int, ...] = (50, 100, 200)
    timezone: str = "Europe/Oslo"


@dataclass
class Run:
    """Everything one benchmark run shares: broker, topics, workload, template database."""

    config: Config
    prefix: str
    workdir: Path
    broker: infra.Broker
    databases: infra.Databases
    workload: Workload
    activity_topic: str
    preferences_topic: str
    events_file: Path
    template: str | None = None
    year: int = 0
    serial: int = 0
    results: list[dict[str, Any]] = field(default_factory=list)

    def next_serial(self) -> int:
        self.serial += 1
        return self.serial
