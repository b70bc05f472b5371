"""Credits and the task ledger: the `Store` interface and its SQL implementation."""

from __future__ import annotations

from ..config import Settings
from .base import (
    CAP,
    DAILY_GRANT,
    Attempt,
    AuditReport,
    Charge,
    KeyInUse,
    LedgerTask,
    NewTask,
    QuotaStatus,
    QuotaStore,
    Store,
    UpstreamCounts,
)
from .sql import SQLStore

__all__ = [
    "CAP",
    "DAILY_GRANT",
    "Attempt",
    "AuditReport",
    "Charge",
    "KeyInUse",
    "LedgerTask",
    "NewTask",
    "QuotaStatus",
    "QuotaStore",
    "SQLStore",
    "Store",
    "UpstreamCounts",
    "open_store",
]


async def open_store(settings: Settings, *, migrate: bool = True) -> SQLStore:
    """The store named by the settings: PostgreSQL by URL, else SQLite in the data directory
    (`migrate=False`: as it is, refused unless its schema is this version's)."""
    return await SQLStore.open(settings.resolved_database_url(), tz=settings.tz, migrate=migrate)
