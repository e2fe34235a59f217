"""The settings object: the contract's defaults, parsing, and errors that name the variable."""

from __future__ import annotations

import os
from zoneinfo import ZoneInfo

import pytest

from consumer.settings import ENV_PREFIX, Settings, SettingsError, load_settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No MILESTONES_* variable of the shell running the tests leaks in."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def test_defaults_are_the_contracts() -> None:
    settings = load_settings()
    assert settings.kafka_bootstrap_servers is None
    assert settings.database_url is None
    assert settings.group_id == "milestone-engine"
    assert settings.activity_topic == "activity-logged"
    assert settings.preferences_topic == "mentor-preferences"
    assert settings.notification_topic == "milestone-notifications"
    assert settings.dlq_topic == "activity-logged.dlq"
    assert settings.kafka_session_timeout_ms == 10_000
    assert settings.thresholds == (50, 100, 200)
    assert settings.timezone == "Europe/Oslo"
    assert settings.tz == ZoneInfo("Europe/Oslo")
    assert settings.notify_grace_days == 31
    assert settings.shutdown_timeout_s == 20
    assert settings.metrics_port == 9464
    assert settings.fault_point is None
    assert settings.fault_after == 1
    assert settings.counted_activity_types is None  # all types count
    assert settings.input_topics == ("activity-logged", "mentor-preferences")


def test_settings_are_frozen() -> None:
    settings = load_settings()
    with pytest.raises(ValueError, match="frozen"):
        settings.group_id = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("100, 50,50", (50, 100)),
        ("50,100,200", (50, 100, 200)),
        (" 200 , 100 , 50 ", (50, 100, 200)),
        ("7", (7,)),
        ("1,2,,3", (1, 2, 3)),
    ],
)
def test_thresholds_are_parsed_sorted_and_without_repeats(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: tuple[int, ...]
) -> None:
    monkeypatch.setenv("MILESTONES_THRESHOLDS", value)
    assert load_settings().thresholds == expected


