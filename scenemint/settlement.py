"""The task state machine: the one place that decides where a task goes and whether its
credit goes back. Pure: no I/O, no clock of its own, no store.

A ledger row is charged one credit when it is created. `decide(row, observation)` returns
the next state (a `Decision`, applied by the store with a write conditional on the row's
version), a `Resubmit` (the caller claims the row's lease and submits again), or None
(nothing to change). A row that reaches FAILED is refunded in the same write; that is the
only money movement after the charge, so "who refunds?" has one answer: the write of a
FAILED decision, which the store applies at most once per row.

    submitting ─Accepted/Seen─▶ queued ◀─▶ running ─Seen(completed)─▶ fetching ─Stored─▶ completed
        │  ▲                       │           │                         │
        │  └─ Unknown (kept)       └───────────┴─ Missing, Seen(failed), │ fetch deadline
        │                                         age limit              │ passed
        └─ Refused, not handed, Missing too old ─────────────────────────┴──▶ failed (refunded)

A task of a synchronous upstream (`kind = "sync"`: the OpenAI Images API) is a job: charged
`queued`, taken by a runner that writes `Sending` (running, `sent_at`) in the database
*before* it sends the request, then settled by the answer. A sync call cannot be asked
about later: a running job whose owner is gone, or whose call ended without an answer
(`Unknown`), is failed and refunded — never sent again.

    queued ─Sending─▶ running ─Stored─────────────▶ completed
      │                 ├─Generated(url)─▶ fetching (as above)
      │ age limit       └─Refused, Unknown, owner gone ─▶ failed (refunded)
      └──────────────────────────────────────────────▶ failed (refunded)

Several upstreams: a task belongs to the upstream that holds it (`row.upstream`). It moves on
to another one (`Decision.move_to`, written before anything is sent there) only when the one
it was sent to proved it made nothing, for a reason that is the upstream's, not the
request's — a refusal at submission (`Refused(fault=UPSTREAM)`: a key or account problem,
a missing model, 429, a 503, a refused connection, our breaker), a late failure about
capacity (`Seen` of a failed task whose `fault` is the upstream's), or a task the upstream
lost (`Missing` after it had it) — and while it is younger than the resubmit window, to the
upstream the caller offers (`alternative`, the router's next one it has not been sent to).
An unknown outcome never moves a task: whoever may still make the image is asked until it
answers. A task with nowhere to go fails and is refunded, once; a task of a synchronous
upstream that was sent may have been made (and paid for) and never moves either.

    submitting/queued/running ─Refused(upstream), failed for capacity, lost─▶ submitting
                              (at the next upstream; queued there for a sync upstream)

Completion includes the bytes: a task the upstream finished is `fetching` (shown as running)
until its image is in our image store; the lease holder copies it (`Stored`); a copy that
keeps failing (`FetchFailed`) fails the task and refunds it once `fetch_deadline` has passed
since the upstream finished.

Who may write what is decided by the lease in the row, never by how long ago something
happened: an answer to a submission is written only by the lease holder (`Guard.OWNER`);
what a listing says, the age limit and an abandoned row are written only when no live
lease is held (`Guard.FREE`). The request that charged a row keeps its lease until its
answer was sent, then writes `Delivered` (`handed_at`); a row whose answer never left and
whose owner is gone is refunded, whatever the upstream made of it — once `handoff_grace`
has passed since its lease ended, in which its client may come back with its
Idempotency-Key and take the row over.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Protocol


class State(StrEnum):
    SUBMITTING = "submitting"  # charged; the submission is in flight or its outcome unknown
    QUEUED = "queued"
    RUNNING = "running"
    FETCHING = "fetching"  # the upstream finished: its image is being copied into our store
    COMPLETED = "completed"
    FAILED = "failed"  # and refunded, in the same write


UNFINISHED = frozenset({State.SUBMITTING, State.QUEUED, State.RUNNING, State.FETCHING})
FINISHED = frozenset({State.COMPLETED, State.FAILED})


class Guard(StrEnum):
    OWNER = "owner"  # only the holder of the row's live lease may apply it
    FREE = "free"  # only while nobody holds a live lease on the row


class Fault(StrEnum):
    """Whose fault it is that an upstream made nothing (`upstream.router.judge` says)."""

    REQUEST = "request"  # no upstream would answer otherwise: the request fails
    UPSTREAM = "upstream"  # this upstream's: another one may make it


class ErrorCode(StrEnum):
    """Why a task failed. The public message is looked up by code (English or Chinese);
    only UPSTREAM carries the upstream's own text."""

    UPSTREAM = "generation_failed"  # the upstream said the generation failed
    REFUSED = "submit_refused"  # the upstream refused the submission
    NOT_DELIVERED = "not_delivered"  # the answer never reached the client
    LOST = "task_lost"  # the upstream never got it, and it is too old to send again
    EXPIRED = "task_expired"  # the upstream forgot it before it finished
    TIMED_OUT = "timed_out"  # unfinished after the age limit
    NO_IMAGE = "no_image"  # "completed" without an image (or with a URL we cannot fetch)
    IMAGE_UNAVAILABLE = "image_unavailable"  # its image could not be copied in time
    CONTENT_POLICY = "content_policy"  # the upstream refused the prompt (safety system)
    INTERRUPTED = "generation_interrupted"  # a sync generation ended without an answer
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
    @property
    def upstream_done_at(self) -> float | None: ...
    @property
    def fetch_attempts(self) -> int: ...
    @property
    def kind(self) -> str: ...  # "task" (an async task API) or "sync" (a job of ours)
    @property
    def upstream(self) -> str: ...  # the upstream that holds it


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
    @property
    def fault(self) -> Fault | None: ...  # whose fault a failure is, when it is known


