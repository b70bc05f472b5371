"""Work that outlives a request, claimed by lease in the database: image copies, the jobs
of a synchronous upstream, and the retention sweep.

The job runner (openai kind): a task is charged `queued` and answered at once; up to
`SCENEMINT_JOB_CONCURRENCY` runners per instance claim queued jobs (oldest first; on
PostgreSQL several instances share the work with `FOR UPDATE SKIP LOCKED`), write that the
request is being sent, send it once, and settle what it gave (`ImageService.run_job`).

The copier: a task whose upstream finished is `fetching` until its image is in our image
store. Every instance runs up to `SCENEMINT_COPY_CONCURRENCY` copies; a row is copied only
by the instance that leased it (`claim_fetching`; on PostgreSQL `FOR UPDATE SKIP LOCKED`),
so each image is downloaded once however many pollers and instances see the task. A copy
that fails leaves the row unleased for a back-off and is tried again — by any instance —
until the fetch deadline, which fails and refunds the task (`settlement`). A process killed
mid-copy loses its lease; the next holder copies again (writes are atomic: nothing half
written is ever visible under a key).

The sweeper: one instance at a time (a named lease), every `SCENEMINT_SWEEP_INTERVAL`,
marks images older than `SCENEMINT_IMAGE_RETENTION_DAYS` expired, deletes the objects no
live task uses any more, and removes objects of no task over an hour old (what a copy left
when it was killed between storing an image and recording it).

Both loops survive any exception of one item: it is logged and counted, the loop goes on.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from .images.audit import ORPHAN_GRACE, orphans, remove_orphan
from .service import ImageService
from .store import LedgerTask

log = logging.getLogger("scenemint.jobs")

_IDLE_POLL = 1.0  # seconds between looks for work another instance left (nothing woke us)
_SWEEP_BATCH = 500


Claim = Callable[..., Awaitable[list[LedgerTask]]]
Work = Callable[[LedgerTask], Awaitable[LedgerTask | None]]


class LeasedWorkers:
    """Up to `slots` rows at a time, each claimed by lease in the database and worked on by
    this process. Wakes when `wake` is set (work made here) and every second otherwise
    (work another instance left); a slot that frees looks for more at once."""

    def __init__(
        self,
        service: ImageService,
        *,
        name: str,
        slots: int,
        wake: asyncio.Event,
        claim: Claim,
        work: Work,
        drain: float = 0.0,
        until: asyncio.Event | None = None,
        force: asyncio.Event | None = None,
    ) -> None:
        self._service = service
        self._name = name
        self._slots = slots
        self._wake = wake
        self._claim = claim
        self._work = work
        self._drain = drain  # seconds the work started may finish in, on stop
        self._until = until  # once set, nothing more is claimed
        self._force = force  # once set, a drain ends at once
        self._running: dict[str, asyncio.Task[None]] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self.finished = 0  # rows this process's workers settled (tests, benchmarks)

    @property
    def busy(self) -> int:
        return len(self._running)

    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._loop(), name=self._name)

    async def stop(self) -> None:
        """Claim nothing more; let the work started finish for up to `drain` seconds (our
        leases stay renewed meanwhile), then cut what is left (its lease lapses)."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        running = list(self._running.values())
        if running and self._drain > 0:
            log.info(
                "%s: letting %d running finish (at most %g s; a second stop signal cuts them)",
                self._name,
                len(running),
                self._drain,
            )
            await self._wait_or_force(running)
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        self._running.clear()

    async def _wait_or_force(self, running: list[asyncio.Task[None]]) -> None:
        drained = asyncio.ensure_future(asyncio.wait(running))
        waits: set[asyncio.Future[Any]] = {drained}
        if self._force is not None:
            waits.add(asyncio.ensure_future(self._force.wait()))
        try:
            await asyncio.wait(waits, timeout=self._drain, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
            await asyncio.gather(*waits, return_exceptions=True)

    async def idle(self) -> None:
        """Wait until the work started so far is done (tests)."""
        await asyncio.gather(*self._running.values(), return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                started = await self.run_once()
            except Exception:  # the database is down, or a bug: try again shortly
                log.exception("%s: claiming work failed", self._name)
                started = 0
            if started:
                continue  # there may be more: look again at once
            try:
                async with asyncio.timeout(_IDLE_POLL):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def run_once(self) -> int:
        """Claim as many rows as there are free slots and start their work."""
        free = self._slots - len(self._running)
        if free <= 0 or (self._until is not None and self._until.is_set()):
            return 0
        service = self._service
        rows = await self._claim(
            owner=service.owner, seconds=service.settings.lease_seconds, limit=free
        )
        for row in rows:
            task = asyncio.create_task(self._one(row), name=f"{self._name}-{row.id}")
            self._running[row.id] = task
            task.add_done_callback(functools.partial(self._done, row.id))
        return len(rows)

    def _done(self, task_id: str, _: object) -> None:
        self._running.pop(task_id, None)
        self._wake.set()  # a slot is free: look for more

    async def _one(self, row: LedgerTask) -> None:
        try:
            written = await self._work(row)
        except Exception:
            log.exception("%s: task %s", self._name, row.id)
            self._service.metrics.job_errors.labels(self._name).inc()
            return
        if written is not None and written.finished:
            self.finished += 1


def copier(service: ImageService) -> LeasedWorkers:
    """Copies the images of `fetching` tasks into the image store."""
    return LeasedWorkers(
        service,
        name="image-copier",
        slots=service.settings.copy_concurrency,
        wake=service.wakeups.copy,
        claim=service.store.claim_fetching,
        work=service.complete,
    )


def runners(service: ImageService) -> list[LeasedWorkers]:
    """Senders of the queued jobs of each synchronous upstream (openai kind), each job at
    most once: `job_concurrency` of its upstream's at a time. Each wakes on its own event (a job
    queued there), and claims only its own upstream's."""
    made = []
    for route in service.router.routes:
        if route.kind != "openai" or route.client is None:
            continue
        made.append(
            LeasedWorkers(
                service,
                name=f"job-runner-{route.name}",
                slots=route.config.job_concurrency,
                wake=service.wakeups.jobs(route.name),
                claim=functools.partial(service.claim_jobs, route.name),
                work=service.run_job,
                # a generation already sent is made (and billed) upstream anyway: let it end
                drain=service.settings.job_drain_timeout,
                until=service.shutting_down,
                force=service.force_stop,
            )
        )
    return made


class Sweeper:
    def __init__(self, service: ImageService) -> None:
        self._service = service
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="image-sweeper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _loop(self) -> None:
        interval = self._service.settings.sweep_interval
        while True:
            try:
                await self.run_once()
            except Exception:
                log.exception("image sweep failed; trying again at the next interval")
            await asyncio.sleep(interval)

    async def run_once(self) -> int:
        """One sweep if this instance gets the sweep's lease; the images it deleted."""
        service, store = self._service, self._service.store
        settings = service.settings
        if not await store.claim_named(
            "sweep", owner=service.owner, seconds=max(60.0, settings.sweep_interval / 2)
        ):
            return 0
        service.metrics.image_sweeps.inc()
        if settings.image_retention_days > 0:
            cutoff = store.now() - settings.image_retention_days * 86400
            while await store.expire_images(stored_before=cutoff, limit=_SWEEP_BATCH):
                pass
        deleted = 0
        while keys := await store.purgeable_keys(limit=_SWEEP_BATCH):
            progress = 0
            for key in keys:
                try:
                    await service.images.delete(key)
                    await store.image_purged(key)
                except Exception:
                    log.exception("image sweep: cannot delete %s; left for the next sweep", key)
                    continue
                progress += 1
            deleted += progress
            if not progress:
                break
        service.metrics.images_expired.inc(deleted)
        removed = await self._remove_orphans()
        service.metrics.image_store_bytes.set(await store.stored_bytes())
        if deleted or removed:
            log.info(
                "image sweep: deleted %d expired images and %d objects of no task",
                deleted,
                removed,
            )
        return deleted

    async def _remove_orphans(self) -> int:
        """Objects of no task over `ORPHAN_GRACE` old: what a copy left when it was killed
        (or its ledger write failed) between storing the object and recording it."""
        service = self._service
        before = service.store.now() - ORPHAN_GRACE
        removed = 0
        for key in await orphans(service.store, service.images):
            try:
                if await remove_orphan(service.store, service.images, key, before=before):
                    removed += 1
            except Exception:
                log.exception("image sweep: cannot remove %s; left for the next sweep", key)
        service.metrics.image_orphans_removed.inc(removed)
        return removed
