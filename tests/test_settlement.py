"""The task state machine, exhaustively: every state × observation × lease × handed × age."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest

from scenemint.models import UpstreamTask
from scenemint.settlement import (
    FINISHED,
    Abandoned,
    Accepted,
    Decision,
    Delivered,
    ErrorCode,
    FetchFailed,
    Generated,
    Guard,
    ImageRecord,
    Limits,
    Missing,
    ReferenceGone,
    Refused,
    Resubmit,
    Seen,
    Sending,
    State,
    Stored,
    Unknown,
    decide,
)

NOW = 1_000_000.0
LIMITS = Limits(resubmit_window=600, task_max_age=1800, fetch_deadline=300)
IMAGE = ImageRecord(key="ab/ab" + "0" * 62, content_type="image/png", size=5, width=1, height=1)


@dataclass(frozen=True)
class Row:
    state: str
    created_at: float = NOW - 10
    handed_at: float | None = NOW - 9
    lease_until: float = 0.0
    upstream_done_at: float | None = None
    fetch_attempts: int = 0
    kind: str = "task"


def upstream(status: str, url: str | None = "http://u/x.png", error: str | None = None):
    return UpstreamTask(id="t", status=status, mode="text", image_url=url, error=error)


OBSERVATIONS = [
    Accepted(upstream("queued")),
    Accepted(upstream("running")),
    Accepted(upstream("completed")),
    Accepted(upstream("completed", url=None)),
    Accepted(upstream("failed", error="nope")),
    Refused("400"),
    Unknown("timeout"),
    Seen(upstream("queued")),
    Seen(upstream("running")),
    Seen(upstream("completed")),
    Seen(upstream("completed", url=None)),
    Seen(upstream("failed", error="nope")),
    Missing(),
    Abandoned(),
    ReferenceGone(),
    Stored(IMAGE),
    FetchFailed("HTTP 500"),
    FetchFailed("origin not allowed", final=True),
    Delivered(),
    Sending(),
    Generated("http://u/x.png"),
    Generated("/relative.png"),
    Refused("400", code=ErrorCode.CONTENT_POLICY, error="blocked"),
]
OWNER_OBSERVATIONS = (
    Accepted,
    Refused,
    Unknown,
    ReferenceGone,
    Stored,
    FetchFailed,
    Delivered,
    Sending,
    Generated,
)
ROWS = [
    Row(
        state=str(state),
        created_at=NOW - age,
        handed_at=handed,
        lease_until=lease,
        upstream_done_at=NOW - age / 2 if state is State.FETCHING else None,
        kind=kind,
    )
    for state, age, handed, lease, kind in itertools.product(
        State, (10, 700, 2000), (NOW - 9, None), (0.0, NOW - 1, NOW + 30), ("task", "sync")
    )
]


@pytest.mark.parametrize("row", ROWS, ids=repr)
def test_every_step_keeps_the_money_rules(row):
    for observation in OBSERVATIONS:
        for hand in (False, True):
            step = decide(row, observation, now=NOW, limits=LIMITS, hand=hand)
            free = row.lease_until <= NOW
            if State(row.state) in FINISHED:
                assert step is None, "a finished task never changes"
                continue
            if isinstance(step, Resubmit):
                assert row.state == State.SUBMITTING and free and row.handed_at is not None
                assert NOW - row.created_at < LIMITS.resubmit_window
                continue
            if step is None:
                continue
            assert isinstance(step, Decision)
            assert step.refunds == (step.state is State.FAILED)
            if step.refunds:
                assert step.error_code is not None, "a refund always says why"
            if isinstance(observation, OWNER_OBSERVATIONS):
                assert step.guard is Guard.OWNER
            else:
                assert step.guard is Guard.FREE and free, "others act only on a free row"
            if step.hand:
                assert hand or isinstance(observation, Delivered)
            if row.handed_at is None and step.guard is Guard.FREE:
                # nobody may follow the upstream for a task whose answer never left
                assert step.error_code is ErrorCode.NOT_DELIVERED
            if step.state is State.COMPLETED:
                assert step.image is not None, "completed means the image is ours"


@pytest.mark.parametrize("state", [State.QUEUED, State.RUNNING, State.SUBMITTING])
def test_a_task_completed_upstream_and_handed_is_fetched_never_refunded(state):
    row = Row(state=str(state))
    for observation in (Accepted(upstream("completed")), Seen(upstream("completed"))):
        step = decide(row, observation, now=NOW, limits=LIMITS)
        if isinstance(observation, Accepted) and state != State.SUBMITTING:
            assert step is None
            continue
        assert isinstance(step, Decision) and step.state is State.FETCHING
        assert step.upstream_done and step.image_url == "http://u/x.png"


def test_an_answer_that_never_left_is_refunded_whatever_the_upstream_says():
    row = Row(state="submitting", handed_at=None, lease_until=NOW - 1)
    for observation in (Seen(upstream("completed")), Seen(upstream("running")), Missing()):
        step = decide(row, observation, now=NOW, limits=LIMITS)
        assert isinstance(step, Decision)
        assert step.state is State.FAILED and step.error_code is ErrorCode.NOT_DELIVERED
    step = decide(row, Abandoned(), now=NOW, limits=LIMITS)
    assert isinstance(step, Decision) and step.error_code is ErrorCode.NOT_DELIVERED


def test_an_answer_that_never_left_waits_the_grace_for_its_client_then_is_refunded():
    """Its client may come back with its key and take it over: nobody refunds it before the
    grace has passed since its request ended (its lease), whatever the upstream says."""
    limits = Limits(resubmit_window=600, task_max_age=1800, handoff_grace=60)
    ended = NOW - 59
    row = Row(state="submitting", handed_at=None, lease_until=ended)
    for observation in (Seen(upstream("completed")), Missing(), Abandoned()):
        assert decide(row, observation, now=NOW, limits=limits) is None
        later = decide(row, observation, now=ended + 60, limits=limits)
        assert isinstance(later, Decision) and later.error_code is ErrorCode.NOT_DELIVERED


def test_a_live_lease_keeps_everyone_but_its_owner_out():
    row = Row(state="submitting", handed_at=None, lease_until=NOW + 5)
    for observation in (Seen(upstream("failed")), Missing(), Abandoned()):
        assert decide(row, observation, now=NOW, limits=LIMITS) is None
    owner = decide(row, Accepted(upstream("queued")), now=NOW, limits=LIMITS, hand=True)
    assert isinstance(owner, Decision) and owner.state is State.QUEUED and owner.hand


@pytest.mark.parametrize(
    ("observation", "state", "code"),
    [
        (Accepted(upstream("queued")), State.QUEUED, None),
        (Accepted(upstream("running")), State.RUNNING, None),
        (Accepted(upstream("completed")), State.FETCHING, None),
        (Accepted(upstream("completed", url="/relative.png")), State.FAILED, ErrorCode.NO_IMAGE),
        (Accepted(upstream("completed", url=None)), State.FAILED, ErrorCode.NO_IMAGE),
        (Accepted(upstream("failed")), State.FAILED, ErrorCode.UPSTREAM),
        (Refused("400"), State.FAILED, ErrorCode.REFUSED),
        (Unknown("504"), State.SUBMITTING, None),
        (ReferenceGone(), State.FAILED, ErrorCode.REFERENCE_LOST),
    ],
)
def test_what_a_submission_answer_does(observation, state, code):
    row = Row(state="submitting", handed_at=None, lease_until=NOW + 30)
    step = decide(row, observation, now=NOW, limits=LIMITS, hand=True)
    assert isinstance(step, Decision)
    assert (step.state, step.error_code, step.guard) == (state, code, Guard.OWNER)


def test_a_missing_task_is_resubmitted_while_young_then_refunded_as_lost():
    young = Row(state="submitting", created_at=NOW - 10)
    old = Row(state="submitting", created_at=NOW - 601)
    assert isinstance(decide(young, Missing(), now=NOW, limits=LIMITS), Resubmit)
    step = decide(old, Missing(), now=NOW, limits=LIMITS)
    assert isinstance(step, Decision) and step.error_code is ErrorCode.LOST


def test_a_task_the_upstream_forgot_is_refunded_as_expired():
    for state in ("queued", "running"):
        step = decide(Row(state=state), Missing(), now=NOW, limits=LIMITS)
        assert isinstance(step, Decision) and step.error_code is ErrorCode.EXPIRED


def test_the_age_limit_fails_any_unfinished_free_row():
    for state in ("submitting", "queued", "running"):
        old = Row(state=state, created_at=NOW - 1801)
        step = decide(old, Abandoned(), now=NOW, limits=LIMITS)
        assert isinstance(step, Decision) and step.error_code is ErrorCode.TIMED_OUT
        assert decide(Row(state=state), Abandoned(), now=NOW, limits=LIMITS) is None


def fetching(**values: object) -> Row:
    fields: dict = {"state": "fetching", "upstream_done_at": NOW - 10, "lease_until": NOW + 30}
    fields.update(values)
    return Row(**fields)


def test_a_stored_image_completes_the_task():
    step = decide(fetching(), Stored(IMAGE), now=NOW, limits=LIMITS)
    assert isinstance(step, Decision)
    assert (step.state, step.guard, step.image) == (State.COMPLETED, Guard.OWNER, IMAGE)


def test_a_failed_copy_is_tried_again_with_a_growing_pause_until_the_fetch_deadline():
    pauses = []
    for attempts in range(8):
        step = decide(fetching(fetch_attempts=attempts), FetchFailed("500"), now=NOW, limits=LIMITS)
        assert isinstance(step, Decision) and step.state is State.FETCHING
        assert not step.refunds and step.fetch_error == "500"
        pauses.append(step.retry_in)
    assert pauses == sorted(pauses) and pauses[0] == 1 and pauses[-1] == LIMITS.fetch_backoff_max
    late = fetching(upstream_done_at=NOW - 301)
    step = decide(late, FetchFailed("500"), now=NOW, limits=LIMITS)
    assert isinstance(step, Decision) and step.error_code is ErrorCode.IMAGE_UNAVAILABLE


def test_a_copy_that_can_never_work_fails_at_once():
    step = decide(fetching(), FetchFailed("forbidden", final=True), now=NOW, limits=LIMITS)
    assert isinstance(step, Decision) and step.error_code is ErrorCode.IMAGE_UNAVAILABLE


def test_the_fetch_deadline_not_the_age_limit_ends_a_fetching_task():
    old_task = fetching(created_at=NOW - 5000, upstream_done_at=NOW - 10, lease_until=0.0)
    assert decide(old_task, Abandoned(), now=NOW, limits=LIMITS) is None
    stalled = fetching(upstream_done_at=NOW - 301, lease_until=0.0)
    step = decide(stalled, Abandoned(), now=NOW, limits=LIMITS)
    assert isinstance(step, Decision) and step.error_code is ErrorCode.IMAGE_UNAVAILABLE
    assert step.guard is Guard.FREE
    assert decide(fetching(upstream_done_at=NOW - 301), Abandoned(), now=NOW, limits=LIMITS) is None


def test_delivery_hands_the_task_over_and_moves_no_money():
    for state in ("submitting", "queued", "running", "fetching"):
        step = decide(Row(state=state, handed_at=None), Delivered(), now=NOW, limits=LIMITS)
        assert isinstance(step, Decision)
        assert (step.state, step.hand, step.refunds) == (State(state), True, False)
    assert decide(Row(state="failed", handed_at=None), Delivered(), now=NOW, limits=LIMITS) is None


def test_nothing_changed_is_no_write():
    for state in ("queued", "running"):
        assert decide(Row(state=state), Seen(upstream(state)), now=NOW, limits=LIMITS) is None


# -- sync jobs (openai kind): sent at most once, never asked about later -------------------


def job(**values: object) -> Row:
    fields: dict = {"state": "queued", "kind": "sync", "lease_until": NOW + 30}
    fields.update(values)
    return Row(**fields)


def test_a_job_is_marked_sent_before_its_request_leaves():
    step = decide(job(), Sending(), now=NOW, limits=LIMITS)
    assert isinstance(step, Decision)
    assert (step.state, step.guard, step.sent, step.keep_lease) == (
        State.RUNNING,
        Guard.OWNER,
        True,
        True,
    )
    assert decide(job(state="running"), Sending(), now=NOW, limits=LIMITS) is None


def test_what_a_generation_answer_does_to_a_running_job():
    running = job(state="running")
    stored = decide(running, Stored(IMAGE, "a fox, red"), now=NOW, limits=LIMITS)
    assert isinstance(stored, Decision) and stored.state is State.COMPLETED
    assert stored.revised_prompt == "a fox, red"
    url = decide(running, Generated("https://cdn/x.png"), now=NOW, limits=LIMITS)
    assert isinstance(url, Decision) and url.state is State.FETCHING and url.upstream_done
    policy = decide(running, Refused("400", code=ErrorCode.CONTENT_POLICY), now=NOW, limits=LIMITS)
    assert isinstance(policy, Decision) and policy.error_code is ErrorCode.CONTENT_POLICY
    unknown = decide(running, Unknown("504"), now=NOW, limits=LIMITS)
    assert isinstance(unknown, Decision) and unknown.error_code is ErrorCode.INTERRUPTED


def test_a_job_whose_runner_is_gone_is_refunded_never_sent_again():
    gone = job(state="running", lease_until=NOW - 1)
    step = decide(gone, Abandoned(), now=NOW, limits=LIMITS)
    assert isinstance(step, Decision) and step.error_code is ErrorCode.INTERRUPTED
    # a job claimed but not yet sent is simply taken by the next runner
    assert decide(job(lease_until=NOW - 1), Abandoned(), now=NOW, limits=LIMITS) is None
    old = job(created_at=NOW - 1801, lease_until=0.0)
    step = decide(old, Abandoned(), now=NOW, limits=LIMITS)
    assert isinstance(step, Decision) and step.error_code is ErrorCode.TIMED_OUT


def test_a_job_is_never_asked_about_upstream():
    for state in ("queued", "running"):
        row = job(state=state, lease_until=0.0)
        for observation in (Seen(upstream("completed")), Missing()):
            assert decide(row, observation, now=NOW, limits=LIMITS) is None
