"""The reconciler: settles ledger tasks nobody is polling, so a failure is refunded anyway.

Every `reconcile_interval` seconds (and once at start-up) it takes the unfinished ledger
rows, asks the upstream about them in batches (`ids=a,b,c`), and settles each one through
the service, which refunds failures exactly once. A row still "submitting" (its process died
before hearing back, or the answer was lost) is looked up; if the upstream never got it and
it is young, it is submitted again (idempotent by `client_task_id`), otherwise refunded.
Several instances may reconcile the same rows at once: every settlement is conditional in
the database, so they cannot refund twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from .errors import UpstreamError
from .service import ImageService
from .store import LedgerTask

log = logging.getLogger("scenemint.reconciler")

_ROWS_PER_ROUND = 1000
RESUBMIT_REFUSED = "resubmission after an interrupted submission was refused"
# 4xx answers that will not change on a retry (not 401/403: a key problem is ours to fix)
_FINAL_REFUSALS = frozenset({400, 404, 409, 410, 413, 415, 422})
REFERENCE_LOST = "the reference image of an interrupted submission is gone"


@dataclass(slots=True)
class Round:
    checked: int = 0
    resubmitted: int = 0
    settled: int = 0
    errors: int = 0


class Reconciler:
    def __init__(self, service: ImageService) -> None:
        self._service = service
        self._settings = service.settings
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._service.upstream is not None and self._task is None:
            self._task = asyncio.create_task(self._loop(), name="reconciler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _loop(self) -> None:
        first = True
        while True:
            try:
                await self.run_once(startup=first)
            except Exception:
                log.exception("reconcile round failed")
            first = False
            await asyncio.sleep(self._settings.reconcile_interval)

    async def run_once(self, *, startup: bool = False) -> Round:
        """One pass over the unfinished ledger rows.

        A "submitting" row younger than the submit timeout may still be in flight in some
        process; it is left alone unless this is start-up (this process owned nothing yet).
        """
        service, store = self._service, self._service.store
        upstream = service.upstream
        result = Round()
        if upstream is None:
            return result
        now = time.time()
        rows = await store.unfinished_tasks(older_than=now, limit=_ROWS_PER_ROUND)
        in_flight = now - self._settings.submit_timeout - self._settings.connect_timeout
        rows = [r for r in rows if startup or r.state != "submitting" or r.created_at < in_flight]
        size = self._settings.poll_batch_size
        for start in range(0, len(rows), size):
            batch = rows[start : start + size]
            try:
                listing = await upstream.list_tasks([row.id for row in batch])
            except UpstreamError as exc:
                log.warning("reconcile: listing failed, retrying next round: %s", exc.detail)
                result.errors += 1
                continue
            for row in batch:
                result.checked += 1
                found = listing.items.get(row.id)
                try:
                    if found is None and row.state == "submitting" and self._young(row, now):
                        result.resubmitted += await self._resubmit(row)
                        continue
                    settled = await service.settle(row.id, found, known=row)
                    result.settled += settled.finished
                except UpstreamError as exc:
                    log.warning("reconcile: task %s: %s", row.id, exc.detail)
                    result.errors += 1
        if result.checked:
            log.info(
                "reconciled %d tasks: %d settled, %d resubmitted, %d errors",
                result.checked,
                result.settled,
                result.resubmitted,
                result.errors,
            )
        return result

    def _young(self, row: LedgerTask, now: float) -> bool:
        return now - row.created_at < self._settings.resubmit_window

    async def _resubmit(self, row: LedgerTask) -> int:
        service = self._service
        try:
            found = await service.resubmit(row)
        except FileNotFoundError:
            await service.abandon(row, error=REFERENCE_LOST)
            log.warning("reconcile: refunded %s, its reference image is gone", row.id)
            return 0
        except UpstreamError as exc:
            if exc.upstream_status in _FINAL_REFUSALS:
                # the upstream will never take it: give the credit back now
                await service.abandon(row, error=RESUBMIT_REFUSED)
                return 0
            raise
        log.info("reconcile: resubmitted interrupted task %s", row.id)
        await service.settle(row.id, found)
        return 1
