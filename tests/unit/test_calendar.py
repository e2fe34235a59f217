"""The year of a session and the grace rule, in the configured time zone."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.domain.calendar import is_late, notify_deadline, session_year, year_end, year_of

OSLO = ZoneInfo("Europe/Oslo")
ONE_US = timedelta(microseconds=1)


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


# --- session_year ----------------------------------------------------------------------------


def test_session_at_half_past_eleven_utc_on_new_years_eve_counts_for_next_year_in_oslo() -> None:
    assert session_year(at("2025-12-31T23:30:00Z"), OSLO) == 2026


def test_same_instant_counts_for_the_old_year_in_utc() -> None:
    assert session_year(at("2025-12-31T23:30:00Z"), ZoneInfo("UTC")) == 2025


@pytest.mark.parametrize(
    ("occurred_at", "year"),
    [
        pytest.param("2025-12-31T22:59:59.999999Z", 2025, id="just before oslo midnight, utc"),
        pytest.param("2025-12-31T23:00:00Z", 2026, id="oslo midnight, utc"),
        pytest.param("2025-12-31T23:59:59+01:00", 2025, id="last second, oslo offset"),
        pytest.param("2026-01-01T00:00:00+01:00", 2026, id="first second, oslo offset"),
        pytest.param("2026-01-01T00:30:00+02:00", 2025, id="eastern offset still 2025 in oslo"),
        pytest.param("2025-12-31T18:00:00-06:00", 2026, id="western offset already 2026 in oslo"),
        pytest.param("2025-12-31T20:00:00-05:00", 2026, id="new york evening is oslo new year"),
        pytest.param("2026-01-01T05:00:00+14:00", 2025, id="kiritimati morning is oslo old year"),
        pytest.param("2026-07-01T12:00:00+05:30", 2026, id="mid year, any offset"),
    ],
)
def test_session_year_in_oslo_whatever_the_offset(occurred_at: str, year: int) -> None:
    assert session_year(at(occurred_at), OSLO) == year


@pytest.mark.parametrize(
    ("zone", "occurred_at", "year"),
    [
        ("America/New_York", "2026-01-01T04:59:59Z", 2025),
        ("America/New_York", "2026-01-01T05:00:00Z", 2026),
        ("America/Los_Angeles", "2026-01-01T07:59:59Z", 2025),
        ("Pacific/Auckland", "2025-12-31T10:59:59Z", 2025),  # NZDT, +13:00
        ("Pacific/Auckland", "2025-12-31T11:00:00Z", 2026),
        ("Asia/Kolkata", "2025-12-31T18:29:59Z", 2025),  # +05:30
        ("Asia/Kolkata", "2025-12-31T18:30:00Z", 2026),
        ("Pacific/Kiritimati", "2025-12-31T10:00:00Z", 2026),  # +14:00
        ("UTC", "2025-12-31T23:59:59.999999Z", 2025),
    ],
)
def test_session_year_in_other_zones(zone: str, occurred_at: str, year: int) -> None:
    assert session_year(at(occurred_at), ZoneInfo(zone)) == year


def test_session_year_accepts_a_fixed_offset_tzinfo() -> None:
    occurred_at = datetime(2025, 12, 31, 23, 30, tzinfo=timezone(timedelta(hours=-1)))
    assert session_year(occurred_at, OSLO) == 2026


def test_naive_occurred_at_raises() -> None:
    with pytest.raises(ValueError, match="offset"):
        session_year(datetime(2026, 3, 14, 10, 0), OSLO)


# --- year_end ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("zone", "year", "utc"),
    [
        ("Europe/Oslo", 2025, "2025-12-31T23:00:00+00:00"),
        ("UTC", 2025, "2026-01-01T00:00:00+00:00"),
        ("America/New_York", 2025, "2026-01-01T05:00:00+00:00"),
        ("Pacific/Auckland", 2025, "2025-12-31T11:00:00+00:00"),
        ("Asia/Kolkata", 2025, "2025-12-31T18:30:00+00:00"),
    ],
)
def test_year_ends_at_local_new_year_as_a_utc_instant(zone: str, year: int, utc: str) -> None:
    end = year_end(year, ZoneInfo(zone))
    assert end == at(utc)
    assert end.utcoffset() == timedelta(0)


# --- the grace rule ----------------------------------------------------------------------------

OSLO_DEADLINE_2025 = at("2026-01-31T23:00:00+00:00")  # 2026-01-01T00:00+01:00 + 31 × 24 h


def test_grace_is_31_days_of_24_hours_after_local_new_year() -> None:
    assert notify_deadline(2025, OSLO, 31) == OSLO_DEADLINE_2025
    assert notify_deadline(2025, OSLO, 31) - year_end(2025, OSLO) == timedelta(hours=744)


def test_milestone_recorded_exactly_at_the_deadline_is_late() -> None:
    assert is_late(2025, OSLO_DEADLINE_2025, OSLO, 31)


def test_milestone_recorded_just_before_the_deadline_still_congratulates() -> None:
    assert not is_late(2025, OSLO_DEADLINE_2025 - ONE_US, OSLO, 31)


def test_deadline_is_judged_on_the_instant_whatever_the_db_clocks_offset() -> None:
    # The database clock may come back in any offset; only the instant matters.
    in_oslo = OSLO_DEADLINE_2025.astimezone(OSLO)
    assert in_oslo.isoformat() == "2026-02-01T00:00:00+01:00"
    assert is_late(2025, in_oslo, OSLO, 31)
    assert not is_late(2025, (OSLO_DEADLINE_2025 - ONE_US).astimezone(OSLO), OSLO, 31)


@pytest.mark.parametrize(
    ("db_now", "late"),
    [
        pytest.param("2025-03-14T12:00:00Z", False, id="during the year"),
        pytest.param("2025-12-31T22:59:59Z", False, id="last second of the year"),
        pytest.param("2026-01-15T12:00:00Z", False, id="january registration"),
        pytest.param("2026-01-31T22:59:59.999999Z", False, id="just before the deadline"),
        pytest.param("2026-01-31T23:00:00Z", True, id="at the deadline"),
        pytest.param("2026-06-01T00:00:00Z", True, id="backfill months later"),
        pytest.param("2030-01-01T00:00:00Z", True, id="backfill years later"),
    ],
)
def test_milestone_of_2025_in_oslo(db_now: str, late: bool) -> None:
    assert is_late(2025, at(db_now), OSLO, 31) is late


def test_current_year_is_never_late() -> None:
    assert not is_late(2026, at("2026-12-31T22:59:59Z"), OSLO, 0)


@pytest.mark.parametrize(
    ("zone", "deadline"),
    [
        ("America/New_York", "2026-02-01T05:00:00+00:00"),
        ("Pacific/Auckland", "2026-01-31T11:00:00+00:00"),
        ("UTC", "2026-02-01T00:00:00+00:00"),
    ],
)
def test_grace_deadline_in_other_zones(zone: str, deadline: str) -> None:
    tz = ZoneInfo(zone)
    assert notify_deadline(2025, tz, 31) == at(deadline)
    assert is_late(2025, at(deadline), tz, 31)
    assert not is_late(2025, at(deadline) - ONE_US, tz, 31)


def test_zero_grace_makes_the_local_new_year_the_deadline() -> None:
    assert notify_deadline(2025, OSLO, 0) == year_end(2025, OSLO)
    assert is_late(2025, year_end(2025, OSLO), OSLO, 0)
    assert not is_late(2025, year_end(2025, OSLO) - ONE_US, OSLO, 0)


def test_grace_across_a_daylight_saving_change_is_counted_in_hours() -> None:
    # 100 days from the Oslo new year crosses the end of March switch to summer time: the
    # deadline is 2400 h later, which is 01:00 local (not midnight) in summer time.
    deadline = notify_deadline(2025, OSLO, 100)
    assert deadline - year_end(2025, OSLO) == timedelta(hours=2400)
    assert deadline.astimezone(OSLO).isoformat() == "2026-04-11T01:00:00+02:00"


def test_naive_database_clock_raises() -> None:
    with pytest.raises(TypeError):
        is_late(2025, datetime(2026, 1, 15, 12, 0), OSLO, 31)


def test_deadline_is_utc_aware() -> None:
    deadline = notify_deadline(2025, OSLO, 31)
    assert deadline.tzinfo is UTC


@given(
    instant=st.datetimes(
        min_value=datetime(1890, 1, 1), max_value=datetime(2210, 12, 31),
        timezones=st.just(UTC),
    ),
    zone=st.sampled_from(["Europe/Oslo", "UTC", "America/St_Johns", "Pacific/Kiritimati",
                          "Asia/Kathmandu"]),
)
def test_fast_year_of_agrees_with_session_year(instant: datetime, zone: str) -> None:
    tz = ZoneInfo(zone)
    assert year_of(tz)(instant) == session_year(instant, tz)
    assert year_of(tz)(instant.astimezone(tz)) == session_year(instant, tz)
