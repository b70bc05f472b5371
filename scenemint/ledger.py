"""Applying settlement decisions to ledger rows: the one way a row changes after its charge.

`Ledger.observe(row, observation)` asks `settlement.decide` (with the upstream the row may move
on to, from the router) and writes the decision through the store, conditional on the row's
version and lease; `write` retries a database error within the request's deadline. After a
write (`_changed`): the answer cache gets the new answer, the metrics count the outcome, the
workers that have something to do now are woken, and a reference image nobody needs any more
is dropped. `lease(row)` keeps a lease alive while its holder works.

Every piece of the service that moves a row — a generate request, a poll, the reconciler, a
copier, a job runner — goes through here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import replace

from . import deadline
from .answers import TaskAnswers, public_task
from .config import Settings
from .errors import StoreUnavailable
from .metrics import Metrics
from .references import References
from .settlement import (
    FINISHED,
    Accepted,
    Decision,
    ErrorCode,
    Fault,
    Guard,
    Held,
    Limits,
    Missing,
    Observation,
    Refused,
    Seen,
    State,
    Step,
    decide,
)
from .store import LedgerTask, Store
from .upstream.router import Router

log = logging.getLogger("scenemint.ledger")

_WRITE_ATTEMPTS = 3  # a settlement write that meets a database error is tried this often


class Wakeups:
    """Events that wake the background workers of this process."""

    def __init__(self) -> None:
        self.reconcile = asyncio.Event()  # a row needs the reconciler now
        self.copy = asyncio.Event()  # a task's image is waiting to be copied
        self._jobs: dict[str, asyncio.Event] = {}  # by upstream: a job waits for its runners

    def jobs(self, upstream: str) -> asyncio.Event:
        """Set when a job of `upstream` waits for a runner (its runners wait on it)."""
        event = self._jobs.get(upstream)
        if event is None:
            event = self._jobs[upstream] = asyncio.Event()
        return event


class Ledger:
    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        router: Router,
        metrics: Metrics,
        answers: TaskAnswers,
        references: References,
        owner: str,
        wakeups: Wakeups,
        on_change: Callable[[LedgerTask], None] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.router = router
        self.metrics = metrics
        self.answers = answers
        self.references = references
        self.owner = owner
        self.wakeups = wakeups
        self.on_change = on_change  # told of every row this process wrote (task events)
        self.limits = Limits(
            resubmit_window=settings.resubmit_window,
            task_max_age=settings.task_max_age,
            fetch_deadline=settings.image_fetch_deadline,
            handoff_grace=settings.handoff_grace,
        )

    def decide(self, row: LedgerTask, observation: Observation, *, hand: bool = False) -> Step:
        """The settlement's step for `row`, with the upstream it may move on to (asked of
        the router only when the observation is one that can move a task)."""
        alternative = self.router.alternative(row.tried) if _may_move(observation) else None
        return decide(
            row,
            observation,
            now=self.store.now(),
            limits=self.limits,
            hand=hand,
            alternative=alternative,
        )

    async def observe(
        self, row: LedgerTask, observation: Observation, *, keep_lease: bool = False
    ) -> LedgerTask | None:
        """Decide and write what `observation` means for `row` (a Resubmit is not ours: None).

        `keep_lease`: an owner's write that keeps the lease (its answer has not left yet)."""
        step = self.decide(row, observation)
        if not isinstance(step, Decision):
            return row if step is None else None
        if keep_lease and step.guard is Guard.OWNER and step.state not in FINISHED:
            step = replace(step, keep_lease=True)
        return await self.write(row, step)

    async def write(self, row: LedgerTask, decision: Decision) -> LedgerTask | None:
        """Apply a decision to `row`; None when the row changed first (nothing was written).

        A database error is retried a few times, within the request's deadline: a write whose
        commit was lost then finds its own change (stale), which the caller reads back.
        """
        owner = self.owner if decision.guard is Guard.OWNER else None
        for attempt in range(1, _WRITE_ATTEMPTS + 1):
            try:
                written = await self.store.apply(row, decision, owner=owner)
                break
            except StoreUnavailable:
                pause = 0.1 * 2**attempt
                left = deadline.remaining()
                if attempt == _WRITE_ATTEMPTS or (left is not None and left <= pause):
                    raise
                await asyncio.sleep(pause)
        if written is not None:
            if decision.move_to:
                self._moved(row, written)
            await self._changed(written)
        return written

    @asynccontextmanager
    async def lease(self, row: LedgerTask) -> AsyncIterator[None]:
        """Keep our lease on `row` alive while the body runs (renewed at a third of its term)."""
        seconds = self.settings.lease_seconds

        async def renew() -> None:
            while True:
                await asyncio.sleep(seconds / 3)
                try:
                    if not await self.store.renew(row, owner=self.owner, seconds=seconds):
                        log.warning("lost the lease of task %s", row.id)
                        return
                except StoreUnavailable:
                    log.warning("could not renew the lease of task %s", row.id)

        renewer = asyncio.create_task(renew(), name=f"lease-{row.id}")
        try:
            yield
        finally:
            renewer.cancel()
            with suppress(asyncio.CancelledError):
                await renewer

    async def reread(self, row: LedgerTask) -> LedgerTask:
        return await self.store.get_task(row.id) or row

    def _moved(self, before: LedgerTask, after: LedgerTask) -> None:
        self.metrics.failovers.labels(before.upstream, after.upstream).inc()
        why = after.attempts[-1].why if after.attempts else ""
        log.warning(
            "task %s moves on from upstream %s to %s: %s",
            after.id,
            before.upstream,
            after.upstream,
            why,
        )

    async def _changed(self, row: LedgerTask) -> None:
        """After a write: metrics, the answer cache, the workers, a reference nobody needs."""
        self.answers.put(row.id, public_task(row), version=row.version, finished=row.finished)
        if self.on_change is not None:
            self.on_change(row)
        if row.state == State.FAILED:
            self.metrics.credits_refunded.inc()
            refused = row.error_code == ErrorCode.REFUSED
            self.metrics.tasks.labels("submit_failed" if refused else "failed").inc()
            log.info(
                "refunded %s for task %s at upstream %s: %s",
                row.fingerprint[:6] + "…",
                row.id,
                row.upstream,
                row.error_code,
            )
        elif row.state == State.COMPLETED:
            self.metrics.tasks.labels("completed").inc()
        elif row.lease_owner is None:
            if row.state == State.FETCHING:
                self.wakeups.copy.set()
            elif row.kind == "sync" and row.state == State.QUEUED and row.handed:
                self.wakeups.jobs(row.upstream).set()
            elif row.state == State.SUBMITTING and row.handed:
                self.wakeups.reconcile.set()  # moved on, or unknown: the reconciler sends it
        if row.finished and row.reference_path:
            await self.drop_reference(row.id, row.reference_path)

    async def drop_reference(self, task_id: str, path: str) -> bool:
        """Remove a finished task's reference file; a failure is left for the next round."""
        try:
            await self.references.drop(path)
            await self.store.reference_dropped(task_id)
        except (OSError, StoreUnavailable) as exc:
            log.warning("reference of %s not removed yet: %s", task_id, exc)
            return False
        return True


def _may_move(observation: Observation) -> bool:
    """Whether `observation` is one the settlement may move a task on for: a refusal of the
    upstream's, our breaker, a lost task, a failure about capacity."""
    match observation:
        case Refused(fault=fault):
            return fault is Fault.UPSTREAM
        case Held() | Missing():
            return True
        case Accepted(task) | Seen(task):
            return task.status == "failed" and task.fault is Fault.UPSTREAM
    return False
