"""``python -m benchmarks``: one command, one machine, every figure of the issue in one run.

Flow: start a Tansu broker; build the workload and produce it once; migrate and seed a template
database; then, round after round, measure each scenario in a fresh process and a fresh clone
of the template (the scenarios alternate, so drift of a noisy machine spreads over all of
them); print medians, ratios and a Markdown table; write ``benchmarks/results/latest.json``.

Scenarios (``--only`` takes their letters):
  a  bare aiokafka consumer reading and discarding the events        (broker-side ceiling)
  b  the engine's batch transaction fed from memory, no Kafka        (database-side ceiling)
  c  ``milestones run`` end to end, first fetch -> last offset commit (and from process start)
  d  one transaction and one offset commit per event, time-boxed
  e  two ``milestones run`` instances in one consumer group
  f  latency at a steady rate: producer timestamp -> count committed, -> milestone.reached
Peak RSS (g) is reported for every process. ``--profile`` adds one run of (c) under py-spy
(``pip install py-spy``); its summary is printed and its raw stacks are left beside the JSON.

Progress goes to stderr, the table to stdout. Exit status 3 when a check failed (a session not
counted exactly once, a milestone not recorded or not sent): such figures are not valid.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pickle
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import infra, report, scenarios
from benchmarks.run import ALL, DEFAULT_POSTGRES, RESULTS, Config, Run
from benchmarks.workload import make_mentors, make_workload

EXIT_CHECKS_FAILED = 3

def parse_args(argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure the milestone engine against its broker and database ceilings.",
    )
    parser.add_argument("--events", type=int, help="events to produce (default 1,000,000)")
    parser.add_argument("--mentors", type=int, help="distinct mentors (default 10,000)")
    parser.add_argument("--seed-rows", type=int, help="earlier ledger rows (default 5,000,000)")
    parser.add_argument("--rounds", type=int, help="rounds of every scenario (default 3)")
    parser.add_argument("--partitions", type=int, help="partitions of the input topic (default 8)")
    parser.add_argument("--only", help="scenario letters to run, e.g. a,b,c (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes for CI: 20,000 events, 10,000 seed rows, one round")
    parser.add_argument("--per-event-seconds", type=float, help="time box of (d) (default 15)")
    parser.add_argument("--latency-rate", type=int, help="events/s of (f) (default 2,000)")
    parser.add_argument("--latency-seconds", type=float, help="duration of (f) (default 15)")
    parser.add_argument("--profile", action="store_true",
                        help="one extra run of (c) under py-spy; its summary is printed")
    parser.add_argument("--postgres", dest="postgres_url",
                        help="server to create databases on, as an admin URL "
                             f"(default $BENCH_POSTGRES_URL or {DEFAULT_POSTGRES})")
    parser.add_argument("--output", help=f"JSON results file (default {RESULTS})")
    args = parser.parse_args(argv)
    config = Config(postgres_url=os.environ.get("BENCH_POSTGRES_URL", DEFAULT_POSTGRES))
    if args.quick:
        config = Config(
            events=20_000, seed_rows=10_000, rounds=1, per_event_seconds=3.0,
            latency_seconds=3.0, latency_mentors=100, latency_settle_s=3.0, quick=True,
            postgres_url=config.postgres_url,
        )
    for name in ("events", "mentors", "seed_rows", "rounds", "partitions", "per_event_seconds",
                 "latency_rate", "latency_seconds", "postgres_url", "output"):
        value = getattr(args, name)
        if value is not None:
            setattr(config, name, value)
    config.profile = args.profile
    if args.only:
        letters = "".join(sorted({part.strip().lower() for part in args.only.split(",") if part.strip()}))
        unknown = set(letters) - set(ALL)
        if unknown or not letters:
            parser.error(f"--only takes letters among {','.join(ALL)}")
        config.only = letters
    if config.events < 1 or config.mentors < 1 or config.rounds < 1 or config.partitions < 1:
        parser.error("--events, --mentors, --rounds and --partitions must be positive")
    return config


def machine_line() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as file:
        model = next((line.split(":", 1)[1].strip() for line in file if line.startswith("model name")), "")
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "load_average": [round(value, 2) for value in os.getloadavg()],
        "python": platform.python_version(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


async def prepare(config: Config) -> Run:
    prefix = f"bench{os.getpid()}"
    workdir = Path(tempfile.mkdtemp(prefix="milestones-bench-"))
    now = datetime.now(UTC)
    started = time.perf_counter()
    mentors = make_mentors(config.mentors, config.seed)
    workload = make_workload(
        events=config.events, mentors=mentors, partitions=config.partitions, seed=config.seed,
        duplicate_share=config.duplicate_share, now=now,
    )
    log(f"workload: {len(workload.events):,} events ({workload.distinct:,} distinct, "
        f"{workload.duplicates:,} duplicates), {config.mentors:,} mentors, "
        f"{workload.expected_milestones(config.thresholds):,} milestones expected "
        f"(built in {time.perf_counter() - started:.1f} s)")
    events_file = workdir / "events.pickle"
    if "b" in config.only:
        with events_file.open("wb") as file:
            pickle.dump([(e.partition, e.key, e.value) for e in workload.events], file, protocol=5)
    broker = infra.Broker.start()
    run = Run(
        config, prefix, workdir, broker, infra.Databases(config.postgres_url, prefix), workload,
        f"{prefix}-activity", f"{prefix}-preferences", events_file, year=now.year,
    )
    try:
        await infra.create_topics(broker.bootstrap_servers, [run.activity_topic], config.partitions)
        await infra.create_topics(broker.bootstrap_servers, [run.preferences_topic], 1)
        if set(config.only) & set("acde"):
            rate = await scenarios.produce_all(broker.bootstrap_servers, run.activity_topic, workload)
            log(f"produced {len(workload.events):,} events at {rate:,.0f}/s")
        if set(config.only) & set("bcdef"):
            await make_template(run)
    except BaseException:
        await shutdown(run)
        raise
    return run


async def make_template(run: Run) -> None:
    import asyncpg

    from consumer.store.migrate import migrate

    config = run.config
    started = time.perf_counter()
    run.template = await run.databases.create("template")
    connection = await asyncpg.connect(run.databases.url(run.template), timeout=15)
    try:
        await migrate(connection)
    finally:
        await connection.close()
    mentors = run.workload.mentors
    await infra.seed(
        run.databases.url(run.template), mentor_ids=mentors.ids,
        organization_ids=mentors.organizations, rows=config.seed_rows, timezone=config.timezone,
        year=run.year, thresholds=config.thresholds,
    )
    sizes = await infra.relation_sizes(run.databases.url(run.template))
    log(f"template database seeded with {config.seed_rows:,} ledger rows in "
        f"{time.perf_counter() - started:.1f} s (ledger {sizes.get('activity_ledger', 0) / 2**20:.0f} MiB, "
        f"primary key {sizes.get('activity_ledger_pkey', 0) / 2**20:.0f} MiB, shared_buffers "
        f"{sizes.get('shared_buffers', 0) / 2**20:.0f} MiB)")


async def shutdown(run: Run) -> None:
    with contextlib.suppress(Exception):
        await run.databases.drop_all()
    run.broker.stop()
    shutil.rmtree(run.broker.workdir, ignore_errors=True)
    shutil.rmtree(run.workdir, ignore_errors=True)


async def measure(config: Config) -> dict[str, Any]:
    machine_before = machine_line()
    run = await prepare(config)
    try:
        table: dict[str, Callable[[Run], Awaitable[dict[str, Any]]]] = {
            "a": scenarios.bare_consumer,
            "b": scenarios.batch_writer,
            "c": scenarios.one_engine,
            "d": scenarios.per_event,
            "e": scenarios.two_engines,
            "f": scenarios.latency,
        }
        for round_number in range(1, config.rounds + 1):
            for letter in config.only:
                started = time.perf_counter()
                result = await table[letter](run)
                result.update(scenario=letter, round=round_number)
                run.results.append(result)
                log(f"round {round_number} ({letter}) {report.one_line(result)} "
                    f"[{time.perf_counter() - started:.0f} s]")
        profile = await scenarios.profiled_engine(run) if config.profile else None
        postgres_version = await run.databases.server_version()
    finally:
        await shutdown(run)
    return {
        "config": asdict(config),
        "machine": {"before": machine_before, "after": machine_line(),
                    "postgres": postgres_version, **versions()},
        "workload": {
            "events": len(run.workload.events), "distinct": run.workload.distinct,
            "duplicates": run.workload.duplicates,
            "expected_milestones": run.workload.expected_milestones(config.thresholds),
            "partition_shares": [round(s, 3) for s in run.workload.partition_shares(config.partitions)],
        },
        "results": run.results,
        "profile": profile,
    }


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("aiokafka", "asyncpg", "pydantic", "uvloop"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "absent"
    return found


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    started = time.perf_counter()
    try:
        data = asyncio.run(measure(config))
    except KeyboardInterrupt:
        return 130
    except scenarios.BenchmarkError as error:
        print(f"benchmarks: {error}", file=sys.stderr)
        return 1
    data["summary"] = report.summarize(data["results"])
    data["wall_seconds"] = round(time.perf_counter() - started, 1)
    data["command"] = "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv)
    text = report.render(data)
    print(text)
    output = Path(config.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    data["markdown"] = text
    output.write_text(json.dumps(data, indent=2, default=str) + "\n")
    log(f"results written to {output} ({data['wall_seconds']:.0f} s in all)")
    failed = [k for k, v in data["summary"]["medians"].items() if v["checks"] != ["ok"]]
    if failed:
        log(f"checks failed for {', '.join(failed)}: the figures above are not valid")
        return EXIT_CHECKS_FAILED
    return 0



