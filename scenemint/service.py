"""The image service: the library API, and the pieces it is made of.

The web layer only binds HTTP to this. Each piece has one job a reader can name:

    ledger.Ledger             applies settlement decisions to rows (conditional writes, leases)
    generation.Generation     validate, charge, pick an upstream, submit, hand the answer over
    generation.Submitter      the sending to asynchronous upstreams, and moving on between them
    polling.TaskReader        a poll's answer: the one cache, or the row and its upstream now
    events.TaskEvents         watchers of a task: its answer pushed when it changes
    sync_jobs.SyncJobs        the jobs of synchronous upstreams, sent at most once
    images.served.ServedImages  a task's image into our store and out of it
    readiness.Readiness       /readyz
    enhancement.open_enhancement  prompt enhancement from the first upstream that serves it
    upstream.router.Router    the upstreams: which takes a new task, and the one rule of moves

Where a task goes next and whether its credit comes back is `settlement.decide`'s alone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket

from .answers import TaskAnswers
from .config import Settings
from .enhancement import EnhancementStream, open_enhancement
from .errors import ImageMissing, ScenemintError
from .events import TaskEvents
from .generation import Delivery, Generation, Submitter, load_reference
from .images import ImageStore, open_image_store
from .images.copier import ImageCopier
from .images.served import ServedImages, StoredImage
from .ledger import Ledger, Wakeups
from .metrics import Metrics
from .models import Task
from .polling import TaskReader
from .readiness import Readiness
from .references import References
from .settlement import Limits, ReferenceGone, Unknown
from .store import LedgerTask, Store
from .sync_jobs import SyncJobs
from .upstream.config import DEFAULT, UpstreamConfig, load_upstreams
from .upstream.router import Router, remembered
from .validation import Reference

__all__ = ["Delivery", "ImageService", "StoredImage", "open_router"]

log = logging.getLogger("scenemint.service")


async def open_router(settings: Settings, store: Store, metrics: Metrics) -> Router:
    """The configured upstreams (raises `UpstreamsError`), remembered in the database; and
    those no longer configured that still hold unfinished tasks, drained, from what the
    database remembers of them (rows made before there were several belong to `default`:
    today's variables, if set, describe it)."""
    configs = load_upstreams(settings)
    await store.remember_upstreams(
        {config.name: json.dumps(config.described()) for config in configs}
    )
    in_flight = await store.upstream_counts(since=store.now())
    configured = {config.name for config in configs}
    holding = {
        name for name, counts in in_flight.items() if counts.in_flight and name not in configured
    }
    known: dict[str, UpstreamConfig] = {}
    if holding:
        known = remembered(await store.remembered_upstreams(), dict(os.environ))
        if DEFAULT in holding and DEFAULT not in known and settings.upstream_configured:
            known[DEFAULT] = load_upstreams(settings.model_copy(update={"upstreams_file": None}))[0]
        for name in sorted(holding - set(known)):
            log.error(
                "upstream %s holds %d unfinished tasks but is neither configured nor"
                " remembered: they are settled by the age rule",
                name,
                in_flight[name].in_flight,
            )
        for name in sorted(holding & set(known)):
            log.warning(
                "upstream %s is no longer configured: its %d unfinished tasks are still"
                " followed there (drained: it gets no new task)",
                name,
                in_flight[name].in_flight,
            )
    return Router.open(
        configs,
        settings=settings,
        metrics=metrics,
        remembered={name: config for name, config in known.items() if name in holding},
    )


class ImageService:
    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        router: Router,
        metrics: Metrics | None = None,
        owner: str | None = None,
        images: ImageStore | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.router = router
        self.metrics = metrics or Metrics()
        # who this process is when it holds a lease (unique per process and start)
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.images = images or open_image_store(
            settings.image_store, data_dir=settings.data_dir, timeout=settings.image_deadline
        )
        # set when the server begins a graceful shutdown: open streams end with a last
        # frame, generate requests in flight answer with their task at once
        self.shutting_down = asyncio.Event()
        # set on a second stop signal: work still finishing is cut at once
        self.force_stop = asyncio.Event()
        self.wakeups = Wakeups()
        self.answers = TaskAnswers(fresh_for=settings.poll_min_interval)
        self.references = References(settings.data_dir / "references")
        self.ledger = Ledger(
            settings=settings,
            store=store,
            router=router,
            metrics=self.metrics,
            answers=self.answers,
            references=self.references,
            owner=self.owner,
            wakeups=self.wakeups,
        )
        self.reader = TaskReader(self.ledger, self.answers)
        self.events = TaskEvents(self.reader, self.answers, store)
        self.ledger.on_change = lambda row: self.events.changed(row.id)
        self.submitter = Submitter(self.ledger, shutting_down=self.shutting_down)
        self.generation = Generation(self.ledger, self.reader, self.submitter)
        self.copier = ImageCopier(settings=settings, images=self.images, metrics=self.metrics)
        self.served = ServedImages(self.ledger, self.reader, self.copier, self.images)
        self.jobs = SyncJobs(self.ledger, self.copier, shutting_down=self.shutting_down)
        self.readiness = Readiness(self.ledger, self.images)

    @property
    def limits(self) -> Limits:
        return self.ledger.limits

    # -- generate --------------------------------------------------------------------

    async def generate(
        self,
        *,
        prompt: object,
        size: object,
        fingerprint: object,
        reference: Reference | None = None,
        idempotency_key: object = None,
    ) -> Task:
        """Validate, charge one credit, submit; raises before charging on bad input.

        With an `idempotency_key`, a repeated request (same fingerprint, key and body) gets
        the task of the first one and is not charged again. The task returned is the
        caller's (delivered); a server that sends it on uses `generate_answer` instead.
        """
        delivery = await self.generate_answer(
            prompt=prompt,
            size=size,
            fingerprint=fingerprint,
            reference=reference,
            idempotency_key=idempotency_key,
        )
        await delivery.delivered()
        return delivery.task

    async def generate_answer(
        self,
        *,
        prompt: object,
        size: object,
        fingerprint: object,
        reference: Reference | None = None,
        idempotency_key: object = None,
    ) -> Delivery:
        """`generate`, with the task not yet delivered (see `generation.Generation`)."""
        return await self.generation.generate_answer(
            prompt=prompt,
            size=size,
            fingerprint=fingerprint,
            reference=reference,
            idempotency_key=idempotency_key,
        )

    async def resubmit(self, row: LedgerTask) -> LedgerTask | None:
        """Send a claimed row again (the reconciler's): same id, so the upstream keeps one
        task; a refusal of the upstream's moves it on, or keeps it for the next round."""
        reference = await load_reference(self.ledger, row)
        if row.mode == "image" and reference is None:
            return await self.ledger.observe(row, ReferenceGone())
        async with self.ledger.lease(row):
            sent = await self.submitter.send(
                row, reference=reference, keep_lease=False, until_shutdown=False, fresh=False
            )
        if sent.row is None and isinstance(sent.observation, Unknown):
            return None
        return sent.row

    # -- tasks ----------------------------------------------------------------------------

    async def get_task(self, task_id: str) -> Task:
        """The task, freshly mapped; the "missing" shape for ids that are not ours."""
        return await self.reader.get_task(task_id)

    async def task_answer(self, task_id: str, *, chinese: bool = False) -> bytes:
        """The encoded `data` of a task answer (what the poll sends)."""
        return await self.reader.task_answer(task_id, chinese=chinese)

    # -- images ---------------------------------------------------------------------------

    async def image(self, task_id: str) -> StoredImage:
        return await self.served.image(task_id)

    async def image_missing(self, missing: ImageMissing) -> ScenemintError:
        return await self.served.image_missing(missing)

    async def complete(self, row: LedgerTask) -> LedgerTask | None:
        return await self.served.complete(row)

    # -- jobs of synchronous upstreams ------------------------------------------------------

    async def run_job(self, row: LedgerTask) -> LedgerTask | None:
        return await self.jobs.run(row)

    async def claim_jobs(
        self, upstream: str, *, owner: str, seconds: float, limit: int
    ) -> list[LedgerTask]:
        return await self.jobs.claim(upstream, owner=owner, seconds=seconds, limit=limit)

    # -- prompt enhancement -------------------------------------------------------------------

    async def enhance(
        self, *, prompt: object, direction: object, chinese: bool = False
    ) -> EnhancementStream:
        """Open the chat stream; errors raise here, before anything is streamed."""
        return await open_enhancement(
            self.router,
            self.settings,
            prompt=prompt,
            direction=direction,
            chinese=chinese,
            shutting_down=self.shutting_down,
        )

    # -- operations -----------------------------------------------------------------------------

    async def ready(self) -> dict[str, object]:
        return await self.readiness.ready()

    async def drop_reference(self, task_id: str, path: str) -> bool:
        return await self.ledger.drop_reference(task_id, path)
