"""The image service: generate, get a task, open its image, enhance a prompt.

This is the library API; the web layer only binds HTTP to it. Money rules live here:
a credit is taken before submitting and given back, exactly once, when the generation
definitely failed. When the upstream's answer to a submission is unknown (timeout, reset),
the ledger row stays "submitting" and the reconciler settles it later.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

from .config import Settings
from .errors import (
    BadRequest,
    NotConfigured,
    NotFound,
    NotReady,
    ScenemintError,
    UpstreamError,
)
from .metrics import Metrics
from .models import (
    MISSING_TASK_ERROR,
    Task,
    UpstreamTask,
    image_path,
    is_task_id,
    missing_task,
    new_task_id,
    normalize_size,
    rfc3339_from_epoch,
)
from .poller import TaskPoller
from .prompts import DIRECTIONS, chat_request
from .store import LedgerTask, NewTask, Store
from .upstream import ImageResponse, UpstreamClient
from .validation import Reference, clean_fingerprint, clean_prompt

log = logging.getLogger("scenemint.service")

SUBMIT_FAILED = "submission to the image service failed"
NO_IMAGE = "the image service reported success without an image"
TIMED_OUT = "generation took too long and was abandoned"
_FINISHED_CACHE = 10_000
_READY_CACHE_SECONDS = 5.0
_UNFINISHED_TTL = 1.0


@dataclass(frozen=True, slots=True)
class ImageDownload:
    """An open image stream and the headers it should be served with."""

    content_type: str
    content_length: int | None
    etag: str
    chunks: AsyncIterator[bytes]
    aclose: Callable[[], Awaitable[None]]


class ImageService:
    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        upstream: UpstreamClient | None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.upstream = upstream
        self.metrics = metrics or Metrics()
        # set when the server begins a graceful shutdown: open streams end with a last frame
        self.shutting_down = asyncio.Event()
        self.poller = (
            TaskPoller(
                upstream.list_tasks,
                batch_size=settings.poll_batch_size,
                min_interval=settings.poll_min_interval,
            )
            if upstream is not None
            else None
        )
        # finished ledger rows never change again: keep the recent ones in memory
        self._finished: OrderedDict[str, LedgerTask] = OrderedDict()
        self._unfinished: dict[str, tuple[float, LedgerTask]] = {}
        self._references = settings.data_dir / "references"
        self._ready_at = -_READY_CACHE_SECONDS

    # -- generate --------------------------------------------------------------------

    async def generate(
        self,
        *,
        prompt: object,
        size: object,
        fingerprint: object,
        reference: Reference | None = None,
    ) -> Task:
        """Validate, charge one credit, submit. Raises before charging on bad input."""
        clean = clean_prompt(prompt, max_chars=self.settings.max_prompt_chars)
        size_ = normalize_size(size)
        owner = clean_fingerprint(fingerprint)
        upstream = self._require_upstream()
        upstream.breaker.check()  # fail fast before taking a credit
        task_id = new_task_id()
        mode = "image" if reference is not None else "text"
        ref_path = await self._save_reference(task_id, reference) if reference else None
        try:
            charge = await self.store.spend(
                NewTask(
                    id=task_id,
                    fingerprint=owner,
                    mode=mode,
                    prompt=clean,
                    size=size_,
                    reference_path=str(ref_path) if ref_path else None,
                    reference_name=reference.filename if reference else None,
                    reference_type=reference.content_type if reference else None,
                )
            )
        except BaseException:
            await self._drop_reference(ref_path)
            raise
        self.metrics.credits_charged.inc()
        log.info("charged %s for task %s (%s)", _short(owner), task_id, mode)
        balance = charge.balance
        try:
            found = await self._submit(
                upstream, task_id=task_id, prompt=clean, size=size_, reference=reference
            )
        except UpstreamError as exc:
            if exc.ambiguous:
                # it may exist upstream: keep the charge, let the reconciler find out
                log.warning(
                    "submission of %s has an unknown outcome; reconciler will settle it", task_id
                )
                row = await self.store.get_task(task_id)
                assert row is not None
                return self._public(row, prompt=clean, remaining=balance)
            await self._fail(task_id, owner, SUBMIT_FAILED, ref_path, outcome="submit_failed")
            raise
        row = await self.settle(task_id, found)
        if row.refunded:
            balance += 1
        return self._public(row, found, prompt=clean, remaining=balance)

    async def _submit(
        self,
        upstream: UpstreamClient,
        *,
        task_id: str,
        prompt: str,
        size: str,
        reference: Reference | None,
    ) -> UpstreamTask:
        if reference is None:
            return await upstream.submit_generation(task_id=task_id, prompt=prompt, size=size)
        return await upstream.submit_edit(
            task_id=task_id,
            prompt=prompt,
            size=size,
            image=reference.data,
            filename=reference.filename,
            content_type=reference.content_type,
        )

    async def resubmit(self, row: LedgerTask) -> UpstreamTask:
        """Submit a "submitting" row again (idempotent upstream by client_task_id)."""
        upstream = self._require_upstream()
        reference = None
        if row.mode == "image":
            data = await asyncio.to_thread(_read_file, row.reference_path)
            if data is None:
                raise FileNotFoundError(f"reference of task {row.id} is gone")
            reference = Reference(
                data=data,
                filename=row.reference_name or "reference.png",
                content_type=row.reference_type or "application/octet-stream",
            )
        return await self._submit(
            upstream, task_id=row.id, prompt=row.prompt, size=row.size, reference=reference
        )

    # -- tasks --------------------------------------------------------------------------

    async def get_task(self, task_id: str) -> Task:
        """The task, freshly mapped; the "missing" shape for ids that are not ours."""
        if not is_task_id(task_id):
            return missing_task(task_id)
        row = await self._ledger(task_id)
        if row is None:
            return missing_task(task_id)
        if row.finished:
            return self._public(row)
        if self.poller is None:
            raise NotConfigured(detail="upstream not configured")
        found = await self.poller.fetch(task_id)
        row = await self.settle(task_id, found, known=row)
        return self._public(row, found)

    async def settle(
        self, task_id: str, found: UpstreamTask | None, *, known: LedgerTask | None = None
    ) -> LedgerTask:
        """Bring the ledger row in line with what the upstream said; refunds failures once."""
        row = known or await self.store.get_task(task_id)
        if row is None:
            raise NotFound(detail=f"task {task_id} not in the ledger")
        if row.finished:
            return row
        now = time.time()
        error: str | None = None
        if found is None:
            young = now - row.created_at < self.settings.resubmit_window
            if row.state == "submitting" and young:
                return row  # not arrived yet, or lost in flight: the reconciler resubmits
            error = MISSING_TASK_ERROR
        elif found.status == "failed":
            error = found.error or "generation failed"
        elif found.status == "completed" and not found.image_url:
            error = NO_IMAGE
        elif found.status != "completed" and now - row.created_at > self.settings.task_max_age:
            error = TIMED_OUT
        if error is not None:
            await self._fail(task_id, row.fingerprint, error, row.reference_path)
            return await self._ledger_after_change(task_id)
        if found is not None and (found.status != row.state or row.upstream_created_at is None):
            await self.store.update_task(
                task_id,
                state=found.status,
                image_url=found.image_url,
                revised_prompt=found.revised_prompt,
                upstream_created_at=found.created_at,
                upstream_updated_at=found.updated_at,
            )
            fresh = await self._ledger_after_change(task_id)
            if fresh.finished:
                if fresh.state == "completed":
                    self.metrics.tasks.labels("completed").inc()
                await self._drop_reference(row.reference_path)
            return fresh
        return row

    async def abandon(self, row: LedgerTask, *, error: str) -> bool:
        """Fail an unfinished task for good and refund it (once); True if this call refunded."""
        refunded = await self._fail(row.id, row.fingerprint, error, row.reference_path)
        await self._ledger_after_change(row.id)
        return refunded

    async def _fail(
        self,
        task_id: str,
        fingerprint: str,
        error: str,
        reference_path: str | Path | None,
        *,
        outcome: str = "failed",
    ) -> bool:
        """The one way a task fails: mark it, refund it exactly once, drop its reference."""
        refunded = await self.store.fail_task(task_id, error=error)
        if refunded:
            self.metrics.credits_refunded.inc()
            self.metrics.tasks.labels(outcome).inc()
            log.info("refunded %s for task %s: %s", _short(fingerprint), task_id, error)
        await self._drop_reference(reference_path)
        return refunded

    async def _ledger_after_change(self, task_id: str) -> LedgerTask:
        fresh = await self.store.get_task(task_id)
        assert fresh is not None
        self._remember(fresh)
        if fresh.finished and self.poller is not None:
            self.poller.forget(task_id)
        return fresh

    async def _ledger(self, task_id: str) -> LedgerTask | None:
        """The ledger row, from memory when possible: polls must not all reach the database."""
        cached = self._finished.get(task_id)
        if cached is not None:
            return cached
        recent = self._unfinished.get(task_id)
        if recent is not None and recent[0] > time.monotonic():
            return recent[1]
        row = await self.store.get_task(task_id)
        self._remember(row)
        return row

    def _remember(self, row: LedgerTask | None) -> None:
        # Finished rows never change again. Unfinished ones may be settled by another
        # instance, so they are kept only briefly; the upstream's answer is checked anyway.
        if row is None:
            return
        if row.finished:
            self._unfinished.pop(row.id, None)
            self._finished[row.id] = row
            if len(self._finished) > _FINISHED_CACHE:
                self._finished.popitem(last=False)
            return
        now = time.monotonic()
        if len(self._unfinished) > _FINISHED_CACHE:
            self._unfinished = {k: v for k, v in self._unfinished.items() if v[0] > now}
        self._unfinished[row.id] = (now + _UNFINISHED_TTL, row)

    def _public(
        self,
        row: LedgerTask,
        found: UpstreamTask | None = None,
        *,
        prompt: str | None = None,
        remaining: int | None = None,
    ) -> Task:
        status = "queued" if row.state == "submitting" else row.state
        created = (found.created_at if found else None) or row.upstream_created_at
        updated = (found.updated_at if found else None) or row.upstream_updated_at
        return Task(
            id=row.id,
            mode=row.mode,
            status=status,
            size=row.size,
            image=image_path(row.id) if status == "completed" else None,
            error=row.error if status == "failed" else None,
            revised_prompt=row.revised_prompt or (found.revised_prompt if found else None),
            created_at=created or rfc3339_from_epoch(row.created_at),
            updated_at=updated or rfc3339_from_epoch(row.updated_at),
            prompt=prompt,
            remaining_credits=remaining,
        )

    # -- images -------------------------------------------------------------------------

    async def image_available(self, task_id: str) -> bool:
        """True when the id is ours and its image finished (what a 304 may confirm)."""
        if not is_task_id(task_id):
            return False
        row = await self._ledger(task_id)
        return row is not None and row.state == "completed" and bool(row.image_url)

    async def open_image(self, task_id: str) -> ImageDownload:
        """Open the first image of a completed task upstream; NotFound when there is none.

        The caller iterates `chunks` and must `aclose()` the download on every path.
        """
        if not is_task_id(task_id):
            raise NotFound("image_not_ready")
        row = await self._ledger(task_id)
        if row is not None and not row.finished:
            await self.get_task(task_id)  # it may have completed since the last poll
            row = await self._ledger(task_id)
        if row is None or row.state != "completed" or not row.image_url:
            raise NotFound("image_not_ready")
        if not row.image_url.startswith(("http://", "https://")):
            raise NotFound("image_not_ready", detail="image URL is not absolute http(s)")
        upstream = self._require_upstream()
        stack = AsyncExitStack()
        try:
            response = await stack.enter_async_context(upstream.open_image(row.image_url))
        except BaseException:
            await stack.aclose()
            raise
        limit = self.settings.max_image_bytes
        if response.content_length is not None and response.content_length > limit:
            # known before answering: a clear 502, not a 200 that is cut off after its headers
            await stack.aclose()
            raise UpstreamError(detail=f"image of {task_id} is {response.content_length} bytes")
        return ImageDownload(
            content_type=_safe_image_type(response.content_type),
            content_length=response.content_length,
            etag=f'"{task_id}"',
            chunks=self._capped(response, task_id),
            aclose=stack.aclose,
        )

    async def _capped(self, response: ImageResponse, task_id: str) -> AsyncIterator[bytes]:
        limit, sent = self.settings.max_image_bytes, 0
        async for chunk in response.chunks:
            sent += len(chunk)
            if sent > limit:
                raise UpstreamError(detail=f"image of {task_id} exceeds {limit} bytes")
            yield chunk

    # -- prompt enhancement --------------------------------------------------------------

    async def enhance(self, *, prompt: object, direction: object) -> EnhancementStream:
        """Open the upstream chat stream; errors raise here, before anything is streamed."""
        clean = clean_prompt(prompt, max_chars=self.settings.max_prompt_chars)
        if not isinstance(direction, str) or direction.strip() not in DIRECTIONS:
            raise BadRequest("invalid_direction")
        upstream = self._require_upstream()
        if not self.settings.prompt_model.strip():
            raise NotConfigured(detail="CHATGPT2API_PROMPT_MODEL is empty")
        body = chat_request(
            model=self.settings.prompt_model.strip(), prompt=clean, direction=direction.strip()
        )
        stack = AsyncExitStack()
        try:
            lines = await stack.enter_async_context(upstream.open_chat_stream(body))
        except BaseException:
            await stack.aclose()
            raise
        return EnhancementStream(
            stack,
            lines,
            ping_interval=self.settings.stream_ping_interval,
            shutting_down=self.shutting_down,
        )

    # -- operations ---------------------------------------------------------------------------

    async def ready(self) -> None:
        """Raise NotReady (503) unless the database answers and the upstream accepts our key.

        A success is cached for 5 s, a failure is not. Why it failed goes to the log.
        """
        try:
            await self.store.ping()
        except Exception as exc:
            log.error("not ready: database not reachable: %s", type(exc).__name__)
            raise NotReady(detail="database not reachable") from exc
        now = time.monotonic()
        if now - self._ready_at < _READY_CACHE_SECONDS:
            return
        try:
            await self._require_upstream().check()
        except ScenemintError as exc:
            log.error("not ready: upstream: %s", exc.code)
            raise NotReady(detail=f"upstream: {exc.code}") from exc
        self._ready_at = now

    # -- helpers -----------------------------------------------------------------------------

    def _require_upstream(self) -> UpstreamClient:
        if self.upstream is None:
            log.error("upstream not configured: set CHATGPT2API_BASE_URL and CHATGPT2API_API_KEY")
            raise NotConfigured()
        return self.upstream

    async def _save_reference(self, task_id: str, reference: Reference) -> Path:
        # kept on disk until the task is settled, so that a crash can be followed by a resubmit
        path = self._references / f"{task_id}.bin"
        await asyncio.to_thread(_write_file, path, reference.data)
        return path

    async def _drop_reference(self, path: str | Path | None) -> None:
        if path:
            await asyncio.to_thread(Path(path).unlink, missing_ok=True)


_DONE = b"data: [DONE]\n\n"
_END = object()
_SHUTDOWN = object()


class EnhancementStream:
    """The SSE frames of one enhancement. Iterate once; `aclose()` closes the upstream request.

    A reader task moves upstream lines into a queue so that, while the upstream is silent,
    the stream can send `: ping` comments without cancelling a half-read line.
    """

    def __init__(
        self,
        stack: AsyncExitStack,
        lines: AsyncIterator[bytes],
        *,
        ping_interval: float,
        shutting_down: asyncio.Event | None = None,
    ) -> None:
        self._stack = stack
        self._lines = lines
        self._ping_interval = ping_interval
        self._shutting_down = shutting_down or asyncio.Event()
        self._closed = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._frames()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._stack.aclose()

    async def _pump(self, queue: asyncio.Queue[object]) -> None:
        try:
            async for line in self._lines:
                await queue.put(line)
            await queue.put(_END)
        except UpstreamError as exc:
            await queue.put(exc)

    async def _frames(self) -> AsyncIterator[bytes]:
        queue: asyncio.Queue[object] = asyncio.Queue(maxsize=256)
        reader = asyncio.create_task(self._pump(queue))
        stopper = asyncio.create_task(self._stop_on_shutdown(queue))
        try:
            while True:
                try:
                    async with asyncio.timeout(self._ping_interval):
                        item = await queue.get()
                except TimeoutError:
                    yield b": ping\n\n"
                    continue
                if item is _SHUTDOWN:
                    yield _error_frame("The server is restarting. Please try again.")
                    yield _DONE
                    return
                if item is _END:
                    yield _DONE  # the upstream ended without [DONE]: end the stream properly
                    return
                if isinstance(item, UpstreamError):
                    yield _error_frame("The prompt enhancement stream was interrupted.")
                    yield _DONE
                    return
                assert isinstance(item, bytes)
                line = item.rstrip(b"\r\n")
                if not line.startswith(b"data:"):
                    continue  # comments, event names, blank separators: we write our own
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    yield _DONE
                    return
                if not _is_chunk(payload):
                    # garbage or an error object: end with our own frame, never forward it
                    log.warning("enhancement stream: unexpected frame of %d bytes", len(payload))
                    yield _error_frame("The prompt enhancement stream was interrupted.")
                    yield _DONE
                    return
                yield b"data: " + payload + b"\n\n"
        finally:
            reader.cancel()
            stopper.cancel()
            await asyncio.gather(reader, stopper, return_exceptions=True)
            await self.aclose()

    async def _stop_on_shutdown(self, queue: asyncio.Queue[object]) -> None:
        await self._shutting_down.wait()
        # jump the queue: a client should not wait for the rest of a stream we will cut
        while not queue.empty():
            queue.get_nowait()
        await queue.put(_SHUTDOWN)


def _is_chunk(payload: bytes) -> bool:
    """A JSON object shaped like a chat.completion.chunk (it has a `choices` list)."""
    try:
        frame = json.loads(payload)
    except ValueError:
        return False
    return isinstance(frame, dict) and isinstance(frame.get("choices"), list)


def _error_frame(message: str) -> bytes:
    return b"data: " + json.dumps({"error": {"message": message}}).encode() + b"\n\n"


def _safe_image_type(content_type: str | None) -> str:
    # never let an upstream make us serve HTML or script from our origin
    value = (content_type or "").split(";")[0].strip().lower()
    if value.startswith("image/") and value != "image/svg+xml":
        return value
    return "application/octet-stream"


def _short(fingerprint: str) -> str:
    return fingerprint[:6] + "…"


def _write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _read_file(path: str | None) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        return None