@pytest.mark.parametrize(
    "value", ["abc", "50;100", "1.5", "50,x", "[50, 100]", "0", "50,-1", "-50"]
)
def test_bad_thresholds_name_the_variable(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("MILESTONES_THRESHOLDS", value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert str(caught.value).startswith("MILESTONES_THRESHOLDS")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("value", ["Mars/Olympus", "", "../etc/passwd", "Oslo"])
def test_unknown_time_zone_names_the_variable(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("MILESTONES_TIMEZONE", value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert str(caught.value).startswith("MILESTONES_TIMEZONE")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("value", ["UTC", "America/New_York", "Pacific/Auckland"])
def test_other_time_zones_are_accepted(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("MILESTONES_TIMEZONE", value)
    settings = load_settings()
    assert settings.tz == ZoneInfo(value)


@pytest.mark.parametrize("value", ["-1", "-31", "many"])
def test_bad_grace_days_name_the_variable(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("MILESTONES_NOTIFY_GRACE_DAYS", value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert str(caught.value).startswith("MILESTONES_NOTIFY_GRACE_DAYS")


def test_zero_grace_days_is_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MILESTONES_NOTIFY_GRACE_DAYS", "0")
    assert load_settings().notify_grace_days == 0


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("MILESTONES_FAULT_POINT", "after_lunch"),
        ("MILESTONES_METRICS_PORT", "70000"),
        ("MILESTONES_KAFKA_SESSION_TIMEOUT_MS", "ten"),
        ("MILESTONES_SHUTDOWN_TIMEOUT_S", "0"),
        ("MILESTONES_FAULT_AFTER", "0"),
    ],
)
def test_other_bad_values_name_their_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert str(caught.value).startswith(variable + ":")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("session", frozenset({"session"})),
        ("session, call", frozenset({"session", "call"})),
        ("  session ,  group call  ,", frozenset({"session", "group call"})),
        ("Session,session", frozenset({"Session", "session"})),
        ("", None),
        (" , ", None),
    ],
)
def test_counted_types_are_a_comma_list_with_spaces_trimmed(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: frozenset[str] | None
) -> None:
    monkeypatch.setenv("MILESTONES_COUNTED_ACTIVITY_TYPES", value)
    assert load_settings().counted_activity_types == expected


def test_environment_overrides_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MILESTONES_GROUP_ID", "engine-b")
    monkeypatch.setenv("MILESTONES_ACTIVITY_TOPIC", "acts")
    monkeypatch.setenv("MILESTONES_METRICS_PORT", "0")
    monkeypatch.setenv("MILESTONES_FAULT_POINT", "after_db_commit")
    monkeypatch.setenv("MILESTONES_FAULT_AFTER", "3")
    settings = load_settings()
    assert (settings.group_id, settings.activity_topic, settings.metrics_port) == (
        "engine-b", "acts", 0
    )
    assert (settings.fault_point, settings.fault_after) == ("after_db_commit", 3)


def test_a_flag_overrides_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MILESTONES_THRESHOLDS", "5")
    assert load_settings(thresholds="10,20").thresholds == (10, 20)
    assert load_settings(thresholds=[20, 10, 10]).thresholds == (10, 20)


def test_counted_types_from_a_flag_may_be_a_collection() -> None:
    assert load_settings(counted_activity_types=["session", "call"]).counted_activity_types == (
        frozenset({"session", "call"})
    )


def test_a_bad_flag_names_the_variable() -> None:
    with pytest.raises(SettingsError, match=r"^MILESTONES_TIMEZONE:"):
        load_settings(timezone="Nowhere/Special")


def test_database_url_is_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    dsn = "postgresql://engine:hunter2@db/milestones"
    monkeypatch.setenv("MILESTONES_DATABASE_URL", dsn)
    settings = load_settings()
    assert "hunter2" not in repr(settings)
    assert settings.require_database() == dsn


def test_missing_database_and_broker_name_the_variable() -> None:
    settings = load_settings()
    with pytest.raises(SettingsError, match=r"^MILESTONES_DATABASE_URL"):
        settings.require_database()
    with pytest.raises(SettingsError, match=r"^MILESTONES_KAFKA_BOOTSTRAP_SERVERS"):
        settings.require_kafka()


def test_broker_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MILESTONES_KAFKA_BOOTSTRAP_SERVERS", "kafka:9092")
    assert load_settings().require_kafka() == "kafka:9092"


def test_settings_class_reads_the_same_prefix() -> None:
    assert Settings.model_config.get("env_prefix") == "MILESTONES_"


def test_empty_default_thresholds_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MILESTONES_THRESHOLDS", " , ")
    with pytest.raises(SettingsError, match=r"^MILESTONES_THRESHOLDS"):
        load_settings()


async def test_the_fetch_wait_reaches_the_consumer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tansu holds a fetch that found nothing for the whole wait, even when records arrive:
    the wait bounds latency there, so it must be short by default and reach the client."""
    from consumer.stream.kafka import make_consumer

    monkeypatch.setenv("MILESTONES_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9")
    assert make_consumer(load_settings(), group_id="g")._fetch_max_wait_ms == 100
    monkeypatch.setenv("MILESTONES_FETCH_MAX_WAIT_MS", "20")
    assert make_consumer(load_settings(), group_id="g")._fetch_max_wait_ms == 20
    monkeypatch.setenv("MILESTONES_FETCH_MAX_WAIT_MS", "-1")
    with pytest.raises(SettingsError, match=r"^MILESTONES_FETCH_MAX_WAIT_MS:"):
        load_settings()


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("postgresql://engine:secret@db:5432/milestones", None),
        ("postgres://db/milestones", None),
        ("postgresql:///milestones?host=/var/run/postgresql", None),
        ("postgresql://engine:s%40cret@[::1]:5432/milestones", None),
        ("postgresql://engine:pa:ss@db1:5432,db2:5433/milestones?sslmode=require", None),
        ("postgresql+asyncpg://engine:secret@db/milestones", "scheme 'postgresql+asyncpg'"),
        ("jdbc:postgresql://db/milestones", "scheme 'jdbc:postgresql'"),
        ("db:5432/milestones", "not a URL"),
        ("postgresql://db:99999/milestones", "port '99999'"),
        ("postgresql://db:abc/milestones", "port 'abc'"),
        ("postgresql://db:/milestones", "port ''"),
        ("postgresql://[::1]:0/milestones", "port '0'"),
        ("postgresql://db1:5432,db2:x/milestones", "port 'x'"),
    ],
)
def test_an_unusable_database_url_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, url: str, problem: str | None
) -> None:
    monkeypatch.setenv("MILESTONES_DATABASE_URL", url)
    if problem is None:
        assert load_settings().require_database() == url
        return
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith("MILESTONES_DATABASE_URL: ")
    assert problem in message
    assert "secret" not in message
