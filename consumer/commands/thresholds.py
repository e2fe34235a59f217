"""``milestones thresholds list | set ORG T1,T2,... | unset ORG``, and their restore.

A change is validated first (nothing is written for bad input), then sent to the compacted
thresholds topic and acknowledged, then applied to Postgres with the value it replaced. In that
order a crash in between leaves the change on the topic, where the next ``run`` or ``replay``
finds it newer than the database and applies it; the other order could lose it in a rebuild.
"""

from __future__ import annotations

from datetime import UTC, datetime

from consumer.commands.common import parse_uuid, table
from consumer.domain.support import when
from consumer.domain.thresholds import ThresholdsChange, describe, parse_thresholds
from consumer.runtime import command_pool
from consumer.settings import Settings, SettingsError
from consumer.store import thresholds_sql
from consumer.stream.thresholds_topic import publish_change


async def thresholds_command(
    settings: Settings, *, action: str, organization: str | None = None,
    values: str | None = None, show_history: bool = False,
) -> int:
    if action == "list":
        return await _list(settings, show_history=show_history)
    assert organization is not None
    organization_id = parse_uuid(organization, "ORG")
    thresholds: tuple[int, ...] | None = None
    if action == "set":
        try:
            thresholds = parse_thresholds(values or "")
        except ValueError as error:
            raise SettingsError(f"thresholds: {error}") from None
    change = ThresholdsChange(organization_id, thresholds, datetime.now(UTC))
    settings.require_kafka()
    async with command_pool(settings, max_size=1) as pool:
        partition, offset = await publish_change(settings, change)
        async with pool.acquire() as connection:
            applied = await thresholds_sql.apply_change(connection, change, "command")
    where = f"{settings.thresholds_topic}[{partition}]@{offset}"
    if not applied.applied:
        print(f"organization {organization_id}: the database holds a newer change (at "
              f"{applied.known_changed_at:%Y-%m-%d %H:%M:%S%z}); this one, at {where}, was not"
              " applied: check the clocks and run the command again")
        return 1
    def shown(row: tuple[int, ...] | None) -> str:
        return describe(row) if row is not None else f"no row: default {describe(settings.thresholds)}"

    print(f"organization {organization_id}: {shown(thresholds)} (was {shown(applied.previous)});"
          f" published to {where}")
    if thresholds:
        print(f"milestones the new thresholds reach are recorded at each mentor's next session;"
              f" for everyone at once: milestones sweep --organization {organization_id}")
    return 0


async def _list(settings: Settings, *, show_history: bool) -> int:
    async with (
        command_pool(settings, max_size=1, migrate=False) as pool,  # a listing changes nothing
        pool.acquire() as connection,
    ):
        rows = await thresholds_sql.list_thresholds(connection)
        changes = await thresholds_sql.history(connection) if show_history else []
    print(f"default (MILESTONES_THRESHOLDS): {describe(settings.thresholds)}")
    print(table(
        [(str(row["organization_id"]), describe(row["thresholds"]), when(row["changed_at"]),
          describe(row["previous"])) for row in rows],
        ("organization", "thresholds", "changed at", "previous"),
    ))
    if show_history:
        print("\nhistory (`-`: no row, the default applied)")
        print(table(
            [(str(row["organization_id"]), when(row["changed_at"]),
              describe(row["previous"]), describe(row["thresholds"]), row["source"])
             for row in changes],
            ("organization", "changed at", "from", "to", "source"),
        ))
    return 0