# -- observations ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Accepted:
    """The upstream answered our submission with the task: it exists."""

    task: UpstreamView


@dataclass(frozen=True, slots=True)
class Refused:
    """An answer that proves the task was not created (a 4xx of the task API, a refused
    connection before anything was sent). `code` and `error` say why, when the upstream
    said (a content policy refusal, its own words); `fault` whether another upstream might
    make it."""

    detail: str = ""
    code: ErrorCode | None = None
    error: str | None = None
    fault: Fault = Fault.REQUEST


@dataclass(frozen=True, slots=True)
class Held:
    """A sync job's request did not leave: our own breaker for its upstream held it back,
    after attempts that all proved nothing was made. It goes back to the queue, unsent."""

    detail: str = ""


@dataclass(frozen=True, slots=True)
class Sending:
    """A request is about to leave for the row's upstream, written before it does: a runner
    took a sync job, or a task moved on to an upstream is sent there for the first time."""


@dataclass(frozen=True, slots=True)
class Generated:
    """A sync generation answered with the URL of its image (to be copied)."""

    image_url: str
    revised_prompt: str | None = None


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
class ImageRecord:
    """A task's image as our image store holds it."""

    key: str  # the SHA-256 of the bytes, as the store names it
    content_type: str
    size: int
    width: int
    height: int


@dataclass(frozen=True, slots=True)
class Stored:
    """The lease holder copied the task's image into our store (or, for a sync job, stored
    the image its generation answered with)."""

    image: ImageRecord
    revised_prompt: str | None = None


@dataclass(frozen=True, slots=True)
class FetchFailed:
    """The lease holder could not copy the image (this time; `final`: never, as when its
    URL is on an origin we may not fetch from)."""

    detail: str = ""
    final: bool = False


@dataclass(frozen=True, slots=True)
class Abandoned:
    """Looked at by someone who is not its owner: settle what no one will finish."""


@dataclass(frozen=True, slots=True)
class Delivered:
    """The owner's answer (the task id) left for the client: from now on the task is theirs.

    Written only after the answer was sent, never before: a crash in between leaves a row
    whose answer may not have arrived, and that row is refunded (the user's favour)."""


@dataclass(frozen=True, slots=True)
class ReferenceGone:
    """A resubmission is due but the edit's reference image is gone."""


Observation = (
    Accepted
    | Refused
    | Unknown
    | Seen
    | Missing
    | Abandoned
    | ReferenceGone
    | Stored
    | FetchFailed
    | Delivered
    | Sending
    | Generated
    | Held
)


# -- outcomes ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limits:
    resubmit_window: float  # a lost submission is sent again while younger than this
    task_max_age: float  # an unfinished task older than this fails
    fetch_deadline: float = 600.0  # an image not copied this long after the upstream finished
    fetch_backoff_max: float = 60.0  # the longest pause between two copy attempts
    # an answer that never left waits this long after its request ended (its lease lapsed or
    # was released) for the client to come back with its Idempotency-Key
    handoff_grace: float = 0.0


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
    image: ImageRecord | None = None  # the stored image (COMPLETED by Stored)
    upstream_done: bool = False  # the upstream finished with this write (FETCHING begins)
    retry_in: float | None = None  # keep the row unleased this long (a copy to try again)
    fetch_error: str | None = None  # why the last copy failed (for the log and operators)
    keep_lease: bool = False  # the owner keeps its lease (its answer has not left yet)
    sent: bool = False  # a request is about to leave for its upstream (sent_at is written)
    unsent: bool = False  # a sync job goes back to its queue (sent_at is cleared)
    move_to: str | None = None  # the upstream it moves on to (written before it is sent)
    move_kind: str | None = None  # its kind there: "task" or "sync"
    moved: str | None = None  # why it left the one it was at

    @property
    def refunds(self) -> bool:
        return self.state is State.FAILED


