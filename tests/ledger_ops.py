"""Store-level moves for tests, made the only way the service makes them: settlement
decisions applied conditionally (a stale one changes nothing)."""

from __future__ import annotations

from scenemint.settlement import Decision, ErrorCode, Guard, State, fail
from scenemint.store import LedgerTask, SQLStore


async def refund(
    store: SQLStore,
    task_id: str,
    *,
    error: str | None = "boom",
    code: ErrorCode = ErrorCode.UPSTREAM,
) -> bool:
    """Fail the task (and so refund it); True only for the call whose write landed."""
    row = await store.get_task(task_id)
    if row is None:
        return False
    return await store.apply(row, fail(code, Guard.FREE, error=error)) is not None


async def move(
    store: SQLStore, task_id: str, state: State, *, image_url: str | None = None
) -> LedgerTask | None:
    """Move the task to an unfinished state or to completed (None when it cannot)."""
    row = await store.get_task(task_id)
    if row is None:
        return None
    return await store.apply(row, Decision(state, Guard.FREE, image_url=image_url))


async def complete(store: SQLStore, task_id: str, image_url: str = "http://u/x.png") -> bool:
    return await move(store, task_id, State.COMPLETED, image_url=image_url) is not None
