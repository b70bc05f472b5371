"""The task state machine: the one place that decides where a task goes and whether its
credit goes back. Pure: no I/O, no clock of its own, no store.

A ledger row is charged one credit when it is created. `decide(row, observation)` returns
the next state (a `Decision`, applied by the store with a write conditional on the row's
version), a `Resubmit` (the caller claims the row's lease and submits again), or None
(nothing to change). A row that reaches FAILED is refunded in the same write; that is the
only money movement after the charge, so "who refunds?" has one answer: the write of a
FAILED decision, which the store applies at most once per row.

    submitting ──Accepted/Seen──▶ queued ◀──▶ running ──Seen(completed)──▶ completed
        │  ▲                        │            │
        │  └── Unknown (kept)       └────────────┴── Missing, Seen(failed), age limit ──┐
        └── Refused, not handed, Missing too old ──────────────────────────────────────┴─▶ failed
                                                                                      (refunded)

Who may write what is decided by the lease in the row, never by how long ago something
happened: an answer to a submission is written only by the lease holder (`Guard.OWNER`);
what a listing says, the age limit and an abandoned row are written only when no live
lease is held (`Guard.FREE`). A row whose answer never reached the client (`handed_at`
unset) and whose owner is gone is refunded, whatever the upstream made of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol


class State(StrEnum):
    SUBMITTING = "submitting"  # charged; the submission is in flight or its outcome unknown
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"  # and refunded, in the same write


UNFINISHED = frozenset({State.SUBMITTING, State.QUEUED, State.RUNNING})
FINISHED = frozenset({State.COMPLETED, State.FAILED})


class Guard(StrEnum):
    OWNER = "owner"  # only the holder of the row's live lease may apply it
    FREE = "free"  # only while nobody holds a live lease on the row


class ErrorCode(StrEnum):
    """Why a task failed. The public message is looked up by code (English or Chinese);
    only UPSTREAM carries the upstream's own text."""

    UPSTREAM = "generation_failed"  # the upstream said the generation failed
    REFUSED = "submit_refused"  # the upstream refused the submission
    NOT_DELIVERED = "not_delivered"  # the answer never reached the client
    LOST = "task_lost"  # the upstream never got it, and it is too old to send again
    EXPIRED = "task_expired"  # the upstream forgot it before it finished
    TIMED_OUT = "timed_out"  # unfinished after the age limit
    NO_IMAGE = "no_image"  # "completed" without an image
    REFERENCE_LOST = "reference_lost"  # an edit's reference image is gone, cannot resubmit


class Row(Protocol):
    """What the machine reads of a ledger row."""

    @property
    def state(self) -> str: ...
    @property
    def created_at(self) -> float: ...
    @property
    def handed_at(self) -> float | None: ...
    @property
    def lease_until(self) -> float: ...


class UpstreamView(Protocol):
    """What the machine reads of the upstream's task (see `models.UpstreamTask`)."""

    @property
    def status(self) -> str: ...
    @property
    def image_url(self) -> str | None: ...
    @property
    def revised_prompt(self) -> str | None: ...
    @property
    def error(self) -> str | None: ...


# -- observations ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Accepted:
    """The upstream answered our submission with the task: it exists."""

    task: UpstreamView


@dataclass(frozen=True, slots=True)
class Refused:
    """An answer that proves the task was not created (a 4xx of the task API, a refused
    connection before anything was sent)."""

    detail: str = ""


@dataclass(frozen=True, slots=True)
class Unknown:
    """The submission may or may not have created the task (5xx, timeout, reset, an answer
    we could not read, a shutdown in the middle)."""

    detail: str = ""


@dataclass(frozen=True, slots=True)
class Seen:
    """A listing, asked after the row was read, reports the task."""

    task: UpstreamView


@dataclass(frozen=True, slots=True)
class Missing:
    """A listing, asked after the row was read, says the upstream does not know the task."""


@dataclass(frozen=True, slots=True)
class Abandoned:
    """Looked at by someone who is not its owner: settle what no one will finish."""


