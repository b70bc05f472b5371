"""A generate request: validate, charge one credit, pick an upstream, submit (moving on to
another upstream when the rule allows), and hand the answer over.

The request owns its row through a lease. With an asynchronous upstream (chatgpt2api) it
submits and writes the outcome: the task as the upstream accepted it, a refusal (moved on to
the next upstream when it is the upstream's fault, else failed and refunded at once), or
"unknown" (the charge is kept and the reconciler asks that upstream straight away). With an
`openai` upstream the row is a queued job for that upstream's runners. Either way the lease
is kept until the answer has been sent (`Delivery`): only then is the task the client's. A
row whose answer never left is refunded once the handoff grace has passed, unless the
client comes back with its Idempotency-Key first.

`Submitter` is the sending itself — attempts at one upstream within the submit timeout,
and the moves to the next — used by the generate request and by the reconciler's
resubmissions alike.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
from collections.abc import Awaitable
from contextlib import suppress
from dataclasses import dataclass, replace
from typing import TypeVar

from . import deadline
from .errors import (
    Conflict,
    NotConfigured,
    ScenemintError,
    StoreUnavailable,
    UpstreamError,
    UpstreamUnavailable,
)
from .ledger import Ledger
from .models import Task, UpstreamTask, new_task_id, normalize_size
from .polling import TaskReader
from .settlement import (
    UNFINISHED,
    Accepted,
    Decision,
    Delivered,
    Fault,
    Guard,
    Held,
    Observation,
    ReferenceGone,
    Refused,
    Sending,
    State,
    Unknown,
)
from .store import KeyInUse, LedgerTask, NewTask
from .upstream import Chatgpt2Api
from .upstream.router import judge, judged_task
from .validation import Reference, clean_fingerprint, clean_idempotency_key, clean_prompt

log = logging.getLogger("scenemint.generation")

T = TypeVar("T")

_BACKOFF = 0.2  # seconds before the first resubmission attempt; doubled each time, jittered
# a generate answers within SCENEMINT_SUBMIT_TIMEOUT plus this, the database's waits included
REQUEST_MARGIN = 5.0
# of that, what the submission leaves for writing its outcome (and the charge before it)
OUTCOME_RESERVE = 2.0


class _Interrupted(Exception):
    pass


class Delivery:
    """A generate answer on its way to its client.

    Until `delivered()` the row is leased to the request that charged it and not yet the
    client's: a crash before that refunds the task (the client may not have its id).
    `delivered()` after the answer was sent, `undelivered()` when it could not be.
    """

    def __init__(self, generation: Generation, task: Task, row: LedgerTask | None) -> None:
        self.task = task
        self._generation = generation
        self._row = row  # None: nothing is owed (a replay of a task already delivered)

    async def delivered(self) -> None:
        if self._row is not None:
            row, self._row = self._row, None
            await self._generation.deliver(row, delivered=True)

    async def undelivered(self) -> None:
        if self._row is not None:
            row, self._row = self._row, None
            await self._generation.deliver(row, delivered=False)


@dataclass(frozen=True, slots=True)
class Sent:
    """What sending a row came to: the row as written (None: another instance took it) and
    the observation written, with the last upstream error behind it."""

    row: LedgerTask | None
    observation: Observation
    error: UpstreamError | None = None


class Submitter:
    """Sends rows of asynchronous upstreams, moving on where the rule allows."""

    def __init__(self, ledger: Ledger, *, shutting_down: asyncio.Event) -> None:
        self._ledger = ledger
        self._settings = ledger.settings
        self._shutting_down = shutting_down

    async def send(
        self,
        row: LedgerTask,
        *,
        reference: Reference | None,
        keep_lease: bool,
        until_shutdown: bool,
        fresh: bool,
    ) -> Sent:
        """Send a row we hold the lease of (state `submitting`) and write what came of it,
        within `SCENEMINT_SUBMIT_TIMEOUT` (and the request's deadline) for all upstreams
        together. A refusal that is the upstream's moves the row on to the next upstream
        (written before it is sent there) and the sending goes on there; a move to an
        `openai` upstream makes it a queued job there, and the sending ends.

        `fresh`: every request that ever left for the row's upstream is one of ours here
        (the charging request's). Otherwise (a resubmission, a client taking a row over) an
        earlier request, whose outcome nobody knows, may still be processed there: no
        refusal of ours can prove that nothing was made, so the row does not move on from
        it (it is kept and asked about). A row never sent to its upstream (it moved on there
        while nobody sent it) is fresh once `Sending` is written."""
        loop = asyncio.get_running_loop()
        until = loop.time() + self._settings.submit_timeout
        left = deadline.remaining()
        if left is not None:  # within a request: leave the time its outcome's write needs
            until = min(until, loop.time() + left - OUTCOME_RESERVE)
        ledger = self._ledger
        while True:
            if row.sent_at is None:  # nobody ever sent it there: we are the first, and say so
                written = await ledger.observe(row, Sending(), keep_lease=True)
                if written is None or written.sent_at is None:
                    return Sent(written, Unknown("the row changed before it was sent"), None)
                row, fresh = written, True
            observation, error = await self._attempts(
                row, reference, until=until, until_shutdown=until_shutdown, fresh=fresh
            )
            step = ledger.decide(row, observation)
            if not isinstance(step, Decision):
                return Sent(row if step is None else None, observation, error)
            goes_on = step.move_to is not None and step.move_kind == "task"
            if goes_on:  # we send it there next: say so in the move's own write
                step = replace(step, sent=True)
            if (keep_lease or goes_on) and step.guard is Guard.OWNER and step.state in UNFINISHED:
                step = replace(step, keep_lease=True)  # its answer has not left, or we go on
            written = await ledger.write(row, step)
            if written is None or not goes_on:
                return Sent(written, observation, error)
            row, fresh = written, True  # moved on to another asynchronous upstream: send it

    async def _attempts(
        self,
        row: LedgerTask,
        reference: Reference | None,
        *,
        until: float,
        until_shutdown: bool,
        fresh: bool,
    ) -> tuple[Observation, UpstreamError | None]:
        """Attempts at the row's upstream: what they observed. Tried again (with the same
        `client_task_id`, which the upstream answers idempotently) while time is left, on
        anything but a proof that nothing was made — which is tried again at the same
        upstream only when no other one could take it."""
        route = self._ledger.router.get(row.upstream)
        client = route.client if route is not None else None
        if not isinstance(client, Chatgpt2Api):
            detail = f"upstream {row.upstream} takes no task submissions here"
            return Refused(detail, fault=Fault.UPSTREAM), None
        loop = asyncio.get_running_loop()
        sent = False  # an attempt may have reached it: it may have made the task
        error: UpstreamError | None = None
        for attempt in range(1, self._settings.submit_attempts + 1):
            remaining = until - loop.time()
            if remaining <= 0:
                break
            try:
                task = await self._unless_shutdown(
                    self._submit_once(client, row, reference, time_limit=remaining),
                    until_shutdown=until_shutdown,
                )
                return Accepted(judged_task(task)), None
            except _Interrupted:
                return Unknown("the server is shutting down"), error
            except UpstreamError as exc:
                error = exc
                proof = judge(exc)
                elsewhere = self._ledger.router.alternative(row.tried) is not None
                proven = fresh and (proof.sure or elsewhere)  # this upstream made nothing
                if proof.made is None or (proof.fault is Fault.UPSTREAM and not proven):
                    sent = True
                elif not sent:
                    if proof.fault is Fault.REQUEST:
                        return Refused(exc.detail), exc
                    if elsewhere or not proof.again:
                        held = Held(exc.detail) if proof.held else None
                        return held or Refused(exc.detail, fault=Fault.UPSTREAM), exc
                if attempt == self._settings.submit_attempts or not (
                    exc.retryable or exc.ambiguous or proof.again
                ):
                    break
            delay = _BACKOFF * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)
            if error is not None and error.retry_after:
                delay = max(delay, error.retry_after)
            if until - loop.time() <= delay:
                break
            try:
                await self._unless_shutdown(asyncio.sleep(delay), until_shutdown=until_shutdown)
            except _Interrupted:
                break
        if sent or error is None:
            return Unknown(error.detail if error else "no time left"), error
        proof = judge(error)
        if proof.held:
            return Held(error.detail), error
        return Refused(error.detail, fault=proof.fault), error

    async def _submit_once(
        self,
        client: Chatgpt2Api,
        row: LedgerTask,
        reference: Reference | None,
        *,
        time_limit: float,
    ) -> UpstreamTask:
        if reference is None:
            return await client.submit_generation(
                task_id=row.id, prompt=row.prompt, size=row.size, time_limit=time_limit
            )
        return await client.submit_edit(
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
        stop = asyncio.ensure_future(self._shutting_down.wait())
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


class Generation:
    """Validate, charge, pick an upstream, submit, hand over (see the module docstring)."""

    def __init__(
        self,
        ledger: Ledger,
        reader: TaskReader,
        submitter: Submitter,
    ) -> None:
        self._ledger = ledger
        self._reader = reader
        self._submitter = submitter
        self._settings = ledger.settings

    async def generate_answer(
        self,
        *,
        prompt: object,
        size: object,
        fingerprint: object,
        reference: Reference | None = None,
        idempotency_key: object = None,
    ) -> Delivery:
        """Charge and submit, the task not yet delivered: the row stays leased to this
        request until the caller says its answer left (`Delivery.delivered`) or could not
        (`Delivery.undelivered`). A crash in between refunds the task.

        The whole of it — the charge, every submission attempt at every upstream, the
        outcome's write — runs within one deadline, `SCENEMINT_SUBMIT_TIMEOUT` plus
        `REQUEST_MARGIN`: a database that stops answering makes it a 503 in time."""
        with deadline.within(self._settings.submit_timeout + REQUEST_MARGIN):
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
        ledger, store = self._ledger, self._ledger.store
        clean = clean_prompt(prompt, max_chars=self._settings.max_prompt_chars)
        size_ = normalize_size(size)
        owner = clean_fingerprint(fingerprint)
        key = clean_idempotency_key(idempotency_key)
        if not ledger.router:
            log.error(
                "no upstream is configured: set SCENEMINT_UPSTREAMS_FILE, or"
                " CHATGPT2API_BASE_URL and CHATGPT2API_API_KEY"
            )
            raise NotConfigured()
        mode = "image" if reference is not None else "text"
        request_hash = _request_hash(mode=mode, prompt=clean, size=size_, reference=reference)
        if key is not None:
            existing = await store.task_by_key(owner, key)
            if existing is not None:
                return await self._replay(existing, request_hash=request_hash)
        route = ledger.router.choose()
        if route is None:  # every upstream's breaker is open (or drained): before a charge
            raise UpstreamUnavailable(detail="no upstream takes new tasks now", reason="breaker")
        sync = route.row_kind == "sync"  # a job our runners send, or a submission
        task_id = new_task_id()
        ref_path = await self._save_reference(task_id, reference) if reference else None
        try:
            charge = await store.spend(
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
                    lease_owner=ledger.owner,
                    lease_seconds=self._settings.lease_seconds,
                    idempotency_key=key,
                    request_hash=request_hash,
                    kind=route.row_kind,
                    upstream=route.name,
                    sending=not sync,
                )
            )
        except KeyInUse as exc:  # the same key arrived twice at once: nothing was charged
            await self._drop_reference_quietly(ref_path)
            return await self._replay(exc.task, request_hash=request_hash)
        except BaseException:
            await self._drop_reference_quietly(ref_path)
            raise
        ledger.metrics.credits_charged.inc()
        log.info(
            "charged %s for task %s (%s) at upstream %s", owner[:6] + "…", task_id, mode, route.name
        )
        if sync:  # queued: a runner takes it once its answer has left
            return await self._queued(charge.task, balance=charge.balance)
        return await self._submit(
            charge.task, reference=reference, balance=charge.balance, fresh=True
        )

    async def _queued(self, row: LedgerTask, *, balance: int) -> Delivery:
        task = await self._reader.view(row, prompt=row.prompt, remaining=balance)
        return Delivery(self, task, row)

    async def _replay(self, existing: LedgerTask, *, request_hash: str) -> Delivery:
        """A request with a key that already names a task: that task, never a second charge."""
        store = self._ledger.store
        if existing.request_hash != request_hash:
            raise Conflict("idempotency_key_reused", detail=f"key of task {existing.id}")
        balance = (await store.status(existing.fingerprint)).balance
        if existing.handed or existing.finished:
            task = await self._reader.view(existing, prompt=existing.prompt, remaining=balance)
            return Delivery(self, task, None)
        if existing.lease_until > store.now():
            raise Conflict("idempotency_in_progress", retry_after=1.0)
        # its first request is gone (crashed, or its answer was lost): take the row over
        claimed = await store.claim(
            existing, owner=self._ledger.owner, seconds=self._settings.lease_seconds
        )
        if claimed is None:
            raise Conflict("idempotency_in_progress", retry_after=1.0)
        if claimed.kind == "sync":
            return await self._queued(claimed, balance=balance)
        reference = await load_reference(self._ledger, claimed)
        if claimed.mode == "image" and reference is None:
            written = await self._ledger.observe(claimed, ReferenceGone())
            row = written or claimed
            task = await self._reader.view(row, prompt=row.prompt, remaining=balance + row.refunded)
            return Delivery(self, task, None)
        # its first request may have left for the upstream: nothing proves what it made there
        return await self._submit(claimed, reference=reference, balance=balance, fresh=False)

    async def _submit(
        self, row: LedgerTask, *, reference: Reference | None, balance: int, fresh: bool
    ) -> Delivery:
        """Send a row we hold the lease of and write the outcome, keeping the lease until
        the answer has left (`Delivery`)."""
        async with self._ledger.lease(row):
            sent = await self._submitter.send(
                row, reference=reference, keep_lease=True, until_shutdown=True, fresh=fresh
            )
        written = sent.row
        if written is None:
            # our lease lapsed while we were sending and another instance took the row
            current = await self._ledger.store.get_task(row.id)
            if current is not None and current.handed:
                task = await self._reader.view(current, prompt=current.prompt, remaining=balance)
                return Delivery(self, task, None)
            raise StoreUnavailable(detail=f"lost the lease of task {row.id}", retry_after=1.0)
        if written.state == State.FAILED and isinstance(sent.observation, Refused | Held):
            raise sent.error or UpstreamError(detail=f"task {row.id} was refused")
        if isinstance(sent.observation, Unknown) and written.state == State.SUBMITTING:
            log.warning(
                "submission of %s to %s has an unknown outcome: asking the upstream",
                row.id,
                written.upstream,
            )
        task = await self._reader.view(
            written, prompt=written.prompt, remaining=balance + written.refunded
        )
        return Delivery(self, task, written)

    async def deliver(self, row: LedgerTask, *, delivered: bool) -> None:
        """The answer for `row` left for its client (or could not): record it, release the
        lease. Never raises: a row left leased is refunded once its lease and grace lapse."""
        ledger = self._ledger
        try:
            if delivered:
                written = await ledger.observe(row, Delivered())
                if written is None:
                    log.warning("task %s: its answer left, but the row changed meanwhile", row.id)
            else:
                log.warning(
                    "task %s: its answer did not reach the client: its client may come back"
                    " with its key within the grace, else it is refunded",
                    row.id,
                )
                await ledger.store.renew(row, owner=ledger.owner, seconds=0)
        except ScenemintError as exc:
            log.error("task %s: cannot record its delivery: %s", row.id, exc.detail or exc.code)
        if row.state == State.SUBMITTING or not delivered:
            ledger.wakeups.reconcile.set()  # an unknown outcome, or a refund due: look now
        if row.kind == "sync" and delivered:
            ledger.wakeups.jobs(row.upstream).set()  # the job is the client's: a runner may run it

    async def _save_reference(self, task_id: str, reference: Reference) -> str:
        try:
            return str(await self._ledger.references.save(task_id, reference.data))
        except OSError as exc:
            log.error("cannot keep the reference image of %s: %s", task_id, exc.strerror or exc)
            raise StoreUnavailable(detail="cannot write the reference image") from exc

    async def _drop_reference_quietly(self, path: str | None) -> None:
        with suppress(OSError):
            await self._ledger.references.drop(path)


async def load_reference(ledger: Ledger, row: LedgerTask) -> Reference | None:
    """The reference image of an edit, from the data directory (None: not an edit, or gone)."""
    if row.mode != "image":
        return None
    try:
        data = await ledger.references.load(row.reference_path)
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


def _request_hash(*, mode: str, prompt: str, size: str, reference: Reference | None) -> str:
    """What makes two generate requests "the same" for an idempotency key."""
    digest = hashlib.sha256()
    reference_digest = hashlib.sha256(reference.data).hexdigest() if reference else ""
    digest.update(json.dumps([mode, prompt, size, reference_digest]).encode())
    return digest.hexdigest()
