"""Years and the grace rule, in the configured time zone.

Everything here is pure: the database clock is passed in, never read.
"""

from __future__ import annotations

from bisect import bisect_right
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo


def session_year(occurred_at: datetime, tz: ZoneInfo) -> int:
    """The calendar year of a session where the organisation lives, not in UTC.

    ``2025-12-31T23:30:00Z`` is a 2026 session in Europe/Oslo.
    """
    if occurred_at.tzinfo is None:
        raise ValueError("occurred_at must carry an offset")
    return occurred_at.astimezone(tz).year


class YearOf:
    """:func:`session_year` for many sessions: a bisect over precomputed local new years.

    ``astimezone`` per session would be the largest single cost of planning a batch; a timestamp
    and a bisect give the same answer (a unit property checks it) in a fraction of the time.
    Instants outside the precomputed years fall back to :func:`session_year`.
    """

    def __init__(self, tz: ZoneInfo, first_year: int = 1900, last_year: int = 2200) -> None:
        self._tz = tz
        self._first_year = first_year
        self._starts = [
            datetime(year, 1, 1, tzinfo=tz).timestamp() for year in range(first_year, last_year + 2)
        ]

    def __call__(self, occurred_at: datetime) -> int:
        if occurred_at.tzinfo is None:
            raise ValueError("occurred_at must carry an offset")
        return self.at(occurred_at.timestamp(), occurred_at)

    def at(self, seconds: float, occurred_at: datetime) -> int:
        """The year of ``occurred_at`` whose epoch ``seconds`` the caller already has."""
        index = bisect_right(self._starts, seconds) - 1
        if 0 <= index < len(self._starts) - 1:
            return self._first_year + index
        return session_year(occurred_at, self._tz)


@lru_cache(maxsize=8)
def year_of(tz: ZoneInfo) -> YearOf:
    return YearOf(tz)


def year_end(year: int, tz: ZoneInfo) -> datetime:
    """1 January 00:00 of the next year in ``tz``, as an aware UTC instant."""
    return datetime(year + 1, 1, 1, tzinfo=tz).astimezone(UTC)


def notify_deadline(year: int, tz: ZoneInfo, grace_days: int) -> datetime:
    """The last instant (exclusive) at which a milestone of ``year`` may still congratulate.

    The grace is counted in absolute hours from the local new year (``grace_days`` × 24 h), so a
    daylight-saving change inside the grace cannot stretch or shrink it.
    """
    return year_end(year, tz) + timedelta(hours=24 * grace_days)


def is_late(year: int, db_now: datetime, tz: ZoneInfo, grace_days: int) -> bool:
    """True when a milestone of ``year`` recorded at ``db_now`` must be suppressed."""
    return db_now >= notify_deadline(year, tz, grace_days)
