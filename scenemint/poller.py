"""Poll coalescing: many pollers of running tasks share few upstream calls.

While one `GET /api/image-tasks?ids=...` is in flight, newly asked ids wait for the next
batch (at most `batch_size` ids a call), an id already in flight joins that call, and an
id answered less than `min_interval` seconds ago is answered from that result. A failed
batch fails only the pollers waiting on it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from .errors import UpstreamError
from .models import TaskListing, UpstreamTask

Fetch = Callable[[list[str]], Awaitable[TaskListing]]
Result = UpstreamTask | None  # None: the upstream does not know the id


class TaskPoller:
    def __init__(
        self,
        fetch: Fetch,
        *,
        batch_size: int = 50,
        min_interval: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._batch_size = batch_size
        self._min_interval = min_interval
        self._clock = clock
        self._recent: dict[str, tuple[float, Result]] = {}
        self._waiting: dict[str, asyncio.Future[Result]] = {}
        self._in_flight: dict[str, asyncio.Future[Result]] = {}
        self._runner: asyncio.Task[None] | None = None
        self.upstream_calls = 0

    async def fetch(self, task_id: str) -> Result:
        """The upstream's view of one task, fresh within `min_interval`."""
        recent = self._recent.get(task_id)
        if recent is not None and self._clock() - recent[0] < self._min_interval:
            return recent[1]
        # join the batch in flight for this id, or the one waiting to go
        future = self._in_flight.get(task_id) or self._waiting.get(task_id)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._waiting[task_id] = future
            if self._runner is None or self._runner.done():
                self._runner = asyncio.create_task(self._run())
        # shield: one poller giving up must not cancel the answer others wait for
        return await asyncio.shield(future)

    def forget(self, task_id: str) -> None:
        """Drop a finished task from the short-term memory."""
        self._recent.pop(task_id, None)

    async def _run(self) -> None:
        while self._waiting:
            ids = list(self._waiting)[: self._batch_size]
            batch = {task_id: self._waiting.pop(task_id) for task_id in ids}
            self._in_flight.update(batch)
            try:
                listing = await self._fetch(ids)
            except UpstreamError as exc:
                for future in batch.values():
                    if not future.done():
                        future.set_exception(exc)
                    future.exception()  # retrieved: nobody may be left to await it
                continue
            except BaseException as exc:
                for future in batch.values():
                    if not future.done():
                        future.set_exception(UpstreamError(detail=f"poll failed: {exc!r}"))
                    future.exception()
                raise
            finally:
                for task_id in ids:
                    self._in_flight.pop(task_id, None)
            now = self._clock()
            self._prune(now)
            for task_id, future in batch.items():
                result = listing.items.get(task_id)
                self._recent[task_id] = (now, result)
                if not future.done():
                    future.set_result(result)

    def _prune(self, now: float) -> None:
        if len(self._recent) > 10_000:
            stale = [k for k, (at, _) in self._recent.items() if now - at >= self._min_interval]
            for key in stale:
                del self._recent[key]
