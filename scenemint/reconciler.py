"""The reconciler: pushes forward every unfinished task that nobody holds a lease on.

Every `reconcile_interval` seconds, at start-up, and at once when a request learns that a
submission's outcome is unknown, one round:

1. frees idempotency keys older than `SCENEMINT_IDEMPOTENCY_TTL` and removes reference
   images of finished tasks that could not be removed before;
2. takes the unfinished rows with no live lease (oldest first); a submission whose answer
   never reached its client is refunded without asking anyone;
3. asks each upstream about the rest of its own rows in batches (a batch whose listing
   fails is split until the failing id is alone, so one task never blocks the others) and
   applies what it says (a failure about capacity, or a task the upstream lost, moves the
   task on to the next upstream while it is young);
   a task still unfinished, or whose listing failed or did not answer in time, fails and is
   refunded once it is past the age limit;
4. resubmits, concurrently and bounded, the submissions the upstream never received while
   they are young (under a lease, with the same `client_task_id`); the round does not wait
   for them.

Every decision is `settlement.decide`'s and every write is conditional on the row's version
and lease, so several instances reconciling the same rows never settle one twice. One row's
error is logged and counted (`scenemint_reconcile_errors_total`); the round goes on. A round
that outlives `SCENEMINT_RECONCILE_DEADLINE` stops; what is left waits for the next round.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from .errors import UpstreamError
from .poller import Fetch, Outcome, list_isolating
from .service import ImageService
from .settlement import FINISHED, Abandoned, Decision, Missing, Resubmit, Seen, State, Step
from .store import LedgerTask

log = logging.getLogger("scenemint.reconciler")

_ROWS_PER_ROUND = 1000
_LISTINGS_AT_ONCE = 4
_DEBOUNCE = 0.05  # after a wake-up, let the requests that wake it at once share the round
_ASKABLE = frozenset({State.SUBMITTING, State.QUEUED, State.RUNNING})
_UNANSWERED = UpstreamError(detail="the listing did not answer in time", reason="timeout")


@dataclass(slots=True)
class Round:
    checked: int = 0
    settled: int = 0
    resubmitted: int = 0
    errors: int = 0


class Reconciler:
    def __init__(self, service: ImageService) -> None:
        self._service = service
        self._settings = service.settings
        self._task: asyncio.Task[None] | None = None
        self._resubmitting: dict[str, asyncio.Task[None]] = {}
        self.rounds = 0  # rounds completed (the first one runs at start-up)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="reconciler")

    async def stop(self) -> None:
        tasks = [*self._resubmitting.values(), *([self._task] if self._task else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None
        self._resubmitting.clear()

    async def wait_resubmissions(self) -> None:
        """Wait for the resubmissions started so far (tests, and a clean shutdown)."""
        await asyncio.gather(*self._resubmitting.values(), return_exceptions=True)

    async def _loop(self) -> None:
        wake = self._service.wakeups.reconcile
        while True:
            wake.clear()
            await self.run_once()
            try:
                async with asyncio.timeout(self._settings.reconcile_interval):
                    await wake.wait()
                await asyncio.sleep(_DEBOUNCE)
            except TimeoutError:
                pass

    async def run_once(self) -> Round:
        """One round; never raises (a failure is logged, counted and left for the next)."""
        result = Round()
        try:
            async with asyncio.timeout(self._settings.reconcile_deadline):
                await self._round(result)
        except TimeoutError:
            log.warning("reconcile round stopped at its deadline; the rest waits for the next")
            result.errors += 1
        except Exception:  # the database is down, or a bug: the loop must go on
            log.exception("reconcile round failed")
            self._service.metrics.reconcile_errors.inc()
            result.errors += 1
        self.rounds += 1
        if result.checked or result.errors:
            log.info(
                "reconciled %d tasks: %d settled, %d resubmitted, %d errors",
                result.checked,
                result.settled,
                result.resubmitted,
                result.errors,
            )
        return result

    async def _round(self, result: Round) -> None:
        service, store = self._service, self._service.store
        await store.forget_keys(created_before=store.now() - self._settings.idempotency_ttl)
        for task_id, path in await store.stale_references(limit=_ROWS_PER_ROUND):
            await service.drop_reference(task_id, path)
        rows = await store.settleable(limit=_ROWS_PER_ROUND)
        result.checked = len(rows)
        to_ask: dict[str, list[LedgerTask]] = {}  # by the upstream that holds them
        for row in rows:
            route = service.router.get(row.upstream)
            askable = route is not None and route.poller is not None
            if askable and row.kind == "task" and row.state in _ASKABLE and row.handed:
                to_ask.setdefault(row.upstream, []).append(row)
            else:  # an answer that never left, a job of ours, nobody to ask: no listing
                await self._settle(row, self._aged(row), result)
        if not to_ask:
            return
        found: dict[str, Outcome] = {}
        try:
            # what the listings do not answer in time is settled by the age rule alone
            async with asyncio.timeout(self._settings.reconcile_deadline * 0.75):
                await asyncio.gather(
                    *(
                        self._ask(self._listing(name), [row.id for row in held], found)
                        for name, held in to_ask.items()
                    )
                )
        except TimeoutError:
            asked = sum(len(held) for held in to_ask.values())
            log.warning("reconcile: listings ran out of time; %d of %d answered", len(found), asked)
        for row in (row for held in to_ask.values() for row in held):
            answer = found.get(row.id, _UNANSWERED)
            if isinstance(answer, UpstreamError):
                log.warning("reconcile: cannot ask about %s: %s", row.id, answer.detail)
                result.errors += 1
                await self._settle(row, self._aged(row), result)
                continue
            observation = Seen(answer) if answer is not None else Missing()
            step = service.ledger.decide(row, observation)
            if isinstance(step, Resubmit):
                result.resubmitted += await self._start_resubmission(row)
                continue
            # still unfinished upstream: is it too old? (one the upstream finished is not:
            # its image is copied, `fetching`, under the fetch deadline instead)
            done_upstream = isinstance(step, Decision) and (
                step.state in FINISHED or step.state is State.FETCHING
            )
            if not done_upstream:
                step = self._aged(row) or step
            await self._settle(row, step, result)

    def _aged(self, row: LedgerTask) -> Step:
        """What needs no upstream: an unanswered submission's refund, or the age limit."""
        return self._service.ledger.decide(row, Abandoned())

    def _listing(self, name: str) -> Fetch:
        route = self._service.router.get(name)
        assert route is not None
        return route.list_tasks

    async def _ask(self, fetch: Fetch, ids: list[str], found: dict[str, Outcome]) -> None:
        """The upstream's answer for every id, into `found`: batches in parallel, a failing
        listing split until the failing id is alone."""
        size = self._settings.poll_batch_size
        batches = [ids[start : start + size] for start in range(0, len(ids), size)]
        limit = asyncio.Semaphore(_LISTINGS_AT_ONCE)

        async def one(batch: list[str]) -> None:
            async with limit:
                found.update(await list_isolating(fetch, batch))

        await asyncio.gather(*(one(batch) for batch in batches))

    async def _settle(self, row: LedgerTask, step: Step, result: Round) -> None:
        if not isinstance(step, Decision):
            return
        try:
            written = await self._service.ledger.write(row, step)
        except Exception:
            log.exception("reconcile: task %s could not be settled", row.id)
            self._service.metrics.reconcile_errors.inc()
            result.errors += 1
            return
        if written is not None and written.finished:
            result.settled += 1

    async def _start_resubmission(self, row: LedgerTask) -> int:
        """Claim the row and send it again in the background; 1 if it was started."""
        if row.id in self._resubmitting:
            return 0
        if len(self._resubmitting) >= self._settings.resubmit_concurrency:
            return 0  # no free slot: the next round tries again
        service = self._service
        claimed = await service.store.claim(
            row, owner=service.owner, seconds=self._settings.lease_seconds
        )
        if claimed is None:
            return 0  # someone else took it
        task = asyncio.create_task(self._resubmit(claimed), name=f"resubmit-{row.id}")
        self._resubmitting[row.id] = task
        task.add_done_callback(lambda _: self._resubmitting.pop(row.id, None))
        return 1

    async def _resubmit(self, row: LedgerTask) -> None:
        try:
            written = await self._service.resubmit(row)
        except Exception:
            log.exception("reconcile: resubmission of %s failed", row.id)
            self._service.metrics.reconcile_errors.inc()
            return
        if written is not None:
            log.info("reconcile: resubmitted interrupted task %s: %s", row.id, written.state)
