"""Getting a finished task's image into the image store: the bytes side of completion.

`copy` downloads an image URL (an `image/*` answer, capped in size and time), checks it is an
image we serve (Pillow, with its decompression-bomb limit) and stores it under the task's
key; `keep` stores the bytes a synchronous generation answered with, trying a full or
unreachable store again for a while (those bytes exist nowhere else). Both answer with what
they observed (`Stored`, `FetchFailed`, `Refused`): who may copy, and what a copy means for
the credit, is the service's (`ImageService.complete`), decided by `settlement.decide`.
"""

from __future__ import annotations

import asyncio
import logging

from ..config import Settings
from ..errors import ImageStoreUnavailable, UpstreamError
from ..metrics import Metrics
from ..settlement import ErrorCode, FetchFailed, ImageRecord, Refused, Stored
from ..upstream.chatgpt2api import Chatgpt2Api
from ..upstream.openai import OpenAIImages
from .base import ImageStore, key_for
from .verify import ImageInfo, NotAnImage, verify_image

log = logging.getLogger("scenemint.images")

Upstream = Chatgpt2Api | OpenAIImages

_KEEP_PAUSE = 0.5  # seconds before storing a sync answer's bytes again; doubled, up to:
_KEEP_PAUSE_MAX = 30.0


class ImageCopier:
    """Copies and keeps task images; one per service, sharing the upstream's session."""

    def __init__(self, *, settings: Settings, images: ImageStore, metrics: Metrics) -> None:
        self.settings = settings
        self.images = images
        self.metrics = metrics

    async def copy(
        self, task_id: str, url: str | None, upstream: Upstream | None
    ) -> Stored | FetchFailed:
        """One attempt at copying the image at `url`, within `SCENEMINT_IMAGE_DEADLINE`, from
        the upstream that made it (with that upstream's origin, image hosts and key)."""
        if not url:
            return FetchFailed("no image URL")
        if upstream is None:
            return FetchFailed("its upstream cannot be reached from here")
        try:
            data = await self._download(url, task_id, upstream)
            info = await asyncio.to_thread(verify_image, data)
        except UpstreamError as exc:
            self.metrics.image_copy_failures.labels("download").inc()
            log.warning("copy of the image of %s failed: %s", task_id, exc.detail)
            # an origin we may not fetch from will not become one by trying again
            return FetchFailed(exc.detail, final=exc.reason == "forbidden")
        except NotAnImage as exc:
            self.metrics.image_copy_failures.labels("not_image").inc()
            log.warning("the image of %s is not one we serve: %s", task_id, exc)
            return FetchFailed(f"not an image: {exc}")
        key = key_for(data, task_id)
        try:
            await self.images.put(key, data, content_type=info.content_type)
        except ImageStoreUnavailable as exc:
            self.metrics.image_copy_failures.labels("store").inc()
            return FetchFailed(exc.detail)
        self.metrics.image_copies.inc()
        log.info("stored the image of %s (%d bytes, %s)", task_id, len(data), info.content_type)
        return Stored(_record(key, data, info))

    async def keep(
        self, task_id: str, data: bytes, *, revised_prompt: str | None
    ) -> Stored | Refused:
        """Store the image a generation answered with; Refused (refunded) when it is not an
        image we serve, or the store took no write for `SCENEMINT_IMAGE_FETCH_DEADLINE`."""
        try:
            info = await asyncio.to_thread(verify_image, data)
        except NotAnImage as exc:
            log.warning("generation of %s answered no image we serve: %s", task_id, exc)
            return Refused(f"not an image: {exc}", code=ErrorCode.NO_IMAGE)
        key = key_for(data, task_id)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.settings.image_fetch_deadline
        pause = _KEEP_PAUSE
        while True:  # the bytes are only here: keep trying to store them for a while
            try:
                await self.images.put(key, data, content_type=info.content_type)
                break
            except ImageStoreUnavailable as exc:
                self.metrics.image_copy_failures.labels("store").inc()
                if loop.time() + pause > give_up:
                    return Refused(exc.detail, code=ErrorCode.IMAGE_UNAVAILABLE)
                await asyncio.sleep(pause)
                pause = min(pause * 2, _KEEP_PAUSE_MAX)
        self.metrics.image_copies.inc()
        return Stored(_record(key, data, info), revised_prompt)

    async def _download(self, url: str, task_id: str, upstream: Upstream) -> bytes:
        """The bytes of an image URL (an `image/*` answer), capped in size and time."""
        deadline = asyncio.get_running_loop().time() + self.settings.image_deadline
        limit = self.settings.max_image_bytes
        async with upstream.open_image(url, deadline=deadline) as response:
            declared = (response.content_type or "").split(";")[0].strip().lower()
            if not declared.startswith("image/"):
                raise UpstreamError(
                    detail=f"image of {task_id} is {declared or 'untyped'}", reason="not_image"
                )
            if response.content_length is not None and response.content_length > limit:
                raise UpstreamError(detail=f"image of {task_id} is {response.content_length} bytes")
            data = bytearray()
            async for chunk in response.chunks:
                data += chunk
                if len(data) > limit:
                    raise UpstreamError(detail=f"image of {task_id} exceeds {limit} bytes")
        return bytes(data)


def _record(key: str, data: bytes, info: ImageInfo) -> ImageRecord:
    return ImageRecord(
        key=key,
        content_type=info.content_type,
        size=len(data),
        width=info.width,
        height=info.height,
    )