@dataclass(frozen=True, slots=True)
class Resubmit:
    """The upstream never got it and it is young: claim the lease and send it again."""


@dataclass(frozen=True, slots=True)
class Alternative:
    """The upstream a task may move on to (the router's next one it was not sent to)."""

    name: str
    kind: str  # "task" (an async task API) or "sync" (a job of ours)


Step = Decision | Resubmit | None


def fail(code: ErrorCode, guard: Guard, *, error: str | None = None) -> Decision:
    return Decision(State.FAILED, guard, error_code=code, error=error)


def move_on(
    row: Row, alternative: Alternative | None, guard: Guard, *, why: str, now: float, limits: Limits
) -> Decision | None:
    """The task goes to `alternative`, unsent there, if there is one and the task is young
    enough; None otherwise (the caller fails it). An owner who goes on sending it keeps its
    lease (`keep_lease`, the caller's to set)."""
    if alternative is None or alternative.name == row.upstream:
        return None
    if now - row.created_at >= limits.resubmit_window:
        return None
    state = State.QUEUED if alternative.kind == "sync" else State.SUBMITTING
    return Decision(
        state,
        guard,
        move_to=alternative.name,
        move_kind=alternative.kind,
        moved=why[:300] or "nothing was made",
    )


def decide(
    row: Row,
    observation: Observation,
    *,
    now: float,
    limits: Limits,
    hand: bool = False,
    alternative: Alternative | None = None,
) -> Step:
    """The next step for `row` given `observation` at `now` (the store's clock).

    `hand=True` when the caller answers the client with the result (the generate request);
    `alternative` is where the task may move on to, should the observation allow it.
    """
    state = State(row.state)
    if state in FINISHED:
        return None
    free = row.lease_until <= now
    handed = row.handed_at is not None  # `hand` only goes with the owner's own write
    if isinstance(observation, Delivered):
        return Decision(state, Guard.OWNER, hand=True)
    if not handed and free and isinstance(observation, Seen | Missing | Abandoned):
        # its owner is gone and its answer never left: whatever the upstream made of it,
        # once its client had the grace to come back with its key (and take it over)
        if now < row.lease_until + limits.handoff_grace:
            return None
        return fail(ErrorCode.NOT_DELIVERED, Guard.FREE)
    if state is State.FETCHING:
        return _fetching(row, observation, now=now, free=free, limits=limits)
    if row.kind == "sync":
        return _job(row, observation, now=now, free=free, limits=limits, alternative=alternative)
    match observation:
        case Accepted(task):
            if state is not State.SUBMITTING:
                return None
            return _from_upstream(
                row, task, Guard.OWNER, hand=hand, now=now, limits=limits, alternative=alternative
            )
        case Refused(detail, _, _, fault):
            if state is not State.SUBMITTING:
                return None
            if fault is Fault.UPSTREAM:
                moved = move_on(row, alternative, Guard.OWNER, why=detail, now=now, limits=limits)
                if moved is not None:
                    return moved
                if handed:  # a resubmission of the client's task: kept, tried again later
                    return Decision(State.SUBMITTING, Guard.OWNER)
            return fail(ErrorCode.REFUSED, Guard.OWNER)
        case Held(detail):
            if state is not State.SUBMITTING:
                return None
            moved = move_on(row, alternative, Guard.OWNER, why=detail, now=now, limits=limits)
            if moved is not None:
                return moved
            if handed:
                return Decision(State.SUBMITTING, Guard.OWNER)
            return fail(ErrorCode.REFUSED, Guard.OWNER)
        case Unknown():
            if state is not State.SUBMITTING:
                return None
            # keep the charge; whoever looks next asks the upstream (the listing is the truth)
            return Decision(State.SUBMITTING, Guard.OWNER, hand=hand)
        case Seen(task):
            if not free:
                return None
            return _from_upstream(
                row,
                task,
                Guard.FREE,
                hand=False,
                now=now,
                limits=limits,
                alternative=alternative,
                same_as=row,
            )
        case Missing():
            if not free:
                return None
            if state is State.SUBMITTING:
                if now - row.created_at < limits.resubmit_window:
                    return Resubmit()
                return fail(ErrorCode.LOST, Guard.FREE)
            # it had the task and lost it: nothing of it will come from there
            moved = move_on(
                row,
                alternative,
                Guard.FREE,
                why="the upstream lost the task",
                now=now,
                limits=limits,
            )
            return moved or fail(ErrorCode.EXPIRED, Guard.FREE)
        case Abandoned():
            if not free:
                return None
            if now - row.created_at > limits.task_max_age:
                return fail(ErrorCode.TIMED_OUT, Guard.FREE)
            return None
        case ReferenceGone():
            if state is not State.SUBMITTING:
                return None
            return fail(ErrorCode.REFERENCE_LOST, Guard.OWNER)
        case Sending():
            if state is not State.SUBMITTING:
                return None
            return Decision(State.SUBMITTING, Guard.OWNER, keep_lease=True, sent=True)
    return None


