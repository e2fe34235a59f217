"""Pieces the operator commands share: an id from the command line, the current year, tables,
writing to a reader that may go away."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from uuid import UUID

from consumer.settings import Settings, SettingsError


def parse_uuid(text: str, what: str) -> UUID:
    """A command-line id, or a :class:`SettingsError` (one line, exit 2) naming the argument."""
    try:
        return UUID(text)
    except ValueError:
        raise SettingsError(f"{what}: not a UUID: {text!r}") from None


def current_year(settings: Settings) -> int:
    """The year of now in the configured time zone (the sweep's and status's default)."""
    return datetime.now(UTC).astimezone(settings.tz).year


def write_out(text: str) -> bool:
    """Write ``text`` to stdout and flush; False once the reader went away (``| head``: it has
    what it wanted, which is not an error), and stdout then goes nowhere (:func:`silence_stdout`)."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
        return True
    except BrokenPipeError:
        silence_stdout()
        return False


def silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush of a closed pipe does not
    raise (and print) a BrokenPipeError again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """A plain text table: left-aligned text, right-aligned numbers."""
    cells = [[str(value) for value in header]] + [[_cell(value) for value in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    numeric = [
        all(isinstance(row[i], int | float) for row in rows) if rows else False
        for i in range(len(header))
    ]
    lines = []
    for index, row in enumerate(cells):
        parts = [
            value.rjust(widths[i]) if numeric[i] else value.ljust(widths[i])
            for i, value in enumerate(row)
        ]
        lines.append("  ".join(parts).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)
