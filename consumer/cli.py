"""The ``milestones`` command line: parse, build settings, configure logging, call one coroutine.

Any :class:`SettingsError` (a bad variable, a database or broker unreachable at start, a schema
that needs ``migrate``) is printed as one line on stderr and exits 2, without a traceback.

Global flags (``--database-url``...) are accepted before and after the command: every parser,
sub-commands included, is a :class:`CommandParser`, which adds them itself. A sub-command is
therefore one ``commands.add_parser(...)`` line plus an entry in :func:`_command`. A flag that
overrides a setting is declared with :func:`setting_option`, which takes its variable's name
and default from the :class:`~consumer.settings.Settings` model, so the help cannot drift.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from consumer.settings import Settings

EXIT_OK = 0
EXIT_USAGE = 2  # a bad flag or setting, a missing dependency, a schema that needs ``migrate``

# Flags that override a setting keep their value under this prefix, so a sub-command's own
# argument can never be mistaken for a setting of the same name.
_SETTING = "setting:"

EXIT_STATUSES = """\
exit status:
  0  done (status: every limit respected)
  1  status: a limit is crossed (lag, pending age, dead letters today, broker unreachable);
     reconcile: a row differs (without --fix); replay: stopped before it caught up;
     dead-letters: not read to the end in time; thresholds: the database holds a newer change
  2  a bad flag or setting (one line on stderr), a missing optional dependency, a database
     or broker unreachable at start, refused credentials, a database that needs `migrate`
"""


def _exit_quietly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _stop_early_on_signals() -> None:
    """Until the service installs its own handlers, SIGTERM/SIGINT simply exit 0.

    Importing pydantic, asyncpg and aiokafka takes about half a second; a SIGTERM in that
    window would otherwise kill the process with -15 instead of the contract's clean exit.
    """
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_quietly)


def setting_option(
    parser: argparse._ActionsContainer, flag: str, field: str, text: str, **kwargs: Any
) -> None:
    """A flag that overrides the setting ``field``; its help ends with the variable and default."""
    from consumer.settings import describe_setting

    parser.add_argument(
        flag,
        dest=_SETTING + field,
        default=argparse.SUPPRESS,  # absent: the environment (or the default) decides
        metavar=kwargs.pop("metavar", field.rsplit("_", 1)[-1].upper()),
        help=f"{text} ({describe_setting(field)})".replace("%", "%%"),
        **kwargs,
    )


def _add_global_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("global options (before or after the command)")
    setting_option(group, "--bootstrap-servers", "kafka_bootstrap_servers",
                   "Kafka bootstrap servers, host:port[,host:port]", metavar="SERVERS")
    setting_option(group, "--database-url", "database_url",
                   "postgresql://user:password@host:port/database", metavar="URL")
    setting_option(group, "--group-id", "group_id",
                   "the engine's Kafka consumer group", metavar="GROUP")
    setting_option(group, "--metrics-port", "metrics_port",
                   "port of /metrics, /healthz, /readyz; 0 turns it off", metavar="PORT",
                   type=int)
    setting_option(group, "--log-level", "log_level",
                   "DEBUG, INFO, WARNING or ERROR (any case)", metavar="LEVEL")
    setting_option(group, "--log-format", "log_format",
                   "text or json", metavar="FORMAT")


def calendar_year(text: str) -> int:
    """A ``--year`` value: a whole number in the years the engine counts (1900 to 2200, the
    range of the timestamps it accepts); outside it the date arithmetic itself would fail."""
    from consumer.stream.decode import MAX_YEAR, MIN_YEAR

    try:
        year = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a year: {text!r}") from None
    if not MIN_YEAR <= year <= MAX_YEAR:
        raise argparse.ArgumentTypeError(f"{year} is outside {MIN_YEAR} to {MAX_YEAR}")
    return year


def positive_seconds(text: str) -> float:
    """A duration in seconds, above 0 (``--seconds -1`` ran the demo for no time at all)."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not seconds > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text} is not above 0")
    return seconds


