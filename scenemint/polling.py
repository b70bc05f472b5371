"""A poll of a task: its answer from the one cache, or made now.

An answer is made from the ledger row. A task unfinished at an asynchronous upstream is
asked about at the upstream that holds it (the row names it), through that upstream's
poller (`poller.TaskPoller`: concurrent polls share batched listings), and what it says is
settled (`Ledger.observe`) before it is answered. Concurrent polls of one id share one
computation. Finished tasks, jobs of ours and ids that are not ours need no upstream.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

from .answers import Answer, TaskAnswers, public_task
from .ledger import Ledger
from .models import Task, is_task_id, missing_task
from .settlement import Missing, Seen, State
from .store import LedgerTask


class TaskReader:
    def __init__(self, ledger: Ledger, answers: TaskAnswers) -> None:
        self._ledger = ledger
        self._answers = answers
        self._computing: dict[str, asyncio.Future[Answer]] = {}

    async def get_task(self, task_id: str) -> Task:
        """The task, freshly mapped; the "missing" shape for ids that are not ours."""
        if not is_task_id(task_id):
            return missing_task(task_id)
        return (await self.answer(task_id)).task

    async def task_answer(self, task_id: str, *, chinese: bool = False) -> bytes:
        """The encoded `data` of a task answer (what the poll sends)."""
        if not is_task_id(task_id):
            task = missing_task(task_id)
            return json.dumps(task.to_json(chinese=chinese), ensure_ascii=False).encode()
        return (await self.answer(task_id)).encoded(chinese=chinese)

    async def answer(self, task_id: str) -> Answer:
        """The answer for a well-formed id: reused while fresh (see `answers`); concurrent
        callers for one id share one computation."""
        cached = self._answers.get(task_id)
        if cached is not None:
            return cached
        computing = self._computing.get(task_id)
        if computing is None:
            # its own task: a poller that goes away must not cancel it for the others
            computing = asyncio.ensure_future(self._compute(task_id))
            self._computing[task_id] = computing
            computing.add_done_callback(lambda done: self._computed(task_id, done))
        return await asyncio.shield(computing)

    async def known(self, task_id: str) -> Answer:
        """What the service knows of the task now, without asking an upstream: the cached
        answer, or one made from the row (not cached: a poll still asks the upstream). A
        watcher's first answer, which must not wait for a slow or failing upstream."""
        cached = self._answers.get(task_id)
        if cached is not None:
            return cached
        row = await self._ledger.store.get_task(task_id)
        if row is None:
            return self._answers.put(task_id, missing_task(task_id), version=None, finished=True)
        return Answer(version=row.version, expires=0.0, task=await self.view(row))

    def _computed(self, task_id: str, done: asyncio.Future[Answer]) -> None:
        self._computing.pop(task_id, None)
        if not done.cancelled():
            done.exception()  # retrieved: its pollers may all have gone

    async def _compute(self, task_id: str) -> Answer:
        ledger = self._ledger
        store = ledger.store
        row = await store.get_task(task_id)
        if row is None:
            return self._answers.put(task_id, missing_task(task_id), version=None, finished=True)
        if row.kind == "sync":
            if row.state == State.QUEUED and row.lease_until <= store.now():
                ledger.wakeups.jobs(row.upstream).set()  # waiting for a runner: look now
            task = await self.view(row)
            return self._answers.put(task_id, task, version=row.version, finished=row.finished)
        route = ledger.router.get(row.upstream)
        poller = route.poller if route is not None else None
        if row.state in (State.QUEUED, State.RUNNING) and poller is not None:
            found = await poller.fetch(task_id)  # asked after the row was read
            written = await ledger.observe(row, Seen(found) if found else Missing())
            row = written or await ledger.reread(row)
        elif row.state == State.SUBMITTING and row.lease_until <= store.now():
            ledger.wakeups.reconcile.set()  # nobody is sending it: the reconciler asks upstream
        elif row.state == State.FETCHING and row.lease_until <= store.now():
            ledger.wakeups.copy.set()  # nobody is copying its image: the copier takes it
        task = await self.view(row)
        return self._answers.put(task_id, task, version=row.version, finished=row.finished)

    async def view(
        self, row: LedgerTask, *, prompt: str | None = None, remaining: int | None = None
    ) -> Task:
        """The public task, with its place in the queue while a sync job waits for a runner."""
        task = public_task(row, prompt=prompt, remaining=remaining)
        if row.kind == "sync" and row.state == State.QUEUED:
            task = replace(task, queue_position=await self._ledger.store.queue_position(row))
        return task
