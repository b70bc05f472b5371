"""The service at work: what it needs opened, its background work started, and all of it
closed again in order. The app's lifespan runs this; so can a program that uses the service
as a library, without the web layer:

    async with open_service(Settings()) as work:
        task = await work.service.generate(prompt=..., size="16:9", fingerprint=...)
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any

from .config import Settings
from .images import open_image_store
from .jobs import LeasedWorkers, Sweeper, copier, runners
from .metrics import Metrics
from .reconciler import Reconciler
from .service import ImageService, open_router
from .store import open_store

__all__ = ["Running", "open_service", "stop_signals"]

log = logging.getLogger("scenemint")


@dataclass(frozen=True)
class Running:
    """The service and the background work that pushes its tasks forward."""

    service: ImageService
    reconciler: Reconciler  # unfinished tasks nobody holds: asked, resubmitted, refunded
    copier: LeasedWorkers  # finished tasks' images into the image store
    runners: list[LeasedWorkers]  # the jobs of each synchronous (`openai` kind) upstream
    sweeper: Sweeper  # the retention rule


@asynccontextmanager
async def open_service(
    settings: Settings, *, metrics: Metrics | None = None, signals: bool = False
) -> AsyncIterator[Running]:
    """Open the store, the upstreams and the image store, start the background work; on the
    way out, stop taking work, let what was sent finish (`SCENEMINT_JOB_DRAIN_TIMEOUT`), and
    close everything in the reverse order. With `signals`, SIGTERM and SIGINT begin that
    shutdown (see `stop_signals`)."""
    async with AsyncExitStack() as stack:
        if metrics is None:
            metrics = Metrics()
            stack.callback(metrics.close)
        store = await open_store(settings)
        stack.push_async_callback(store.close)
        router = await open_router(settings, store, metrics)
        stack.push_async_callback(router.close)
        if not router:
            log.warning(
                "no upstream is configured (SCENEMINT_UPSTREAMS_FILE, or CHATGPT2API_BASE_URL"
                " and CHATGPT2API_API_KEY): image and enhancement requests will answer 503"
            )
        images = open_image_store(
            settings.image_store, data_dir=settings.data_dir, timeout=settings.image_deadline
        )
        stack.push_async_callback(images.close)
        service = ImageService(
            settings=settings, store=store, router=router, metrics=metrics, images=images
        )
        if signals:
            stack.enter_context(stop_signals(service))
        await service.events.start()
        stack.push_async_callback(service.events.stop)
        work = Running(
            service=service,
            reconciler=Reconciler(service),
            copier=copier(service),
            # jobs run where an OpenAI Images upstream can send them, each upstream's its own
            runners=runners(service),
            sweeper=Sweeper(service),
        )
        workers: list[Reconciler | LeasedWorkers | Sweeper] = [
            work.reconciler,
            work.copier,
            *work.runners,
            work.sweeper,
        ]
        for worker in workers:
            worker.start()
            stack.push_async_callback(worker.stop)
        # the first thing the shutdown does (also without a signal: tests, embedders)
        stack.callback(service.shutting_down.set)
        yield work


@contextmanager
def stop_signals(service: ImageService) -> Iterator[None]:
    """SIGTERM or SIGINT: the first tells open streams to finish with a last frame and the
    job runners to claim nothing more (`service.shutting_down`), then lets uvicorn go on;
    a second one cuts what is still finishing (`service.force_stop`).

    uvicorn stops accepting and waits for in-flight requests (bounded by its graceful
    timeout) before the lifespan ends: without this, an open enhancement stream would be
    cut without a word after that timeout. The handlers chain to uvicorn's own.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers live in the main thread only (tests run servers in threads)
        return
    loop = asyncio.get_running_loop()
    previous: dict[int, Any] = {
        signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)
    }
    received = 0

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal received
        received += 1
        event = service.shutting_down if received == 1 else service.force_stop
        loop.call_soon_threadsafe(event.set)
        handler = previous[signum]
        if callable(handler):
            handler(signum, frame)

    for signum in previous:
        signal.signal(signum, on_signal)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
