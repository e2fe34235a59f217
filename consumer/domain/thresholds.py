"""An organization's thresholds as an operator gives them: parsed, validated, normalised.

Pure: ``milestones thresholds set`` and the restore from the thresholds topic both go through
here, so what the database holds is always sorted, without repeats, and within bounds.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from consumer.domain.milestones import normalize_thresholds

# More thresholds than this in one year is a typo, not a programme of congratulations.
MAX_THRESHOLDS = 20
# A mentor holding more sessions than this in one year is not a person.
MAX_THRESHOLD_VALUE = 100_000
# How an operator writes "no milestones for this organization" (an empty array). Only the
# word: an empty argument is far more likely a script's unset variable than that wish.
NONE_WORDS = frozenset({"none"})


def parse_thresholds(text: str) -> tuple[int, ...]:
    """``"25,10,10,50"`` -> ``(10, 25, 50)``; ``"none"`` -> ``()`` (no milestones).

    Raises ``ValueError`` with a one-line reason for anything else, an empty text included.
    """
    cleaned = text.strip()
    if cleaned.lower() in NONE_WORDS:
        return ()
    if not cleaned:
        raise ValueError("empty: give positive integers, e.g. 10,25,50, or none for no milestones")
    values = []
    for part in cleaned.split(","):
        item = part.strip()
        if not item.isdigit() or not item.isascii():
            raise ValueError(
                f"not a positive integer: {item!r} (give e.g. 10,25,50, or none for no milestones)"
            )
        values.append(int(item))
    return validate_thresholds(values)


def validate_thresholds(values: Iterable[int]) -> tuple[int, ...]:
    """Sorted, without repeats, each in 1..MAX_THRESHOLD_VALUE, at most MAX_THRESHOLDS."""
    numbers = list(values)
    if any(isinstance(value, bool) or not isinstance(value, int) for value in numbers):
        raise ValueError("thresholds must be integers")
    if any(value <= 0 for value in numbers):
        raise ValueError("thresholds must be positive integers")
    too_big = [value for value in numbers if value > MAX_THRESHOLD_VALUE]
    if too_big:
        raise ValueError(f"threshold {too_big[0]} is above the maximum {MAX_THRESHOLD_VALUE:,}")
    normalised = normalize_thresholds(numbers)
    if len(normalised) > MAX_THRESHOLDS:
        raise ValueError(f"{len(normalised)} thresholds: at most {MAX_THRESHOLDS} are allowed")
    return normalised


@dataclass(frozen=True, slots=True)
class ThresholdsChange:
    """One change of an organization's thresholds; ``thresholds`` None removes its row."""

    organization_id: UUID
    thresholds: tuple[int, ...] | None
    changed_at: datetime


def latest_changes(changes: Iterable[ThresholdsChange]) -> dict[UUID, ThresholdsChange]:
    """The latest change per organization (by ``changed_at``; on a tie, the later one given).

    Given in topic order: a compacted topic may still hold older values of a key.
    """
    latest: dict[UUID, ThresholdsChange] = {}
    for change in changes:
        known = latest.get(change.organization_id)
        if known is None or change.changed_at >= known.changed_at:
            latest[change.organization_id] = change
    return latest


def describe(thresholds: Iterable[int] | None) -> str:
    """``10,25,50``; ``none`` for an empty list; ``-`` for no row."""
    if thresholds is None:
        return "-"
    values = list(thresholds)
    return ",".join(map(str, values)) if values else "none"
