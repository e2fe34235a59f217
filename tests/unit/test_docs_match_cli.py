"""The README's and docs/contract.md's command tables list every command the parser has, each
with every option of its own (the global flags are described once), and the README's metrics
table every outcome the engine counts: docs that an operator copies from must match the code."""

from __future__ import annotations

import argparse
import re

from consumer.cli import _parser
from consumer.store.port import EVENT_OUTCOMES
from tests.support.engine import REPO_ROOT
from tests.unit.test_cli import all_parsers

GLOBAL = {"--bootstrap-servers", "--database-url", "--group-id", "--metrics-port", "--log-level",
          "--log-format", "-h", "--help"}


def command_rows(path: str, prefix: str) -> dict[str, str]:
    """The commands table of the section "## Commands": each command and its row."""
    text = (REPO_ROOT / path).read_text("utf-8")
    section = text.split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        match = re.match(rf"\| `{prefix}([a-z-]+)", line)
        if match:
            rows[match.group(1)] = rows.get(match.group(1), "") + line
    return rows


def own_options() -> dict[str, set[str]]:
    """Each top-level command with the flags of its own (and of its sub-commands)."""
    options: dict[str, set[str]] = {}
    for name, parser in all_parsers(_parser()):
        words = name.split()
        if len(words) < 2:
            continue
        flags = options.setdefault(words[1], set())
        for action in parser._actions:
            if isinstance(action, argparse.BooleanOptionalAction):
                flags.add(action.option_strings[-1])  # the --no- form is the one to document
            else:
                flags.update(flag for flag in action.option_strings[:1] if flag not in GLOBAL)
    return options


def test_the_readme_and_the_contract_list_every_command_with_its_options() -> None:
    missing = []
    for path, prefix in (("README.md", "milestones "), ("docs/contract.md", "")):
        rows = command_rows(path, prefix)
        for command, flags in own_options().items():
            row = rows.get(command)
            if row is None:
                missing.append(f"{path}: no row for `{command}`")
                continue
            missing += [f"{path}: `{command}` lacks {flag}" for flag in sorted(flags)
                        if flag not in row]
        missing += [f"{path}: `{command}` is not a command" for command in rows
                    if command not in own_options()]
    assert not missing, "\n".join(missing)


def test_the_readme_names_every_event_outcome() -> None:
    readme = (REPO_ROOT / "README.md").read_text("utf-8")
    row = next(line for line in readme.splitlines() if line.startswith("| `milestones_events_total`"))
    assert not [outcome for outcome in EVENT_OUTCOMES if f"`{outcome}`" not in row], row


def test_every_command_says_what_it_does_and_every_argument_has_help() -> None:
    missing = []
    for name, parser in all_parsers(_parser()):
        if " " in name and not parser.description:
            missing.append(f"{name}: no description in its --help")
        missing += [f"{name} {action.metavar}: no help" for action in parser._actions
                    if not action.option_strings and not action.help
                    and not isinstance(action, argparse._SubParsersAction)]
    assert not missing, "\n".join(missing)