class CommandParser(argparse.ArgumentParser):
    """The parser of ``milestones`` and of each of its sub-commands (argparse builds those with
    the class of their parent): each one accepts the global options."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        _add_global_options(self)

    def error(self, message: str) -> NoReturn:
        """A bad flag is one line too, like a bad setting (argparse would print the usage)."""
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def _parser() -> argparse.ArgumentParser:
    from consumer.settings import environment_help

    parser = CommandParser(
        prog="milestones",
        description="Milestone engine: Kafka sessions in, milestone congratulations out.",
        epilog=environment_help() + "\n" + EXIT_STATUSES,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("migrate", help="create or upgrade the schema")
    commands.add_parser("run", help="run the service until SIGTERM/SIGINT")
    replay = commands.add_parser("replay", help="re-read the input topics until caught up")
    start = replay.add_mutually_exclusive_group()
    start.add_argument("--from-beginning", action="store_true",
                       help="start every partition at its first offset (default: the replay"
                            " group's committed offsets)")
    start.add_argument("--from-timestamp", metavar="T",
                       help="start at the first record at or after T, ISO 8601 with an offset"
                            " (default: the replay group's committed offsets)")
    replay.add_argument("--no-notify", action="store_true",
                        help="suppress milestones reached by sessions older than the replay"
                             " (default: notify as the live service would)")
    sweep = commands.add_parser("sweep", help="record every reached milestone that is missing")
    sweep.add_argument("--year", type=calendar_year,
                       help="the year to sweep (default: the current year in MILESTONES_TIMEZONE)")
    sweep.add_argument("--organization", metavar="UUID",
                       help="only this organization's mentors (default: every organization)")
    sweep.add_argument("--dry-run", action="store_true",
                       help="count what would be recorded, per organization and year, and record"
                            " nothing (default: record)")
    reconcile = commands.add_parser("reconcile", help="compare annual_summary with the ledger")
    reconcile.add_argument("--year", type=calendar_year,
                           help="the year to compare (default: every open year, those after"
                                " the closed-years watermark)")
    reconcile.add_argument("--fix", action="store_true",
                           help="repair the rows that differ (default: only report them)")
    reconcile.add_argument("--rebuild", action="store_true",
                           help="recompute years and counts under the current settings"
                                " (default: off)")
    prune = commands.add_parser("prune", help="drop ledger rows of closed years")
    prune.add_argument("--before-year", type=calendar_year, required=True, metavar="YEAR",
                       help="close every year before YEAR (required; no default)")
    prune.add_argument("--tombstone-days", type=int, default=400, metavar="DAYS",
                       help="also delete delete-markers older than DAYS days (default: 400)")
    prune.add_argument("--dry-run", action="store_true",
                       help="say what would be closed and deleted, and change nothing"
                            " (default: prune)")
    status = commands.add_parser(
        "status", help="counts, pending notifications, consumer lag, today's dead letters;"
                       " exit 1 when a limit is crossed",
        epilog="exit status: 0 every limit respected, 1 a limit crossed,"
               " 2 a bad setting or a database unreachable or without the schema",
    )
    status.add_argument("--json", action="store_true",
                        help="one JSON document instead of tables (default: tables)")
    setting_option(status, "--timeout", "status_timeout_s",
                   "seconds to wait for the broker before reporting it unreachable",
                   metavar="SECONDS", type=float)
    setting_option(status, "--max-lag", "status_max_lag",
                   "exit 1 when the group's total lag is above N; unset: not checked",
                   metavar="N", type=int)
    setting_option(status, "--max-pending-age", "status_max_pending_age_s",
                   "exit 1 when the oldest pending notification waits longer; unset: not"
                   " checked", metavar="SECONDS", type=float)
    setting_option(status, "--max-dead-letters", "status_max_dead_letters_today",
                   "exit 1 when more messages than N were dead-lettered today; unset: not"
                   " checked", metavar="N", type=int)
    setting_option(status, "--broker-required", "status_broker_required",
                   "exit 1 when the broker cannot be reached (--no-broker-required: report it"
                   " only)", action=argparse.BooleanOptionalAction)
    _operator_commands(commands)
    demo = commands.add_parser("demo", help="the engine on an embedded broker and Postgres")
    demo.add_argument("--seconds", type=positive_seconds, default=None,
                      help="stop by itself after this many seconds (default: until Ctrl-C)")
    demo.add_argument("--step-seconds", type=positive_seconds, default=None, metavar="SECONDS",
                      help="how long each step of the story stays on screen before the next"
                      " (default: 4 on a terminal, 1 otherwise)")
    grant = commands.add_parser("grant", help="give ROLE the engine's privileges, no more "
                                "(run as the role that ran migrate)")
    grant.add_argument("role", metavar="ROLE",
                       help="the database role `run` and the other commands use (it must exist)")
    grant.add_argument("--dry-run", action="store_true",
                       help="print the SQL without applying it (default: apply and print)")
    _describe_commands(parser)
    return parser


def _describe_commands(parser: argparse.ArgumentParser) -> None:
    """Each sub-command's ``--help`` opens with the line ``milestones --help`` lists for it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                sub = action.choices[choice.dest]
                sub.description = sub.description or choice.help
                _describe_commands(sub)


def _operator_commands(commands: Any) -> None:
    """``mentor``, ``thresholds`` and ``dead-letters``: the support questions, without SQL."""
    mentor = commands.add_parser("mentor", help="one mentor's year: count, thresholds, "
                                 "opt-out, each milestone and why it was (not) sent")
    mentor.add_argument("mentor_id", metavar="MENTOR_ID", help="the mentor's UUID")
    mentor.add_argument("--year", type=calendar_year,
                        help="calendar year (default: this year in MILESTONES_TIMEZONE)")
    mentor.add_argument("--json", action="store_true", help="one JSON object instead of text (default: text)")
    thresholds = commands.add_parser("thresholds", help="list, set or unset an organization's "
                                     "thresholds (kept on MILESTONES_THRESHOLDS_TOPIC)")
    actions = thresholds.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="every organization's row, with the previous value")
    listing.add_argument("--history", action="store_true",
                         help="also every change, in order (default: rows only)")
    setting = actions.add_parser("set", help="set ORG's thresholds, e.g. 10,25,50 "
                                 "(none: no milestones for ORG)")
    setting.add_argument("organization", metavar="ORG", help="the organization's UUID")
    setting.add_argument("values", metavar="T1,T2,...",
                         help="positive integers, any order (used sorted, without repeats), or none")
    unsetting = actions.add_parser("unset", help="remove ORG's row: the default applies again")
    unsetting.add_argument("organization", metavar="ORG", help="the organization's UUID")
    dead = commands.add_parser("dead-letters", help="rejected messages: source position, "
                               "reason, a prefix of the value")
    dead.add_argument("--since", metavar="T", help="only those dead-lettered at or after T "
                      "(ISO 8601, e.g. 2026-03-14 or 2026-03-14T10:00+01:00; default: all)")
    dead.add_argument("--reason", metavar="KIND", help="only this kind, e.g. invalid_json "
                      "(the error_kind header; default: all)")
    dead.add_argument("--json", action="store_true", help="one JSON object per line (default: text lines)")


