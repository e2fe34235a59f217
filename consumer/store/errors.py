"""The store's small exception family: the loop decides retry, dead-letter or stop from these."""

from __future__ import annotations

import asyncio

import asyncpg


class StoreError(Exception):
    """Base of everything the Postgres adapter raises on purpose."""


class StoreUnavailable(StoreError):
    """Connection lost, refused or a transient server state: retry later, commit nothing."""


class DatabaseRefused(StoreUnavailable):
    """The server answered and refused us (credentials, database name, TLS trust): waiting
    cannot help, so start-up stops at once instead of retrying."""


class StoreConflict(StoreError):
    """Deadlock or serialization failure: retry the same transaction at once."""


class RefusedContent(StoreError):
    """The database refused a value of the batch: isolate the message and dead-letter it."""


class MigrationRequired(StoreError):
    """The schema is behind and this role may not migrate it."""


_TRANSIENT_CLASSES = ("08", "53", "57", "58", "55")  # connection, resources, operator, system


def classify(error: BaseException) -> StoreError | None:
    """Map an asyncpg or socket error to the family; None for a programming error."""
    if isinstance(error, StoreError):
        return error
    if isinstance(error, OSError | asyncio.TimeoutError | ConnectionError):
        return StoreUnavailable(f"{type(error).__name__}: {error}")
    if isinstance(error, asyncpg.exceptions.InterfaceError | asyncpg.exceptions.InternalClientError):
        return StoreUnavailable(f"{type(error).__name__}: {error}")
    if isinstance(error, asyncpg.PostgresError):
        state = getattr(error, "sqlstate", "") or ""
        if state in ("40001", "40P01"):
            return StoreConflict(f"{state}: {error}")
        if state[:2] in _TRANSIENT_CLASSES:
            return StoreUnavailable(f"{state}: {error}")
        if state == "42501":
            # The engine's role lacks a privilege (a table added by a migration and not yet
            # granted): wait for the operator's `milestones grant` like for a database away,
            # rather than dead-letter good messages one by one.
            return StoreUnavailable(f"{state}: {error}; run `milestones grant` as the owner")
        if state[:2] in ("22", "23"):  # data exception, integrity constraint violation
            return RefusedContent(f"{state}: {error}")
    return None
