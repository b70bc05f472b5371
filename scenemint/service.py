"""The image service: generate, get a task, serve its image, enhance a prompt.

This is the library API; the web layer only binds HTTP to it. It validates, charges and
hands work on; where a task goes next and whether its credit comes back is decided by
`settlement.decide` and written by the store, conditional on the row's version and lease.

A generate request owns its row through a lease. With chatgpt2api it submits and writes the
outcome (the task as the upstream accepted it, a refusal refunded at once, or "unknown":
the charge is kept and the reconciler asks the upstream straight away); with the openai
kind the row is a queued job for the runners. Either way the lease is kept until the answer
has been sent (`Delivery`): only then is the task the client's. A row whose answer never
left is refunded by whoever settles it, unless the client comes back with its
Idempotency-Key first.

Finished images are copied into the image store before a task is reported completed
(`complete`, run by the copier in `jobs.py`; the bytes side is `images/copier.py`); sync
jobs are sent by the runner (`run_job`). Both hold the row's lease while they work.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass, replace
from typing import TypeVar

from . import deadline
from .answers import Answer, TaskAnswers
from .config import Settings
from .enhancement import EnhancementStream
from .errors import (
    BadRequest,
    Conflict,
    Gone,
    ImageMissing,
    ImageStoreUnavailable,
    NotConfigured,
    NotFound,
    NotReady,
    ScenemintError,
    StoreUnavailable,
    UpstreamError,
)
from .images import ImageStore, digest_of, open_image_store
from .images.copier import ImageCopier
from .metrics import Metrics
from .models import (
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
from .references import References
from .settlement import (
    FINISHED,
    Accepted,
    Decision,
    Delivered,
    ErrorCode,
    FetchFailed,
    Generated,
    Guard,
    Limits,
    Missing,
    Observation,
    ReferenceGone,
    Refused,
    Seen,
    Sending,
    State,
    Unknown,
    decide,
)
from .store import KeyInUse, LedgerTask, NewTask, Store
from .upstream import (
    Chatgpt2Api,
    GeneratedImage,
    OpenAIImages,
    Refusal,
    Upstream,
    nothing_generated,
)
from .validation import (
    Reference,
    clean_fingerprint,
    clean_idempotency_key,
    clean_prompt,
)

log = logging.getLogger("scenemint.service")

T = TypeVar("T")

_READY_CACHE_SECONDS = 5.0
_STORED_IMAGES_KEPT = 50_000
_BACKOFF = 0.2  # seconds before the first resubmission attempt; doubled each time, jittered
_WRITE_ATTEMPTS = 3  # a settlement write that meets a database error is tried this often
# a generate answers within SCENEMINT_SUBMIT_TIMEOUT plus this, the database's waits included
REQUEST_MARGIN = 5.0
# of that, what the submission leaves for writing its outcome (and the charge before it)
OUTCOME_RESERVE = 2.0


class _Interrupted(Exception):
    pass


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


class Delivery:
    """A generate answer on its way to its client.

    Until `delivered()` the row is leased to the request that charged it and not yet the
    client's: a crash before that refunds the task (the client may not have its id).
    `delivered()` after the answer was sent, `undelivered()` when it could not be.
    """

    def __init__(self, service: ImageService, task: Task, row: LedgerTask | None) -> None:
        self.task = task
        self._service = service
        self._row = row  # None: nothing is owed (a replay of a task already delivered)

    async def delivered(self) -> None:
        if self._row is not None:
            row, self._row = self._row, None
            await self._service.deliver(row, delivered=True)

    async def undelivered(self) -> None:
        if self._row is not None:
            row, self._row = self._row, None
            await self._service.deliver(row, delivered=False)


@dataclass(frozen=True, slots=True)
class SubmitResult:
    observation: Observation
    error: UpstreamError | None = None  # the last failure, when the outcome is not Accepted


class ImageService:
    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        upstream: Upstream | None,
        metrics: Metrics | None = None,
        owner: str | None = None,
        images: ImageStore | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.upstream = upstream
        self.metrics = metrics or Metrics()
        # who this process is when it holds a lease (unique per process and start)
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.limits = Limits(
            resubmit_window=settings.resubmit_window,
            task_max_age=settings.task_max_age,
            fetch_deadline=settings.image_fetch_deadline,
            handoff_grace=settings.handoff_grace,
        )
        self.images = images or open_image_store(
            settings.image_store, data_dir=settings.data_dir, timeout=settings.image_deadline
        )
        # set when the server begins a graceful shutdown: open streams end with a last
        # frame, generate requests in flight answer with their task at once
        self.shutting_down = asyncio.Event()
        # set on a second stop signal: work still finishing is cut at once
        self.force_stop = asyncio.Event()
        # set when a row needs the reconciler now (a submission's outcome became unknown)
        self.needs_reconcile = asyncio.Event()
        # set when a task's image is waiting to be copied (the upstream finished it)
        self.needs_copy = asyncio.Event()
        # the bytes side of completion: downloads, checks and stores images
        self.copier = (
            None
            if upstream is None
            else ImageCopier(
                settings=settings, images=self.images, metrics=self.metrics, upstream=upstream
            )
        )
        self._legacy_copies: dict[str, asyncio.Future[LedgerTask]] = {}
        # the stored image of a completed task never changes (only time expires it): kept
        self._stored_images: dict[str, StoredImage] = {}
        self.answers = TaskAnswers(fresh_for=settings.poll_min_interval)
        self.references = References(settings.data_dir / "references")
        # set when a sync job is waiting for a runner (openai kind)
        self.needs_jobs = asyncio.Event()
        self.poller = (
            TaskPoller(upstream.list_tasks, batch_size=settings.poll_batch_size)
            if isinstance(upstream, Chatgpt2Api)
            else None
        )
        self._computing: dict[str, asyncio.Future[Answer]] = {}
        self._ready_at = -_READY_CACHE_SECONDS
        self._chat_checked_at = -_READY_CACHE_SECONDS
        self._chat = "unknown"

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
        """`generate`, with the task not yet delivered: the row stays leased to this request
        until the caller says its answer left (`Delivery.delivered`) or could not
        (`Delivery.undelivered`). A crash in between refunds the task.

        The whole of it — the charge, every submission attempt, the outcome's write — runs
        within one deadline, `SCENEMINT_SUBMIT_TIMEOUT` plus `REQUEST_MARGIN`: a database
        that stops answering makes it a 503 in time, not later."""
        with deadline.within(self.settings.submit_timeout + REQUEST_MARGIN):
            return await self._generate_answer(
                prompt=prompt,
                size=size,
                fingerprint=fingerprint,
                reference=reference,
                idempotency_key=idempotency_key,
            )

    async def _generate_answer(
        self,
        *,
        prompt: object,
        size: object,
        fingerprint: object,
        reference: Reference | None,
        idempotency_key: object,
    ) -> Delivery:
        clean = clean_prompt(prompt, max_chars=self.settings.max_prompt_chars)
        size_ = normalize_size(size)
        owner = clean_fingerprint(fingerprint)
        key = clean_idempotency_key(idempotency_key)
        upstream = self._require_upstream()
        mode = "image" if reference is not None else "text"
        request_hash = _request_hash(mode=mode, prompt=clean, size=size_, reference=reference)
        if key is not None:
            existing = await self.store.task_by_key(owner, key)
            if existing is not None:
                return await self._replay(existing, request_hash=request_hash)
        upstream.check_submit()  # fail fast before taking a credit
        sync = isinstance(upstream, OpenAIImages)  # a job our runners send, or a submission
        task_id = new_task_id()
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
                    state=State.QUEUED if sync else State.SUBMITTING,
                    lease_owner=self.owner,
                    lease_seconds=self.settings.lease_seconds,
                    idempotency_key=key,
                    request_hash=request_hash,
                    kind="sync" if sync else "task",
                )
            )
        except KeyInUse as exc:  # the same key arrived twice at once: nothing was charged
            await self._drop_reference_quietly(ref_path)
            return await self._replay(exc.task, request_hash=request_hash)
        except BaseException:
            await self._drop_reference_quietly(ref_path)
            raise
        self.metrics.credits_charged.inc()
        log.info("charged %s for task %s (%s)", _short(owner), task_id, mode)
        if sync:  # queued: a runner takes it once its answer has left
            return await self._queued(charge.task, balance=charge.balance)
        return await self._submit(charge.task, reference=reference, balance=charge.balance)

    async def _queued(self, row: LedgerTask, *, balance: int) -> Delivery:
        task = await self._view(row, prompt=row.prompt, remaining=balance)
        return Delivery(self, task, row)

    async def _replay(self, existing: LedgerTask, *, request_hash: str) -> Delivery:
        """A request with a key that already names a task: that task, never a second charge."""
        if existing.request_hash != request_hash:
            raise Conflict("idempotency_key_reused", detail=f"key of task {existing.id}")
        balance = (await self.store.status(existing.fingerprint)).balance
        if existing.handed or existing.finished:
            task = self._public(existing, prompt=existing.prompt, remaining=balance)
            return Delivery(self, task, None)
        if existing.lease_until > self.store.now():
            raise Conflict("idempotency_in_progress", retry_after=1.0)
        # its first request is gone (crashed, or its answer was lost): take the row over
        claimed = await self.store.claim(
            existing, owner=self.owner, seconds=self.settings.lease_seconds
        )
        if claimed is None:
            raise Conflict("idempotency_in_progress", retry_after=1.0)
        if claimed.kind == "sync":
            return await self._queued(claimed, balance=balance)
        reference = await self._load_reference(claimed)
        if claimed.mode == "image" and reference is None:
            written = await self._observe(claimed, ReferenceGone())
            row = written or claimed
            task = self._public(row, prompt=row.prompt, remaining=balance + row.refunded)
            return Delivery(self, task, None)
        return await self._submit(claimed, reference=reference, balance=balance)

    async def _submit(
        self, row: LedgerTask, *, reference: Reference | None, balance: int
    ) -> Delivery:
        """Submit a row we hold the lease of and write the outcome, keeping the lease until
        the answer has left (`Delivery`)."""
        async with self.lease(row):
            result = await self.submit(row, reference=reference, until_shutdown=True)
        written = await self._observe(row, result.observation, keep_lease=True)
        if written is None:
            # our lease lapsed while we were sending and another instance took the row
            current = await self.store.get_task(row.id)
            if current is not None and current.handed:
                task = self._public(current, prompt=current.prompt, remaining=balance)
                return Delivery(self, task, None)
            raise StoreUnavailable(detail=f"lost the lease of task {row.id}", retry_after=1.0)
        if isinstance(result.observation, Refused) and result.error is not None:
            raise result.error
        if isinstance(result.observation, Unknown):
            log.warning("submission of %s has an unknown outcome: asking the upstream", row.id)
        task = self._public(written, prompt=written.prompt, remaining=balance + written.refunded)
        return Delivery(self, task, written)

    async def deliver(self, row: LedgerTask, *, delivered: bool) -> None:
        """The answer for `row` left for its client (or could not): record it, release the
        lease. Never raises: a row left leased is refunded once the lease lapses."""
        try:
            if delivered:
                written = await self._observe(row, Delivered())
                if written is None:
                    log.warning("task %s: its answer left, but the row changed meanwhile", row.id)
            else:
                log.warning("task %s: its answer did not reach the client: refunding", row.id)
                await self.store.renew(row, owner=self.owner, seconds=0)
        except ScenemintError as exc:
            log.error("task %s: cannot record its delivery: %s", row.id, exc.detail or exc.code)
        if row.state == State.SUBMITTING or not delivered:
            self.needs_reconcile.set()  # an unknown outcome, or a refund due: look now
        if row.kind == "sync" and delivered:
            self.needs_jobs.set()  # the job is the client's: a runner may take it

    async def submit(
        self, row: LedgerTask, *, reference: Reference | None, until_shutdown: bool = False
    ) -> SubmitResult:
        """Submit a row within `SCENEMINT_SUBMIT_TIMEOUT`, retries included.

        Retried (with the same `client_task_id`, which the upstream answers idempotently)
        while time is left, on anything that is not a refusal. The outcome is Refused only
        when no attempt can have created the task.
        """
        upstream = self._require_upstream()
        if not isinstance(upstream, Chatgpt2Api):  # the upstream kind changed since
            return SubmitResult(Refused("this upstream takes no task submissions"))
        loop = asyncio.get_running_loop()
        until = loop.time() + self.settings.submit_timeout
        left = deadline.remaining()
        if left is not None:  # within a request: leave the time its outcome's write needs
            until = min(until, loop.time() + left - OUTCOME_RESERVE)
        sent = False
        error: UpstreamError | None = None
        for attempt in range(1, self.settings.submit_attempts + 1):
            remaining = until - loop.time()
            if remaining <= 0:
                break
            try:
                task = await self._unless_shutdown(
                    self._submit_once(upstream, row, reference, time_limit=remaining),
                    until_shutdown=until_shutdown,
                )
                return SubmitResult(Accepted(task))
            except _Interrupted:
                return SubmitResult(Unknown("the server is shutting down"))
            except UpstreamError as exc:
                error = exc
                sent = sent or exc.ambiguous
                if not (exc.retryable or exc.ambiguous) or attempt == self.settings.submit_attempts:
                    break
            delay = _BACKOFF * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)
            if until - loop.time() <= delay:
                break
            try:
                await self._unless_shutdown(asyncio.sleep(delay), until_shutdown=until_shutdown)
            except _Interrupted:
                break
        if sent or error is None:
            return SubmitResult(Unknown(error.detail if error else "no time left"), error)
        return SubmitResult(Refused(error.detail), error)

    async def _submit_once(
        self,
        upstream: Chatgpt2Api,
        row: LedgerTask,
        reference: Reference | None,
        *,
        time_limit: float,
    ) -> UpstreamTask:
        if reference is None:
            return await upstream.submit_generation(
                task_id=row.id, prompt=row.prompt, size=row.size, time_limit=time_limit
            )
        return await upstream.submit_edit(
            task_id=row.id,
            prompt=row.prompt,
            size=row.size,
            image=reference.data,
            filename=reference.filename,
            content_type=reference.content_type,
            time_limit=time_limit,
        )

    async def _unless_shutdown(self, work: Awaitable[T], *, until_shutdown: bool) -> T:
        """Await `work`, or give up on it with _Interrupted when the server shuts down."""
        if not until_shutdown:
            return await work
        job = asyncio.ensure_future(work)
        stop = asyncio.ensure_future(self.shutting_down.wait())
        try:
            await asyncio.wait({job, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if job.done():
            return job.result()
        job.cancel()
        with suppress(asyncio.CancelledError, Exception):
            await job
        raise _Interrupted

    async def resubmit(self, row: LedgerTask) -> LedgerTask | None:
        """Send a claimed row again (the reconciler's): same id, so the upstream keeps one task.

        A retryable refusal (a full upstream, a refused connection, our open breaker) keeps
        the charge for the next round; only a definite refusal refunds.
        """
        reference = await self._load_reference(row)
        if row.mode == "image" and reference is None:
            return await self._observe(row, ReferenceGone())
        async with self.lease(row):
            result = await self.submit(row, reference=reference)
        observation = result.observation
        error = result.error
        if isinstance(observation, Refused) and error and (error.retryable or _held_back(error)):
            observation = Unknown(observation.detail)
        return await self._observe(row, observation)

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

    # -- settlement -------------------------------------------------------------------

    async def _observe(
        self, row: LedgerTask, observation: Observation, *, keep_lease: bool = False
    ) -> LedgerTask | None:
        """Decide and write what `observation` means for `row` (a Resubmit is not ours).

        `keep_lease`: an owner's write that keeps the lease (its answer has not left yet)."""
        step = decide(row, observation, now=self.store.now(), limits=self.limits)
        if not isinstance(step, Decision):
            return row if step is None else None
        if keep_lease and step.guard is Guard.OWNER and step.state not in FINISHED:
            step = replace(step, keep_lease=True)
        return await self.write(row, step)

    async def write(self, row: LedgerTask, decision: Decision) -> LedgerTask | None:
        """Apply a decision to `row`; None when the row changed first (nothing was written).

        A database error is retried a few times: a write whose commit was lost then finds
        its own change (stale), which the caller reads back.
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
            await self._changed(written)
        return written

    async def _changed(self, row: LedgerTask) -> None:
        """After a write: metrics, the answer cache, and a reference nobody needs any more."""
        self.answers.put(row.id, self._public(row), version=row.version, finished=row.finished)
        if row.state == State.FAILED:
            self.metrics.credits_refunded.inc()
            refused = row.error_code == ErrorCode.REFUSED
            self.metrics.tasks.labels("submit_failed" if refused else "failed").inc()
            log.info("refunded %s for task %s: %s", _short(row.fingerprint), row.id, row.error_code)
        elif row.state == State.COMPLETED:
            self.metrics.tasks.labels("completed").inc()
        elif row.state == State.FETCHING and row.lease_owner is None:
            self.needs_copy.set()
        if row.finished and row.reference_path:
            await self.drop_reference(row.id, row.reference_path)

    # -- tasks --------------------------------------------------------------------------

    async def get_task(self, task_id: str) -> Task:
        """The task, freshly mapped; the "missing" shape for ids that are not ours."""
        if not is_task_id(task_id):
            return missing_task(task_id)
        return (await self._answer(task_id)).task

    async def task_answer(self, task_id: str, *, chinese: bool = False) -> bytes:
        """The encoded `data` of a task answer (what the poll fast path sends)."""
        if not is_task_id(task_id):
            task = missing_task(task_id)
            return json.dumps(task.to_json(chinese=chinese), ensure_ascii=False).encode()
        return (await self._answer(task_id)).encoded(chinese=chinese)

    async def _answer(self, task_id: str) -> Answer:
        """The answer for a well-formed id: reused while fresh (see `answers`); concurrent
        callers for one id share one computation."""
        cached = self.answers.get(task_id)
        if cached is not None:
            return cached
        computing = self._computing.get(task_id)
        if computing is None:
            # its own task: a poller that goes away must not cancel it for the others
            computing = asyncio.ensure_future(self._compute(task_id))
            self._computing[task_id] = computing
            computing.add_done_callback(lambda done: self._computed(task_id, done))
        return await asyncio.shield(computing)

    def _computed(self, task_id: str, done: asyncio.Future[Answer]) -> None:
        self._computing.pop(task_id, None)
        if not done.cancelled():
            done.exception()  # retrieved: its pollers may all have gone

    async def _compute(self, task_id: str) -> Answer:
        row = await self.store.get_task(task_id)
        if row is None:
            return self.answers.put(task_id, missing_task(task_id), version=None, finished=True)
        if row.kind == "sync":
            if row.state == State.QUEUED and row.lease_until <= self.store.now():
                self.needs_jobs.set()  # waiting for a runner: look now
            task = await self._view(row)
            return self.answers.put(task_id, task, version=row.version, finished=row.finished)
        if row.state in (State.QUEUED, State.RUNNING) and self.poller is not None:
            found = await self.poller.fetch(task_id)  # asked after the row was read
            written = await self._observe(row, Seen(found) if found else Missing())
            row = written or await self._reread(row)
        elif row.state == State.SUBMITTING and row.lease_until <= self.store.now():
            self.needs_reconcile.set()  # nobody is sending it: the reconciler asks upstream
        elif row.state == State.FETCHING and row.lease_until <= self.store.now():
            self.needs_copy.set()  # nobody is copying its image: the copier takes it
        return self.answers.put(
            task_id, self._public(row), version=row.version, finished=row.finished
        )

    async def _view(
        self, row: LedgerTask, *, prompt: str | None = None, remaining: int | None = None
    ) -> Task:
        """The public task, with its place in the queue while a sync job waits for a runner."""
        task = self._public(row, prompt=prompt, remaining=remaining)
        if row.kind == "sync" and row.state == State.QUEUED:
            task = replace(task, queue_position=await self.store.queue_position(row))
        return task

    async def _reread(self, row: LedgerTask) -> LedgerTask:
        fresh = await self.store.get_task(row.id)
        return fresh or row

    def _public(
        self, row: LedgerTask, *, prompt: str | None = None, remaining: int | None = None
    ) -> Task:
        status = _PUBLIC_STATUS.get(State(row.state), State.QUEUED)
        return Task(
            id=row.id,
            mode=row.mode,
            status=str(status),
            size=row.size,
            image=image_path(row.id) if status is State.COMPLETED else None,
            error_code=row.error_code if status is State.FAILED else None,
            error=row.error if status is State.FAILED else None,
            revised_prompt=row.revised_prompt,
            created_at=rfc3339_from_epoch(row.created_at),
            updated_at=rfc3339_from_epoch(row.updated_at),
            prompt=prompt,
            remaining_credits=remaining,
        )

    # -- images -------------------------------------------------------------------------

    async def image(self, task_id: str) -> StoredImage:
        """The stored image of a completed task: NotFound while there is none, Gone once the
        retention rule deleted it. A task completed before the image store existed has its
        image copied on this first request."""
        cached = self._stored_images.get(task_id)
        if cached is not None:
            if self._past_retention(cached.stored_at):
                raise Gone()
            return cached
        if not is_task_id(task_id):
            raise NotFound("image_not_ready")
        task = await self.get_task(task_id)  # it may have finished since the last poll
        if task.status != "completed":
            raise NotFound("image_not_ready")
        row = await self.store.get_task(task_id)
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
            store=self.images,
        )
        if len(self._stored_images) >= _STORED_IMAGES_KEPT:
            self._stored_images.clear()  # ids are UUIDs: bounded in bytes by the count
        self._stored_images[task_id] = stored
        return stored

    async def image_missing(self, missing: ImageMissing) -> ScenemintError:
        """What to answer when the store lacks an image `image()` described: Gone once the
        retention sweep deleted it (another instance may have, under its own settings; the
        description kept here cannot know), else the store's error. The description is
        dropped either way: the next request reads the ledger again."""
        self._stored_images.pop(missing.task_id, None)
        row = await self.store.get_task(missing.task_id)
        if row is not None and (
            row.image_expired_at is not None or self._past_retention(row.image_stored_at)
        ):
            return Gone()
        return missing

    def _past_retention(self, stored_at: float | None) -> bool:
        """The retention rule (the sweep applies the same one, then deletes the object)."""
        days = self.settings.image_retention_days
        return bool(days and stored_at is not None and stored_at < self.store.now() - days * 86400)

    async def complete(self, row: LedgerTask) -> LedgerTask | None:
        """Copy the image of a `fetching` row we hold the lease of, and settle what it gave."""
        async with self.lease(row):
            observation = await self._copier().copy(row.id, row.image_url)
        return await self._observe(row, observation)

    # -- sync jobs (openai kind) ------------------------------------------------------------

    async def run_job(self, row: LedgerTask) -> LedgerTask | None:
        """Send a sync job we claimed — once — and settle what it gave.

        `Sending` is written before the request leaves: a runner that dies after it leaves
        a running row that is failed and refunded, never sent again (the upstream may have
        made, and charged for, the image)."""
        upstream = self.upstream
        if not isinstance(upstream, OpenAIImages):  # the upstream kind changed since:
            return None  # keep the lease (no claim loop); the age rule settles the job
        reference = await self._load_reference(row) if row.mode == "image" else None
        if row.mode == "image" and reference is None:
            return await self._observe(row, ReferenceGone())
        held = "the server is stopping" if self.shutting_down.is_set() else _held_back_now(upstream)
        if held is not None:
            # not sent: the job stays queued, free at once for the next runner or instance
            log.info("job %s not sent: %s", row.id, held)
            await self.store.renew(row, owner=self.owner, seconds=0)
            return None
        sending = await self._observe(row, Sending())
        if sending is None or sending.state != State.RUNNING:
            return sending
        row = sending
        deadline = asyncio.get_running_loop().time() + self.settings.generation_timeout
        async with self.lease(row):
            try:
                if reference is None:
                    answer = await upstream.generate(
                        prompt=row.prompt, size=row.size, deadline=deadline
                    )
                else:
                    answer = await upstream.edit(
                        prompt=row.prompt,
                        size=row.size,
                        image=reference.data,
                        filename=reference.filename,
                        content_type=reference.content_type,
                        deadline=deadline,
                    )
                observation = await self._generated(row, answer)
            except Refusal as exc:
                code = ErrorCode.CONTENT_POLICY if exc.policy else ErrorCode.REFUSED
                log.warning("generation of %s refused: %s", row.id, exc.detail)
                observation = Refused(exc.detail, code=code, error=exc.message)
            except UpstreamError as exc:
                if nothing_generated(exc) or not exc.ambiguous:
                    # refused, too busy, unreachable, our key, our breaker: nothing was made
                    log.warning("generation of %s not taken: %s", row.id, exc.detail)
                    observation = Refused(exc.detail)
                else:
                    log.warning("generation of %s ended without an answer: %s", row.id, exc.detail)
                    observation = Unknown(exc.detail)
        return await self._observe(row, observation)

    async def claim_jobs(self, *, owner: str, seconds: float, limit: int) -> list[LedgerTask]:
        """Queued jobs for this process's runners: none while the server shuts down or our
        breaker for generations is open (they stay free for another instance, and the
        reconciler's age rule still reaches them)."""
        upstream = self.upstream
        if self.shutting_down.is_set() or not isinstance(upstream, OpenAIImages):
            return []
        if _held_back_now(upstream) is not None:
            return []
        return await self.store.claim_jobs(owner=owner, seconds=seconds, limit=limit)

    async def _generated(self, row: LedgerTask, answer: GeneratedImage) -> Observation:
        """What a generation's answer means: its image stored, a URL to copy, or nothing."""
        if answer.data is None:
            assert answer.url is not None
            return Generated(answer.url, answer.revised_prompt)
        return await self._copier().keep(row.id, answer.data, revised_prompt=answer.revised_prompt)

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
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.image_deadline + self.settings.lease_seconds
        while True:
            claimed = await self.store.claim_legacy_copy(
                row, owner=self.owner, seconds=self.settings.lease_seconds
            )
            if claimed is not None:
                break
            # another instance is copying it: wait for its result (or for its lease to lapse)
            if loop.time() > deadline:
                raise UpstreamError(detail=f"the image of {row.id} is being copied elsewhere")
            await asyncio.sleep(0.2)
            fresh = await self.store.get_task(row.id)
            if fresh is None:
                raise NotFound("image_not_ready")
            if fresh.image_key is not None:
                return fresh
            row = fresh
        async with self.lease(claimed):
            observation = await self._copier().copy(claimed.id, claimed.image_url)
        if isinstance(observation, FetchFailed):
            await self.store.renew(claimed, owner=self.owner, seconds=0)  # release it
            raise UpstreamError(detail=f"image of {row.id}: {observation.detail}")
        written = await self.store.attach_image(claimed, observation.image, owner=self.owner)
        if written is None:
            fresh = await self.store.get_task(row.id)
            if fresh is None or fresh.image_key is None:
                raise UpstreamError(detail=f"lost the lease of {row.id} while copying its image")
            return fresh
        return written

    # -- prompt enhancement --------------------------------------------------------------

    async def enhance(
        self, *, prompt: object, direction: object, chinese: bool = False
    ) -> EnhancementStream:
        """Open the upstream chat stream; errors raise here, before anything is streamed.

        Its failures have their own codes (`enhance_failed`, `enhance_timeout`,
        `enhance_unavailable`): an enhancement that fails never says the image service did.
        """
        clean = clean_prompt(prompt, max_chars=self.settings.max_prompt_chars)
        if not isinstance(direction, str) or direction.strip() not in DIRECTIONS:
            raise BadRequest("invalid_direction")
        upstream = self._require_upstream()
        if not self.settings.prompt_model.strip():
            raise NotConfigured(detail="CHATGPT2API_PROMPT_MODEL is empty")
        body = chat_request(
            model=self.settings.prompt_model.strip(),
            prompt=clean,
            direction=direction.strip(),
            # OpenAI's reasoning models refuse any temperature but their default
            temperature=not isinstance(upstream, OpenAIImages),
        )
        deadline = asyncio.get_running_loop().time() + self.settings.stream_deadline
        stack = AsyncExitStack()
        try:
            events = await stack.enter_async_context(upstream.open_chat_stream(body))
        except UpstreamError as exc:
            await stack.aclose()
            raise _as_enhancement_error(exc) from exc
        except BaseException:
            await stack.aclose()
            raise
        return EnhancementStream(
            stack,
            events,
            ping_interval=self.settings.stream_ping_interval,
            deadline=deadline,
            chinese=chinese,
            shutting_down=self.shutting_down,
            redactor=upstream.http.secrets,
        )

    # -- operations ---------------------------------------------------------------------------

    async def ready(self) -> dict[str, str]:
        """Raise NotReady (503) unless the service can do its work: the database accepts a
        write, the data directory accepts a file, and the upstream answers a task listing
        with our key. Chat availability is reported, not required.

        Probes never count toward a circuit breaker. Results are cached for 5 s.
        """
        try:
            await self.store.probe_write()
        except ScenemintError as exc:
            log.error("not ready: the database does not accept a write: %s", exc.detail)
            raise NotReady(detail="database not writable") from exc
        try:
            await self.references.probe()
        except OSError as exc:
            log.error("not ready: the data directory does not accept a file: %s", exc)
            raise NotReady(detail="data directory not writable") from exc
        try:
            await self.images.probe()
        except ImageStoreUnavailable as exc:
            log.error("not ready: the image store does not accept a write: %s", exc.detail)
            raise NotReady(detail="image store not writable") from exc
        if self.upstream is None:
            log.error("not ready: upstream not configured")
            raise NotReady(detail="upstream not configured")
        upstream = self.upstream
        now = asyncio.get_running_loop().time()
        if now - self._ready_at >= _READY_CACHE_SECONDS:
            try:
                await upstream.probe()
            except ScenemintError as exc:
                log.error("not ready: upstream: %s", exc.code)
                raise NotReady(detail=f"upstream: {exc.code}") from exc
            self._ready_at = now
        if now - self._chat_checked_at >= _READY_CACHE_SECONDS:
            self._chat_checked_at = now
            try:
                await upstream.probe_chat()
                self._chat = "available"
            except ScenemintError as exc:
                log.warning("chat (prompt enhancement) unavailable: %s", exc.code)
                self._chat = "unavailable"
        return {"status": "ready", "chat": self._chat}

    # -- reference images ----------------------------------------------------------------------

    def _require_upstream(self) -> Upstream:
        if self.upstream is None:
            log.error("upstream not configured: set CHATGPT2API_BASE_URL and CHATGPT2API_API_KEY")
            raise NotConfigured()
        return self.upstream

    def _copier(self) -> ImageCopier:
        self._require_upstream()
        assert self.copier is not None  # made with the upstream
        return self.copier

    async def _save_reference(self, task_id: str, reference: Reference) -> str:
        try:
            return str(await self.references.save(task_id, reference.data))
        except OSError as exc:
            log.error("cannot keep the reference image of %s: %s", task_id, exc.strerror or exc)
            raise StoreUnavailable(detail="cannot write the reference image") from exc

    async def _load_reference(self, row: LedgerTask) -> Reference | None:
        if row.mode != "image":
            return None
        try:
            data = await self.references.load(row.reference_path)
        except OSError as exc:
            log.warning("cannot read the reference image of %s: %s", row.id, exc.strerror)
            return None
        if data is None:
            return None
        return Reference(
            data=data,
            filename=row.reference_name or "reference.png",
            content_type=row.reference_type or "application/octet-stream",
        )

    async def drop_reference(self, task_id: str, path: str) -> bool:
        """Remove a finished task's reference file; a failure is left for the next round."""
        try:
            await self.references.drop(path)
            await self.store.reference_dropped(task_id)
        except (OSError, StoreUnavailable) as exc:
            log.warning("reference of %s not removed yet: %s", task_id, exc)
            return False
        return True

    async def _drop_reference_quietly(self, path: str | None) -> None:
        with suppress(OSError):
            await self.references.drop(path)


def _request_hash(*, mode: str, prompt: str, size: str, reference: Reference | None) -> str:
    """What makes two generate requests "the same" for an idempotency key."""
    digest = hashlib.sha256()
    reference_digest = hashlib.sha256(reference.data).hexdigest() if reference else ""
    digest.update(json.dumps([mode, prompt, size, reference_digest]).encode())
    return digest.hexdigest()


# the status a client sees for each ledger state
_PUBLIC_STATUS = {
    State.SUBMITTING: State.QUEUED,
    State.QUEUED: State.QUEUED,
    State.RUNNING: State.RUNNING,
    State.FETCHING: State.RUNNING,  # the upstream finished; its image is being copied
    State.COMPLETED: State.COMPLETED,
    State.FAILED: State.FAILED,
}


def _held_back_now(upstream: OpenAIImages) -> str | None:
    """Why our own breaker holds generations back now (nothing is refused), or None."""
    try:
        upstream.check_submit()
    except UpstreamError as exc:
        return exc.detail
    return None


def _held_back(error: UpstreamError) -> bool:
    """Our own breaker held the call back: nothing was refused, try again later."""
    return error.reason == "breaker"


_ENHANCEMENT_CODES = {502: "enhance_failed", 503: "enhance_unavailable", 504: "enhance_timeout"}


def _as_enhancement_error(exc: UpstreamError) -> UpstreamError:
    """The same failure, with a code that says the enhancement failed."""
    error = type(exc)(
        _ENHANCEMENT_CODES.get(exc.status, "enhance_failed"),
        detail=exc.detail,
        upstream_status=exc.upstream_status,
        reason=exc.reason,
    )
    return error


def _short(fingerprint: str) -> str:
    return fingerprint[:6] + "…"