def _job(
    row: Row,
    observation: Observation,
    *,
    now: float,
    free: bool,
    limits: Limits,
    alternative: Alternative | None,
) -> Step:
    """A job of a synchronous upstream: sent at most once, never asked about later."""
    state = State(row.state)
    match observation:
        case Sending():
            if state is not State.QUEUED:
                return None
            return Decision(State.RUNNING, Guard.OWNER, keep_lease=True, sent=True)
        case Stored(image, revised):
            if state is not State.RUNNING:
                return None
            return Decision(State.COMPLETED, Guard.OWNER, image=image, revised_prompt=revised)
        case ReferenceGone():
            if state is not State.QUEUED:
                return None
            return fail(ErrorCode.REFERENCE_LOST, Guard.OWNER)
        case Generated(url, revised):
            if state is not State.RUNNING:
                return None
            if not url.startswith(("http://", "https://")):
                return fail(ErrorCode.NO_IMAGE, Guard.OWNER)
            return Decision(
                State.FETCHING,
                Guard.OWNER,
                image_url=url,
                revised_prompt=revised,
                upstream_done=True,
            )
        case Refused(detail, code, error, fault):
            if state is not State.RUNNING:
                return None
            if fault is Fault.UPSTREAM:  # every attempt proved nothing was made
                moved = move_on(row, alternative, Guard.OWNER, why=detail, now=now, limits=limits)
                if moved is not None:
                    return moved
            return fail(code or ErrorCode.REFUSED, Guard.OWNER, error=error)
        case Held(detail):
            if state is not State.RUNNING:
                return None
            moved = move_on(row, alternative, Guard.OWNER, why=detail, now=now, limits=limits)
            # nothing left: back in its queue, unsent, for when the breaker lets calls through
            return moved or Decision(State.QUEUED, Guard.OWNER, unsent=True)
        case Unknown():
            if state is not State.RUNNING:
                return None
            # it may have been generated (and paid for upstream); it is never sent again
            return fail(ErrorCode.INTERRUPTED, Guard.OWNER)
        case Abandoned():
            if not free:
                return None
            if state is State.RUNNING:
                return fail(ErrorCode.INTERRUPTED, Guard.FREE)  # its runner is gone
            if now - row.created_at > limits.task_max_age:
                return fail(ErrorCode.TIMED_OUT, Guard.FREE)
    return None


def _fetching(
    row: Row, observation: Observation, *, now: float, free: bool, limits: Limits
) -> Step:
    """A task whose upstream finished: only its image copy (or the fetch deadline) moves it."""
    since = row.upstream_done_at if row.upstream_done_at is not None else now
    too_late = now - since > limits.fetch_deadline
    match observation:
        case Stored(image, _):
            return Decision(State.COMPLETED, Guard.OWNER, image=image)
        case FetchFailed(detail, final):
            if too_late or final:
                return fail(ErrorCode.IMAGE_UNAVAILABLE, Guard.OWNER)
            pause = min(limits.fetch_backoff_max, 2.0 ** min(row.fetch_attempts, 16))
            return Decision(State.FETCHING, Guard.OWNER, retry_in=pause, fetch_error=detail)
        case Abandoned():
            if free and too_late:
                return fail(ErrorCode.IMAGE_UNAVAILABLE, Guard.FREE)
    return None


def _from_upstream(
    row: Row,
    task: UpstreamView,
    guard: Guard,
    *,
    hand: bool,
    now: float,
    limits: Limits,
    alternative: Alternative | None,
    same_as: Row | None = None,
) -> Step:
    """Where the upstream's view of a task takes the row."""
    if task.status == "failed":
        if task.fault is Fault.UPSTREAM:  # about capacity: another upstream may make it
            moved = move_on(row, alternative, guard, why=task.error or "", now=now, limits=limits)
            if moved is not None:
                return replace(moved, hand=hand)
        # the request's (its safety system), or not known: failed in the upstream's words
        return fail(ErrorCode.UPSTREAM, guard, error=task.error)
    if task.status == "completed":
        if not task.image_url or not task.image_url.startswith(("http://", "https://")):
            return fail(ErrorCode.NO_IMAGE, guard)
        return Decision(
            State.FETCHING,
            guard,
            image_url=task.image_url,
            revised_prompt=task.revised_prompt,
            hand=hand,
            upstream_done=True,
        )
    state = State.RUNNING if task.status == "running" else State.QUEUED
    if same_as is not None and same_as.state == state:
        return None  # nothing changed: no write, no new version
    return Decision(state, guard, revised_prompt=task.revised_prompt, hand=hand)
