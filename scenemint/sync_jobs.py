"""The jobs of synchronous upstreams (`openai` kind): sent at most once, by lease.

A generate charged the row `queued` at an upstream; that upstream's runners (`jobs.runner`,
`job_concurrency` of them per process) claim it once its answer has left. `run` writes that
the request is being sent (`Sending`: the task becomes `running`) *before* it leaves — a
runner that dies after that leaves a row that is failed and refunded, never sent again (the
upstream may have made, and charged for, the image) — and settles what the generation gave.

Sent again only after an answer that proves nothing was generated (the router's rule,
`judge`): at once to another upstream when one can take it (the task moves on), else to
the same one after a pause (429's Retry-After honoured), within the generation's deadline.
Our own breaker opening between attempts puts the job back in its queue, unsent (`Held`).
"""

from __future__ import annotations

import asyncio
import logging
import random

from .errors import UpstreamError
from .generation import load_reference
from .images.copier import ImageCopier
from .ledger import Ledger
from .settlement import (
    ErrorCode,
    Fault,
    Generated,
    Held,
    Observation,
    ReferenceGone,
    Refused,
    Sending,
    State,
    Unknown,
)
from .store import LedgerTask
from .upstream import GeneratedImage, OpenAIImages
from .upstream.openai import Refusal
from .upstream.router import judge
from .validation import Reference

log = logging.getLogger("scenemint.jobs")

_BACKOFF = 1.0  # seconds before sending again after a proof that nothing was made; doubled
_BACKOFF_MAX = 20.0


class SyncJobs:
    def __init__(
        self, ledger: Ledger, copier: ImageCopier, *, shutting_down: asyncio.Event
    ) -> None:
        self._ledger = ledger
        self._copier = copier
        self._shutting_down = shutting_down

    async def claim(
        self, upstream: str, *, owner: str, seconds: float, limit: int
    ) -> list[LedgerTask]:
        """Queued jobs of `upstream` for this process's runners: none while the server shuts
        down or our breaker for its generations is open (they stay free for another instance,
        and the reconciler's age rule still reaches them)."""
        client = self._ledger.router.client(upstream)
        if self._shutting_down.is_set() or not isinstance(client, OpenAIImages):
            return []
        if client.http.breakers["submit"].is_open:
            return []
        return await self._ledger.store.claim_jobs(
            upstream=upstream, owner=owner, seconds=seconds, limit=limit
        )

    async def run(self, row: LedgerTask) -> LedgerTask | None:
        """Send a job we claimed — once — and settle what it gave."""
        ledger = self._ledger
        client = ledger.router.client(row.upstream)
        if not isinstance(client, OpenAIImages):  # not ours to send (claimed elsewhere)
            return None
        reference = await load_reference(ledger, row) if row.mode == "image" else None
        if row.mode == "image" and reference is None:
            return await ledger.observe(row, ReferenceGone())
        breaker = client.http.breakers["submit"]
        held = "the server is stopping" if self._shutting_down.is_set() else None
        held = held or ("its breaker is open" if breaker.is_open else None)
        if held is not None:
            # not sent: the job stays queued, free at once for the next runner or instance
            log.info("job %s not sent to %s: %s", row.id, row.upstream, held)
            await ledger.store.renew(row, owner=ledger.owner, seconds=0)
            return None
        sending = await ledger.observe(row, Sending())
        if sending is None or sending.state != State.RUNNING:
            return sending
        row = sending
        deadline = asyncio.get_running_loop().time() + ledger.settings.generation_timeout
        async with ledger.lease(row):
            observation = await self._attempts(client, row, reference, deadline=deadline)
        return await ledger.observe(row, observation)

    async def _attempts(
        self,
        client: OpenAIImages,
        row: LedgerTask,
        reference: Reference | None,
        *,
        deadline: float,
    ) -> Observation:
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            attempt += 1
            try:
                answer = await self._send(client, row, reference, deadline=deadline)
                return await self._generated(row, answer)
            except UpstreamError as exc:
                proof = judge(exc)
                if proof.made is None:
                    log.warning("generation of %s ended without an answer: %s", row.id, exc.detail)
                    return Unknown(exc.detail)
                if proof.fault is Fault.REQUEST:
                    policy = isinstance(exc, Refusal) and exc.policy
                    log.warning("generation of %s refused: %s", row.id, exc.detail)
                    message = exc.message if isinstance(exc, Refusal) else None
                    code = ErrorCode.CONTENT_POLICY if policy else ErrorCode.REFUSED
                    return Refused(exc.detail, code=code, error=message)
                if proof.held or client.http.breakers["submit"].is_open:
                    # our breaker is open (these very failures may have opened it): nothing
                    # left, and nothing will leave until its cool-down: back to the queue
                    return Held(exc.detail)
                elsewhere = self._ledger.router.alternative(row.tried) is not None
                pause = proof.retry_after or min(
                    _BACKOFF_MAX, _BACKOFF * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)
                )
                if elsewhere or not proof.again or loop.time() + pause >= deadline:
                    log.warning("generation of %s not taken: %s", row.id, exc.detail)
                    return Refused(exc.detail, fault=Fault.UPSTREAM)
                log.info(
                    "generation of %s not taken (%s): again in %.1f s", row.id, exc.reason, pause
                )
                await asyncio.sleep(pause)

    async def _send(
        self,
        client: OpenAIImages,
        row: LedgerTask,
        reference: Reference | None,
        *,
        deadline: float,
    ) -> GeneratedImage:
        if reference is None:
            return await client.generate(prompt=row.prompt, size=row.size, deadline=deadline)
        return await client.edit(
            prompt=row.prompt,
            size=row.size,
            image=reference.data,
            filename=reference.filename,
            content_type=reference.content_type,
            deadline=deadline,
        )

    async def _generated(self, row: LedgerTask, answer: GeneratedImage) -> Observation:
        """What a generation's answer means: its image stored, a URL to copy, or nothing."""
        if answer.data is None:
            assert answer.url is not None
            return Generated(answer.url, answer.revised_prompt)
        return await self._copier.keep(row.id, answer.data, revised_prompt=answer.revised_prompt)
