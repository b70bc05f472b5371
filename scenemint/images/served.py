"""A task's image, from the upstream into our store (`complete`) and out of it (`image`).

`complete` is the copier's work on a `fetching` row it holds the lease of: one copy attempt
from the upstream that made the image (its origin, image hosts and key), settled by the
ledger. `image` describes a completed task's stored image for the web layer to serve: what
an image is never changes, so the description is kept; retention (and another instance's
sweep) turns it into 410. Tasks completed before the image store existed get their image
copied on their first request, once, whatever the number of requests and instances.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from ..errors import Gone, ImageMissing, NotFound, ScenemintError, UpstreamError
from ..ledger import Ledger
from ..models import is_task_id
from ..polling import TaskReader
from ..settlement import FetchFailed, State
from ..store import LedgerTask
from .base import ImageStore, digest_of
from .copier import ImageCopier

log = logging.getLogger("scenemint.images")

_STORED_IMAGES_KEPT = 50_000


@dataclass(frozen=True, slots=True)
class StoredImage:
    """A completed task's image in our store: what is needed to serve it."""

    task_id: str
    key: str
    content_type: str
    size: int
    stored_at: float  # seconds since the epoch (Last-Modified)
    store: ImageStore

    @property
    def etag(self) -> str:
        return f'"{digest_of(self.key)}"'  # strong: the SHA-256 of the bytes


class ServedImages:
    def __init__(
        self, ledger: Ledger, reader: TaskReader, copier: ImageCopier, images: ImageStore
    ) -> None:
        self._ledger = ledger
        self._reader = reader
        self._copier = copier
        self._images = images
        self._legacy_copies: dict[str, asyncio.Future[LedgerTask]] = {}
        # the stored image of a completed task never changes (only time expires it): kept
        self._stored: dict[str, StoredImage] = {}

    async def complete(self, row: LedgerTask) -> LedgerTask | None:
        """Copy the image of a `fetching` row we hold the lease of, and settle what it gave."""
        ledger = self._ledger
        async with ledger.lease(row):
            upstream = ledger.router.client(row.upstream)
            observation = await self._copier.copy(row.id, row.image_url, upstream)
        return await ledger.observe(row, observation)

    async def image(self, task_id: str) -> StoredImage:
        """The stored image of a completed task: NotFound while there is none, Gone once the
        retention rule deleted it. A task completed before the image store existed has its
        image copied on this first request."""
        cached = self._stored.get(task_id)
        if cached is not None:
            if self._past_retention(cached.stored_at):
                raise Gone()
            return cached
        if not is_task_id(task_id):
            raise NotFound("image_not_ready")
        task = await self._reader.get_task(task_id)  # it may have finished since the last poll
        if task.status != "completed":
            raise NotFound("image_not_ready")
        row = await self._ledger.store.get_task(task_id)
        if row is None or row.state != State.COMPLETED:
            raise NotFound("image_not_ready")
        if row.image_expired_at is not None or self._past_retention(row.image_stored_at):
            raise Gone()
        if row.image_key is None:
            row = await self._copy_legacy(row)
        assert row.image_key is not None and row.image_stored_at is not None
        stored = StoredImage(
            task_id=row.id,
            key=row.image_key,
            content_type=row.image_type or "application/octet-stream",
            size=int(row.image_bytes or 0),
            stored_at=row.image_stored_at,
            store=self._images,
        )
        if len(self._stored) >= _STORED_IMAGES_KEPT:
            self._stored.clear()  # ids are UUIDs: bounded in bytes by the count
        self._stored[task_id] = stored
        return stored

    async def image_missing(self, missing: ImageMissing) -> ScenemintError:
        """What to answer when the store lacks an image `image()` described: Gone once the
        retention sweep deleted it (another instance may have, under its own settings; the
        description kept here cannot know), else the store's error. The description is
        dropped either way: the next request reads the ledger again."""
        self._stored.pop(missing.task_id, None)
        row = await self._ledger.store.get_task(missing.task_id)
        if row is not None and (
            row.image_expired_at is not None or self._past_retention(row.image_stored_at)
        ):
            return Gone()
        return missing

    def _past_retention(self, stored_at: float | None) -> bool:
        """The retention rule (the sweep applies the same one, then deletes the object)."""
        days = self._ledger.settings.image_retention_days
        now = self._ledger.store.now()
        return bool(days and stored_at is not None and stored_at < now - days * 86400)

    async def _copy_legacy(self, row: LedgerTask) -> LedgerTask:
        """Copy the image of a task completed before the image store existed: once per
        task, whatever the number of requests (in this process: they share one copy; across
        instances: the lease decides, the others wait for its result)."""
        running = self._legacy_copies.get(row.id)
        if running is None:
            running = asyncio.ensure_future(self._copy_legacy_once(row))
            self._legacy_copies[row.id] = running
            running.add_done_callback(lambda _: self._legacy_copies.pop(row.id, None))
        return await asyncio.shield(running)

    async def _copy_legacy_once(self, row: LedgerTask) -> LedgerTask:
        ledger, store, settings = self._ledger, self._ledger.store, self._ledger.settings
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.image_deadline + settings.lease_seconds
        while True:
            claimed = await store.claim_legacy_copy(
                row, owner=ledger.owner, seconds=settings.lease_seconds
            )
            if claimed is not None:
                break
            # another instance is copying it: wait for its result (or for its lease to lapse)
            if loop.time() > deadline:
                raise UpstreamError(detail=f"the image of {row.id} is being copied elsewhere")
            await asyncio.sleep(0.2)
            fresh = await store.get_task(row.id)
            if fresh is None:
                raise NotFound("image_not_ready")
            if fresh.image_key is not None:
                return fresh
            row = fresh
        async with ledger.lease(claimed):
            upstream = ledger.router.client(claimed.upstream)
            observation = await self._copier.copy(claimed.id, claimed.image_url, upstream)
        if isinstance(observation, FetchFailed):
            await store.renew(claimed, owner=ledger.owner, seconds=0)  # release it
            raise UpstreamError(detail=f"image of {row.id}: {observation.detail}")
        written = await store.attach_image(claimed, observation.image, owner=ledger.owner)
        if written is None:
            fresh = await store.get_task(row.id)
            if fresh is None or fresh.image_key is None:
                raise UpstreamError(detail=f"lost the lease of {row.id} while copying its image")
            return fresh
        return written
