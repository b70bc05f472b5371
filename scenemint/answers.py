"""Task answers: what a poll of a task answers, made once and reused while it is true.

`TaskAnswers` is the one cache: an answer is remembered with the version of the ledger row
it was made from. It is reused for `fresh_for` seconds while the task is unfinished (the
poll interval: the upstream is not asked more often than that, however many clients poll),
for `finished_for` seconds once it is finished (a finished row never changes). Every change
this process writes to a row replaces the answer at once (`put` with the newer version wins;
an older version never replaces a newer one), so an answer never outlives a change made
here; a change made by another instance is seen at the latest when the answer expires.

`public_task` is the row as a client sees it. Only task ids of the fixed UUID shape are ever
cached (the service checks), so memory is bounded by the entry count.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from .models import Task, image_path, rfc3339_from_epoch
from .settlement import State

_MAX_ENTRIES = 20_000
# the status a client sees for each ledger state
_PUBLIC_STATUS = {
    State.SUBMITTING: State.QUEUED,
    State.QUEUED: State.QUEUED,
    State.RUNNING: State.RUNNING,
    State.FETCHING: State.RUNNING,  # the upstream finished; its image is being copied
    State.COMPLETED: State.COMPLETED,
    State.FAILED: State.FAILED,
}
_NO_ROW = -1  # the version of an answer for an id the ledger does not have


@dataclass(slots=True)
class Answer:
    version: int
    expires: float
    task: Task
    # encoded `data` of the envelope, per language (False: English, True: Chinese)
    _encoded: dict[bool, bytes] = field(default_factory=dict)

    def encoded(self, *, chinese: bool) -> bytes:
        body = self._encoded.get(chinese)
        if body is None:
            body = json.dumps(self.task.to_json(chinese=chinese), ensure_ascii=False).encode()
            self._encoded[chinese] = body
        return body


class TaskAnswers:
    def __init__(
        self,
        *,
        fresh_for: float,
        finished_for: float = 60.0,
        max_entries: int = _MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fresh_for = fresh_for
        self._finished_for = finished_for
        self._max_entries = max_entries
        self._clock = clock
        self._answers: dict[str, Answer] = {}

    def get(self, task_id: str) -> Answer | None:
        """The answer for `task_id` if it is still fresh."""
        answer = self._answers.get(task_id)
        if answer is None or answer.expires <= self._clock():
            return None
        return answer

    def put(self, task_id: str, task: Task, *, version: int | None, finished: bool) -> Answer:
        """Remember the answer made from row `version` (None: no such row)."""
        version = _NO_ROW if version is None else version
        now = self._clock()
        current = self._answers.get(task_id)
        if current is not None and current.version > version and current.expires > now:
            return current  # a newer row was seen meanwhile: never go back to an older one
        ttl = self._finished_for if finished else self._fresh_for
        answer = Answer(version=version, expires=now + ttl, task=task)
        if ttl <= 0:
            self._answers.pop(task_id, None)
            return answer
        if task_id not in self._answers and len(self._answers) >= self._max_entries:
            self._evict(now)
        self._answers[task_id] = answer
        return answer

    def forget(self, task_id: str) -> None:
        self._answers.pop(task_id, None)

    def __len__(self) -> int:
        return len(self._answers)

    def _evict(self, now: float) -> None:
        self._answers = {k: v for k, v in self._answers.items() if v.expires > now}
        if len(self._answers) >= self._max_entries:
            self._answers.clear()


class _Row(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def mode(self) -> str: ...
    @property
    def size(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def error_code(self) -> str | None: ...
    @property
    def error(self) -> str | None: ...
    @property
    def revised_prompt(self) -> str | None: ...
    @property
    def created_at(self) -> float: ...
    @property
    def updated_at(self) -> float: ...


def public_task(row: _Row, *, prompt: str | None = None, remaining: int | None = None) -> Task:
    """The ledger row as a client sees it."""
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
