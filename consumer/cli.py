"""The ``milestones`` command line: parse, build settings, configure logging, call one coroutine.

Any :class:`SettingsError` (a bad variable, a database or broker unreachable at start, a schema
that needs ``migrate``) is printed as one line on stderr and exits 2, without a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from consumer.settings import Settings

EXIT_USAGE = 2


def _exit_quietly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _stop_early_on_signals() -> None:
    """Until the service installs its own handlers, SIGTERM/SIGINT simply exit 0.

    Importing pydantic, asyncpg and aiokafka takes about half a second; a SIGTERM in that
    window used to kill the process with -15 instead of the contract's clean exit.
    """
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_quietly)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="milestones",
        description="Milestone engine: Kafka sessions in, milestone congratulations out.",
    )
    parser.add_argument("--bootstrap-servers", dest="kafka_bootstrap_servers",
                        help="overrides MILESTONES_KAFKA_BOOTSTRAP_SERVERS")
    parser.add_argument("--database-url", dest="database_url",
                        help="overrides MILESTONES_DATABASE_URL")
    parser.add_argument("--group-id", dest="group_id", help="overrides MILESTONES_GROUP_ID")
    parser.add_argument("--metrics-port", dest="metrics_port", type=int,
                        help="overrides MILESTONES_METRICS_PORT")
    parser.add_argument("--log-level", dest="log_level",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("migrate", help="create or upgrade the schema")
    commands.add_parser("run", help="run the service until SIGTERM/SIGINT")
    replay = commands.add_parser("replay", help="re-read the input topics until caught up")
    start = replay.add_mutually_exclusive_group()
    start.add_argument("--from-beginning", action="store_true",
                       help="start every partition at its first offset")
    start.add_argument("--from-timestamp", metavar="T",
                       help="start at the first record at or after T (ISO 8601)")
    replay.add_argument("--no-notify", action="store_true",
                        help="suppress milestones reached by sessions older than the replay")
    sweep = commands.add_parser("sweep", help="record every reached milestone that is missing")
    sweep.add_argument("--year", type=int)
    sweep.add_argument("--organization", metavar="UUID")
    reconcile = commands.add_parser("reconcile", help="compare annual_summary with the ledger")
    reconcile.add_argument("--year", type=int)
    reconcile.add_argument("--fix", action="store_true", help="repair the rows that differ")
    reconcile.add_argument("--rebuild", action="store_true",
                           help="recompute years and counts under the current settings")
    prune = commands.add_parser("prune", help="drop ledger rows of closed years")
    prune.add_argument("--before-year", type=int, required=True)
    prune.add_argument("--tombstone-days", type=int, default=400)
    commands.add_parser("status", help="counts, pending notifications, consumer lag")
    demo = commands.add_parser("demo", help="the engine on an embedded broker and Postgres")
    demo.add_argument("--seconds", type=float, default=None,
                      help="stop by itself after this many seconds (default: until Ctrl-C)")
    return parser


def _command(args: argparse.Namespace, settings: Settings) -> Coroutine[Any, Any, int]:
    from consumer.commands import demo, maintenance, replay, status, sweep
    from consumer.service import run_service

    table: dict[str, Callable[[], Coroutine[Any, Any, int]]] = {
        "migrate": lambda: maintenance.migrate_command(settings),
        "run": lambda: run_service(settings),
        "replay": lambda: replay.replay_command(
            settings, from_beginning=args.from_beginning,
            from_timestamp=args.from_timestamp, no_notify=args.no_notify,
        ),
        "sweep": lambda: sweep.sweep_command(
            settings, year=args.year, organization=args.organization
        ),
        "reconcile": lambda: maintenance.reconcile_command(
            settings, year=args.year, fix=args.fix, rebuild=args.rebuild
        ),
        "prune": lambda: maintenance.prune_command(
            settings, before_year=args.before_year, tombstone_days=args.tombstone_days
        ),
        "status": lambda: status.status_command(settings),
        "demo": lambda: demo.demo_command(settings, seconds=args.seconds),
    }
    return table[args.command]()


def main(argv: Sequence[str] | None = None) -> int:
    _stop_early_on_signals()
    from consumer.ops.logs import configure_logging
    from consumer.settings import SettingsError, load_settings
    from consumer.store.errors import MigrationRequired

    args = _parser().parse_args(argv)
    overrides = {
        name: getattr(args, name)
        for name in ("kafka_bootstrap_servers", "database_url", "group_id", "metrics_port",
                     "log_level")
        if getattr(args, name, None) is not None
    }
    try:
        settings = load_settings(**overrides)
        configure_logging(settings.log_level, settings.log_format)
        return _run(_command(args, settings))
    except (SettingsError, MigrationRequired) as error:
        print(f"milestones: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def _run(coroutine: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)
