"""Poll coalescing: many pollers of unfinished tasks share few upstream listings.

While one `GET /api/image-tasks?ids=...` is in flight, ids asked for wait for the next
batch (at most `batch_size` ids a call), and an id already waiting for that batch shares
it. An id never joins a listing that has already been sent: every answer a poller gets was
asked for after the poller read its ledger row, so it can never describe an older row
(`settlement` relies on that). Reuse of answers across polls is the service's business
(its answer cache, keyed by the row's version), not this module's.

An id the listing names in neither `items` nor `missing_ids` is unknown, not missing.

A listing that fails is split until the failing id is alone (`list_isolating`): one id the
upstream chokes on fails only its own pollers. The runner survives anything a listing
raises: the waiters of that batch get an `UpstreamError`, the next batch goes on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from .errors import UpstreamError, UpstreamUnavailable
from .models import TaskListing, UpstreamTask

log = logging.getLogger("scenemint.poller")

Fetch = Callable[[list[str]], Awaitable[TaskListing]]
Result = UpstreamTask | None  # None: the upstream does not know the id
Outcome = Result | UpstreamError


async def list_isolating(fetch: Fetch, ids: list[str]) -> dict[str, Outcome]:
    """List `ids`; when a listing fails, list each half on its own, down to single ids.

    A failure that says nothing about the ids (the upstream is unreachable or the breaker
    is open) is not split: every id gets it at once.
    """
    try:
        listing = await fetch(ids)
    except UpstreamError as exc:
        if len(ids) == 1 or not _may_depend_on_ids(exc):
            return dict.fromkeys(ids, exc)
        middle = len(ids) // 2
        first, second = await asyncio.gather(
            list_isolating(fetch, ids[:middle]), list_isolating(fetch, ids[middle:])
        )
        return first | second
    return {task_id: _outcome(listing, task_id) for task_id in ids}


def _outcome(listing: TaskListing, task_id: str) -> Outcome:
    """What the listing says of one id: the task, None when the upstream says it does not
    know it (`missing_ids`), or unknown when the answer left the id out of both (a partial
    or paginated answer proves nothing: the task may well exist)."""
    found = listing.items.get(task_id)
    if found is not None:
        return found
    if task_id in listing.missing:
        return None
    return UpstreamError(
        detail=f"list: the listing left {task_id} out of items and missing_ids", reason="partial"
    )


def _may_depend_on_ids(exc: UpstreamError) -> bool:
    return not isinstance(exc, UpstreamUnavailable) and exc.reason not in ("connect", "breaker")


class TaskPoller:
    def __init__(self, fetch: Fetch, *, batch_size: int = 50) -> None:
        self._fetch = fetch
        self._batch_size = batch_size
        self._waiting: dict[str, asyncio.Future[Result]] = {}
        self._runner: asyncio.Task[None] | None = None

    async def fetch(self, task_id: str) -> Result:
        """The upstream's view of one task, asked for after this call began."""
        future = self._waiting.get(task_id)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._waiting[task_id] = future
            if self._runner is None or self._runner.done():
                self._runner = asyncio.create_task(self._run(), name="task-poller")
        # shield: one poller giving up must not cancel the answer others wait for
        return await asyncio.shield(future)

    async def _run(self) -> None:
        while self._waiting:
            ids = list(self._waiting)[: self._batch_size]
            batch = {task_id: self._waiting.pop(task_id) for task_id in ids}
            try:
                outcomes = await list_isolating(self._fetch, ids)
            except asyncio.CancelledError:
                _fail_all(batch, UpstreamError(detail="poll cancelled"))
                raise
            except Exception as exc:  # a bug below must not leave pollers waiting for ever
                log.exception("task listing raised unexpectedly")
                outcomes = dict.fromkeys(ids, UpstreamError(detail=f"poll failed: {exc!r}"))
            for task_id, future in batch.items():
                if future.done():
                    continue
                outcome = outcomes.get(task_id)
                if isinstance(outcome, UpstreamError):
                    future.set_exception(outcome)
                    future.exception()  # retrieved: nobody may be left to await it
                else:
                    future.set_result(outcome)


def _fail_all(batch: dict[str, asyncio.Future[Result]], exc: UpstreamError) -> None:
    for future in batch.values():
        if not future.done():
            future.set_exception(exc)
            future.exception()