async def _demo(settings: Settings, args: argparse.Namespace) -> int:
    # The demo lives with the servers it starts (devstack/), which build on the service; the
    # service itself never imports them. Only this dispatcher names it, when it is asked for.
    try:
        from devstack.demo import demo_command
    except ModuleNotFoundError as error:
        if error.name != "devstack" and not (error.name or "").startswith("devstack."):
            raise
        from consumer.settings import SettingsError

        raise SettingsError(
            "demo is not part of this install (the service image leaves out devstack/):"
            " run it from a checkout with `make demo`"
        ) from None

    return await demo_command(settings, seconds=args.seconds, step_seconds=args.step_seconds)


def _command(args: argparse.Namespace, settings: Settings) -> Coroutine[Any, Any, int]:
    from consumer.commands import (
        dead_letters,
        maintenance,
        mentor,
        reconcile,
        replay,
        status,
        sweep,
        thresholds,
    )
    from consumer.service import run_service

    table: dict[str, Callable[[], Coroutine[Any, Any, int]]] = {
        "migrate": lambda: maintenance.migrate_command(settings),
        "grant": lambda: maintenance.grant_command(
            settings, role=args.role, dry_run=args.dry_run
        ),
        "run": lambda: run_service(settings),
        "replay": lambda: replay.replay_command(
            settings, from_beginning=args.from_beginning,
            from_timestamp=args.from_timestamp, no_notify=args.no_notify,
        ),
        "sweep": lambda: sweep.sweep_command(
            settings, year=args.year, organization=args.organization, dry_run=args.dry_run
        ),
        "reconcile": lambda: reconcile.reconcile_command(
            settings, year=args.year, fix=args.fix, rebuild=args.rebuild
        ),
        "prune": lambda: maintenance.prune_command(
            settings, before_year=args.before_year, tombstone_days=args.tombstone_days,
            dry_run=args.dry_run,
        ),
        "status": lambda: status.status_command(settings, as_json=args.json),
        "demo": lambda: _demo(settings, args),
        "mentor": lambda: mentor.mentor_command(
            settings, mentor=args.mentor_id, year=args.year, as_json=args.json
        ),
        "thresholds": lambda: thresholds.thresholds_command(
            settings, action=args.action, organization=getattr(args, "organization", None),
            values=getattr(args, "values", None), show_history=getattr(args, "history", False),
        ),
        "dead-letters": lambda: dead_letters.dead_letters_command(
            settings, since=args.since, reason=args.reason, as_json=args.json
        ),
    }
    return table[args.command]()


def setting_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The settings given as flags, wherever on the command line they were."""
    return {
        name.removeprefix(_SETTING): value
        for name, value in vars(args).items()
        if name.startswith(_SETTING)
    }


def main(argv: Sequence[str] | None = None) -> int:
    _stop_early_on_signals()
    from consumer.ops.logs import configure_logging
    from consumer.settings import SettingsError, load_settings
    from consumer.store.errors import MigrationRequired

    args = _parser().parse_args(argv)
    try:
        settings = load_settings(**setting_overrides(args))
        configure_logging(settings.log_level, settings.log_format)
        return _run(_command(args, settings))
    except (SettingsError, MigrationRequired) as error:
        print(f"milestones: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `milestones ... | head`: the reader has what it wanted, which is not an error (a
        # command that must report a state, like `status`, handles this itself). Standard
        # output now goes nowhere, so the interpreter's last flush cannot raise again.
        from consumer.commands.common import silence_stdout

        silence_stdout()
        return EXIT_OK
    except Exception as error:
        refusal = _privilege_refusal(error)
        if refusal is None:
            raise
        print(f"milestones: {refusal}", file=sys.stderr)
        return EXIT_USAGE


def _privilege_refusal(error: BaseException) -> str | None:
    """A command run as a role without the privilege it needs (``prune`` as the engine's
    role): one line, not a traceback. asyncpg is imported here, only once something failed."""
    import asyncpg

    if not isinstance(error, asyncpg.InsufficientPrivilegeError):
        return None
    return (f"MILESTONES_DATABASE_URL: this role may not do that ({error}); run it as the"
            " schema's owner (see Least privilege in the README)")


def _run(coroutine: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)