@dataclass(frozen=True, slots=True)
class ReferenceGone:
    """A resubmission is due but the edit's reference image is gone."""


Observation = Accepted | Refused | Unknown | Seen | Missing | Abandoned | ReferenceGone


# -- outcomes ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limits:
    resubmit_window: float  # a lost submission is sent again while younger than this
    task_max_age: float  # an unfinished task older than this fails


@dataclass(frozen=True, slots=True)
class Decision:
    """One write: the next state and what changes with it. FAILED refunds."""

    state: State
    guard: Guard
    error_code: ErrorCode | None = None
    error: str | None = None  # the upstream's text, for ErrorCode.UPSTREAM
    image_url: str | None = None
    revised_prompt: str | None = None
    hand: bool = False  # the answer leaves for the client with this write

    @property
    def refunds(self) -> bool:
        return self.state is State.FAILED


@dataclass(frozen=True, slots=True)
class Resubmit:
    """The upstream never got it and it is young: claim the lease and send it again."""


Step = Decision | Resubmit | None


def fail(code: ErrorCode, guard: Guard, *, error: str | None = None) -> Decision:
    return Decision(State.FAILED, guard, error_code=code, error=error)


def decide(
    row: Row, observation: Observation, *, now: float, limits: Limits, hand: bool = False
) -> Step:
    """The next step for `row` given `observation` at `now` (the store's clock).

    `hand=True` when the caller answers the client with the result (the generate request).
    """
    state = State(row.state)
    if state in FINISHED:
        return None
    free = row.lease_until <= now
    handed = row.handed_at is not None  # `hand` only goes with the owner's own write
    match observation:
        case Accepted(task):
            if state is not State.SUBMITTING:
                return None
            return _from_upstream(task, Guard.OWNER, hand=hand, same_as=None)
        case Refused():
            if state is not State.SUBMITTING:
                return None
            return fail(ErrorCode.REFUSED, Guard.OWNER)
        case Unknown():
            if state is not State.SUBMITTING:
                return None
            # keep the charge; whoever looks next asks the upstream (the listing is the truth)
            return Decision(State.SUBMITTING, Guard.OWNER, hand=hand)
        case Seen(task):
            if not free:
                return None
            if state is State.SUBMITTING and not handed:
                return fail(ErrorCode.NOT_DELIVERED, Guard.FREE)
            return _from_upstream(task, Guard.FREE, hand=False, same_as=row)
        case Missing():
            if not free:
                return None
            if state is State.SUBMITTING:
                if not handed:
                    return fail(ErrorCode.NOT_DELIVERED, Guard.FREE)
                if now - row.created_at < limits.resubmit_window:
                    return Resubmit()
                return fail(ErrorCode.LOST, Guard.FREE)
            return fail(ErrorCode.EXPIRED, Guard.FREE)
        case Abandoned():
            if not free:
                return None
            if state is State.SUBMITTING and not handed:
                return fail(ErrorCode.NOT_DELIVERED, Guard.FREE)
            if now - row.created_at > limits.task_max_age:
                return fail(ErrorCode.TIMED_OUT, Guard.FREE)
            return None
        case ReferenceGone():
            if state is not State.SUBMITTING:
                return None
            return fail(ErrorCode.REFERENCE_LOST, Guard.OWNER)
    return None


def _from_upstream(task: UpstreamView, guard: Guard, *, hand: bool, same_as: Row | None) -> Step:
    """Where the upstream's view of a task takes the row."""
    if task.status == "failed":
        return fail(ErrorCode.UPSTREAM, guard, error=task.error)
    if task.status == "completed":
        if not task.image_url:
            return fail(ErrorCode.NO_IMAGE, guard)
        return Decision(
            State.COMPLETED,
            guard,
            image_url=task.image_url,
            revised_prompt=task.revised_prompt,
            hand=hand,
        )
    state = State.RUNNING if task.status == "running" else State.QUEUED
    if same_as is not None and same_as.state == state:
        return None  # nothing changed: no write, no new version
    return Decision(state, guard, revised_prompt=task.revised_prompt, hand=hand)
