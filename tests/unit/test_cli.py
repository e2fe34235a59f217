"""The command line's help and flags: every option says its default (and its variable when it
overrides a setting), and the global flags work before and after the command."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator

import pytest

from consumer.cli import _parser, setting_overrides
from consumer.settings import ENV_PREFIX, Settings, environment_help
from tests.support.engine import REPO_ROOT


def all_parsers(
    parser: argparse.ArgumentParser, name: str = "milestones"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command, sub in action.choices.items():
                yield from all_parsers(sub, f"{name} {command}")


def options() -> Iterator[tuple[str, argparse.Action]]:
    for name, parser in all_parsers(_parser()):
        for action in parser._actions:
            if action.option_strings and not isinstance(action, argparse._HelpAction):
                yield name, action


def test_every_option_has_help_that_gives_its_default() -> None:
    missing = []
    for command, action in options():
        text = action.help or ""
        takes_value = action.nargs != 0
        if not text or (takes_value and "default" not in text and "required" not in text):
            missing.append(f"{command} {action.option_strings[0]}: {text!r}")
        if not takes_value and "default" not in text:
            missing.append(f"{command} {action.option_strings[0]} (a flag): {text!r}")
    assert not missing, "\n".join(missing)


def test_a_flag_that_overrides_a_setting_names_its_variable() -> None:
    checked = 0
    for command, action in options():
        if action.dest.startswith("setting:"):
            field = action.dest.removeprefix("setting:")
            assert field in Settings.model_fields, f"{command} {action.option_strings[0]}"
            assert f"{ENV_PREFIX}{field.upper()}" in (action.help or ""), action.help
            checked += 1
    assert checked >= 5 * 8  # the global flags, on every command


@pytest.mark.parametrize(
    "argv",
    [
        ["--database-url", "postgresql://h/db", "--metrics-port", "0", "status"],
        ["status", "--database-url", "postgresql://h/db", "--metrics-port", "0"],
        ["--metrics-port", "0", "status", "--database-url", "postgresql://h/db"],
    ],
)
def test_global_flags_work_before_and_after_the_command(argv: list[str]) -> None:
    args = _parser().parse_args(argv)
    assert args.command == "status"
    assert setting_overrides(args) == {"database_url": "postgresql://h/db", "metrics_port": 0}


def test_a_flag_after_the_command_wins_over_one_before() -> None:
    args = _parser().parse_args(["--group-id", "a", "sweep", "--group-id", "b", "--year", "2025"])
    assert setting_overrides(args) == {"group_id": "b"}
    assert args.year == 2025


def test_no_flag_no_override() -> None:
    assert setting_overrides(_parser().parse_args(["run"])) == {}


def test_the_environment_help_lists_every_setting_with_its_description() -> None:
    text = environment_help()
    for field, info in Settings.model_fields.items():
        assert f"{ENV_PREFIX}{field.upper()}=" in text
        assert info.description, f"{field}: give it a docstring, `milestones --help` shows it"
        assert info.description in text


def test_milestones_help_lists_every_variable_and_the_exit_statuses() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "consumer", "--help"], cwd=REPO_ROOT, capture_output=True,
        text=True, timeout=60, check=True,
    )
    for field, _info in Settings.model_fields.items():
        assert f"{ENV_PREFIX}{field.upper()}" in result.stdout
    assert "exit status" in result.stdout
    assert "MILESTONES_THRESHOLDS" in result.stdout
    assert "50,100,200" in result.stdout


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["status", "--metrics-port", "abc"], "--metrics-port: invalid int value: 'abc'"),
        (["status", "--max-lag", "many"], "--max-lag: invalid int value"),
        (["status", "--bogus"], "unrecognized arguments: --bogus"),
        (["prune"], "--before-year"),
        (["launch"], "invalid choice: 'launch'"),
        ([], "COMMAND"),
    ],
)
def test_a_bad_flag_is_one_line_and_exit_2(argv: list[str], expected: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "consumer", *argv], cwd=REPO_ROOT, capture_output=True,
        text=True, timeout=60, check=False,
    )
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert expected in result.stderr
    assert "--help" in result.stderr


def test_the_readme_lists_every_variable() -> None:
    readme = (REPO_ROOT / "README.md").read_text("utf-8")
    missing = [f"{ENV_PREFIX}{field.upper()}" for field in Settings.model_fields
               if f"`{ENV_PREFIX}{field.upper()}`" not in readme]
    assert not missing, f"add to the README's settings table: {missing}"
