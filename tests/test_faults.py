"""Upstream faults: each one injected into the fake upstream (or the network) and answered
with a clear envelope error (or, for an ambiguous submission, a kept charge), in time,
without a lost or created credit, and without the key showing anywhere."""

from __future__ import annotations

import json
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from scenemint.errors import UpstreamError
from tests.conftest import FINGERPRINT, balance, check_in, make_settings
from tests.conftest import assert_envelope as shared_assert_envelope
from tests.fake_upstream import DEFAULT_API_KEY, FakeUpstream, make_png, noisy_png
from tests.service_runner import RunningService, free_port, running_service

GENERATIONS = "/api/image-tasks/generations"
LISTING = "/api/image-tasks"
CHAT = "/v1/chat/completions"
FILES = "/files/"
WRONG_KEY = "wrong-key-SECRET-5678"
SECRETS = (DEFAULT_API_KEY, WRONG_KEY)
MARGIN = 1.0  # seconds an answer may take beyond the configured timeout
TIMEOUT = 0.3  # submit and poll timeouts of the `service` fixture


# -- a service whose every answer, log line and metric is checked for the key ---------------


@pytest.fixture(autouse=True)
def no_key_in_logs(logs):
    """After every test of this file: the upstream key appears in no log line (nor traceback)."""
    yield
    text = logs.text()
    for secret in SECRETS:
        assert secret not in text


@contextmanager
def serve(tmp_path, upstream: FakeUpstream | None, **overrides: object) -> Iterator[RunningService]:
    """The real service; on a clean exit, checks answers, metrics and the credit audit."""
    settings = make_settings(tmp_path, upstream, **overrides)
    with running_service(settings) as running:
        answers: list[httpx.Response] = []
        running.http.event_hooks["response"].append(answers.append)
        yield running
        metrics = running.http.get("/metrics").text
        report = running.run(running.service.store.audit())
        for secret in SECRETS:
            assert secret not in metrics
            for answer in answers:
                assert secret not in str(answer.headers)
                try:
                    text = answer.text
                except httpx.ResponseNotRead:
                    continue  # a stream: its tests read and check it themselves
                assert secret not in text
        assert report.ok, report.violations


@pytest.fixture
def service(tmp_path, upstream, logs):
    """One submission attempt and short timeouts: each fault is seen exactly once, quickly."""
    with serve(
        tmp_path, upstream, submit_attempts=1, submit_timeout=TIMEOUT, poll_timeout=TIMEOUT
    ) as running:
        yield running


@pytest.fixture(scope="module")
def shared_upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture(scope="module")
def shared_service(tmp_path_factory, shared_upstream) -> Iterator[RunningService]:
    with serve(
        tmp_path_factory.mktemp("shared"),
        shared_upstream,
        submit_attempts=1,
        submit_timeout=TIMEOUT,
        poll_timeout=TIMEOUT,
        image_first_byte_timeout=TIMEOUT,
        image_idle_timeout=TIMEOUT,
        stream_idle_timeout=TIMEOUT,
        breaker_min_calls=1_000_000,  # faults of one case must not open the breaker for the next
    ) as running:
        yield running


@pytest.fixture
def shared(shared_service, shared_upstream, logs) -> Iterator[tuple[RunningService, str]]:
    """One service for the fault tables (starting one per case costs more than the case):
    the fake is reset around each case and each case has its own fingerprint."""
    shared_upstream.reset()
    fingerprint = f"fp-{uuid.uuid4().hex[:16]}"
    check_in(shared_service, fingerprint)
    try:
        yield shared_service, fingerprint
    finally:
        shared_upstream.reset()
        shared_upstream.api_key = DEFAULT_API_KEY


def generate(
    running: RunningService, prompt: str = "a red fox", fingerprint: str = FINGERPRINT
) -> httpx.Response:
    return running.http.post(
        "/api/images/generate", json={"prompt": prompt, "fingerprint": fingerprint}
    )


def generated(running: RunningService, fingerprint: str = FINGERPRINT) -> dict:
    answer = generate(running, fingerprint=fingerprint)
    assert answer.status_code == 200, answer.text
    return answer.json()["data"]


def ledger(running: RunningService, task_id: str):
    return running.run(running.service.store.get_task(task_id))


def audit(running: RunningService):
    return running.run(running.service.store.audit())


def assert_envelope(answer: httpx.Response, status: int, code: str) -> None:
    body = shared_assert_envelope(answer, status, code)
    assert "upstream exploded" not in body["message"]  # the upstream's words stay in the log


def timed(call: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    answer = call()
    return answer, time.monotonic() - started


def assert_refunded(running: RunningService, answer: httpx.Response) -> None:
    """A definite refusal: balance back at once, one charge, one refund, no row left pending."""
    assert balance(running) == 10
    report = audit(running)
    assert (report.charges, report.refunds) == (1, 1)
    assert report.tasks_by_state == {"failed": 1}
    assert "remainingCredits" not in answer.text


def assert_charge_kept_as_queued(running: RunningService, answer: httpx.Response) -> None:
    """An ambiguous outcome: the task may exist upstream, so the credit stays taken for now."""
    assert answer.status_code == 200, answer.text
    task = answer.json()["data"]
    assert task["status"] == "queued"
    assert task["remainingCredits"] == 9
    assert balance(running) == 9
    assert ledger(running, task["id"]).state == "submitting"
    report = audit(running)
    assert (report.charges, report.refunds) == (1, 0)


@contextmanager
def unaccepting_port() -> Iterator[int]:
    """A port whose accept queue is full: a new connection attempt hangs (connect timeout)."""
    server = socket.socket()
    fillers: list[socket.socket] = []
    try:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        probe = socket.socket()
        probe.settimeout(0.3)
        try:
            probe.connect(("127.0.0.1", port))
        except TimeoutError:
            pass
        else:
            pytest.skip("this kernel completes connections beyond a full accept queue")
        finally:
            probe.close()
        yield port
    finally:
        for filler in fillers:
            filler.close()
        server.close()


# -- submissions: connection-level faults (nothing reached an upstream) ----------------------


@pytest.mark.parametrize(
    "unreachable",
    [
        pytest.param(lambda: f"http://127.0.0.1:{free_port()}", id="connection-refused"),
        pytest.param(lambda: "http://scenemint-no-such-host.invalid:1", id="dns-failure"),
    ],
)
def test_unreachable_upstream_on_submit_answers_502_and_refunds(tmp_path, logs, unreachable):
    with serve(
        tmp_path,
        None,
        upstream_base_url=unreachable(),
        upstream_api_key=DEFAULT_API_KEY,
        submit_attempts=1,
    ) as svc:
        check_in(svc)
        answer = generate(svc)
        assert_envelope(answer, 502, "upstream_failed")
        assert_refunded(svc, answer)


def test_connect_timeout_on_submit_answers_504_in_time_and_refunds(tmp_path, logs):
    """Nothing was sent, so a connect timeout is a definite failure: refunded at once."""
    with (
        unaccepting_port() as port,
        serve(
            tmp_path,
            None,
            upstream_base_url=f"http://127.0.0.1:{port}",
            upstream_api_key=DEFAULT_API_KEY,
            connect_timeout=0.3,
            submit_timeout=10.0,
            submit_attempts=1,
        ) as svc,
    ):
        check_in(svc)
        answer, took = timed(lambda: generate(svc))
        assert_envelope(answer, 504, "upstream_timeout")
        assert took < 0.3 + MARGIN
        assert_refunded(svc, answer)


# -- submissions: faults of a reachable upstream ---------------------------------------------


@pytest.mark.parametrize(
    ("inject", "status", "code"),
    [
        pytest.param(lambda u: u.fail(GENERATIONS, status=400), 502, "upstream_failed", id="400"),
        pytest.param(lambda u: u.fail(GENERATIONS, status=422), 502, "upstream_failed", id="422"),
        pytest.param(
            lambda u: setattr(u, "api_key", "rotated-key"), 503, "upstream_unavailable", id="401"
        ),
    ],
)
def test_a_refused_submission_answers_an_error_and_refunds_at_once(
    service, upstream, inject, status, code
):
    check_in(service)
    inject(upstream)
    answer = generate(service)
    assert_envelope(answer, status, code)
    assert_refunded(service, answer)
    assert len(upstream.recorded(GENERATIONS)) == 1


@pytest.mark.parametrize(
    "inject",
    [
        pytest.param(lambda u: u.garbage(GENERATIONS), id="invalid-json"),
        pytest.param(lambda u: u.wrong_shape(GENERATIONS), id="wrong-shape"),
        pytest.param(
            lambda u: u.wrong_shape(
                GENERATIONS, payload={"id": "someone-else", "status": "queued"}
            ),
            id="another-task-id",
        ),
        pytest.param(lambda u: u.truncate(GENERATIONS), id="truncated"),
        pytest.param(lambda u: u.drop(GENERATIONS, after_processing=True), id="reset-after-send"),
        pytest.param(lambda u: u.fail(GENERATIONS, status=500), id="500"),
        pytest.param(lambda u: u.fail(GENERATIONS, status=502), id="502"),
        pytest.param(lambda u: u.fail(GENERATIONS, status=504), id="504"),
    ],
)
def test_an_unreadable_submission_answer_keeps_the_charge_for_the_reconciler(
    service, upstream, inject
):
    """The upstream may have accepted it: no refund (and no second task) until it is known."""
    check_in(service)
    inject(upstream)
    answer = generate(service)
    assert_charge_kept_as_queued(service, answer)


@pytest.mark.parametrize(
    "inject",
    [
        pytest.param(lambda u: u.delay(GENERATIONS, 3.0), id="read-timeout"),
        pytest.param(lambda u: u.never_end(GENERATIONS), id="never-ending"),
    ],
)
def test_a_submission_without_an_answer_ends_at_the_submit_timeout(service, upstream, inject):
    check_in(service)
    inject(upstream)
    answer, took = timed(lambda: generate(service))
    assert took < TIMEOUT + MARGIN
    assert_charge_kept_as_queued(service, answer)


def test_an_ambiguous_submission_is_settled_by_the_reconciler_without_a_lost_credit(
    service, upstream
):
    check_in(service)
    upstream.garbage(GENERATIONS, times=1)  # the answer was garbage and no task was created
    task = generate(service).json()["data"]
    deadline = time.monotonic() + 5
    while ledger(service, task["id"]).state != "queued":  # the reconciler acts at once
        assert time.monotonic() < deadline, "the reconciler did not resubmit"
        time.sleep(0.02)
    assert upstream.task(task["id"]) is not None
    upstream.fail_task(task["id"], "later failure")
    polled = service.http.get(f"/api/images/tasks/{task['id']}").json()["data"]
    assert polled["status"] == "failed"
    assert balance(service) == 10
    assert (audit(service).charges, audit(service).refunds) == (1, 1)


def test_a_wrong_key_is_logged_as_a_configuration_error(tmp_path, upstream, logs):
    with serve(tmp_path, upstream, upstream_api_key=WRONG_KEY) as svc:
        check_in(svc)
        answer = generate(svc)
        assert_envelope(answer, 503, "upstream_unavailable")
        assert_refunded(svc, answer)
        assert upstream.recorded(GENERATIONS)[0].authorization == f"Bearer {WRONG_KEY}"
    errors = [line for line in logs.lines if line.startswith("ERROR")]
    assert any("CHATGPT2API_API_KEY" in line and "401" in line for line in errors)


# -- retries -----------------------------------------------------------------------------------


@pytest.fixture
def retrying(tmp_path, upstream, logs):
    """The default retry policy (three submission attempts)."""
    with serve(tmp_path, upstream) as running:
        yield running


@pytest.mark.parametrize("status", [502, 503, 504])
def test_a_submission_retried_after_a_gateway_error_is_one_task_and_one_charge(
    retrying, upstream, status
):
    check_in(retrying)
    upstream.fail(GENERATIONS, status=status, times=1)
    task = generated(retrying)
    submissions = upstream.recorded(GENERATIONS)
    assert [s.json["client_task_id"] for s in submissions] == [task["id"], task["id"]]
    assert list(upstream.tasks) == [task["id"]]
    assert task["remainingCredits"] == 9 and balance(retrying) == 9
    assert audit(retrying).charges == 1 and audit(retrying).refunds == 0


def test_a_retry_waits_a_backoff_first(retrying, upstream):
    check_in(retrying)
    upstream.fail(GENERATIONS, status=503, times=2)
    generated(retrying)
    first, second, third = (s.received_at for s in upstream.recorded(GENERATIONS))
    assert second - first >= 0.1  # 0.2 s × jitter in [0.5, 1.5)
    assert third - second >= 0.2  # doubled


def test_a_submission_reset_after_the_upstream_created_it_is_retried_into_the_same_task(
    retrying, upstream
):
    check_in(retrying)
    upstream.drop(GENERATIONS, times=1, after_processing=True)
    task = generated(retrying)
    assert task["status"] == "queued"
    assert len(upstream.recorded(GENERATIONS)) == 2
    assert list(upstream.tasks) == [task["id"]]
    assert balance(retrying) == 9 and audit(retrying).charges == 1
    assert ledger(retrying, task["id"]).state == "queued"


def test_a_submission_dropped_before_processing_is_retried(retrying, upstream):
    check_in(retrying)
    upstream.drop(GENERATIONS, times=1)
    task = generated(retrying)
    assert len(upstream.recorded(GENERATIONS)) == 2
    assert list(upstream.tasks) == [task["id"]]


def test_a_submission_is_never_retried_on_a_4xx(retrying, upstream):
    check_in(retrying)
    upstream.fail(GENERATIONS, status=400, times=1)
    answer = generate(retrying)
    assert_envelope(answer, 502, "upstream_failed")
    assert len(upstream.recorded(GENERATIONS)) == 1
    assert_refunded(retrying, answer)


def test_a_submission_timeout_is_not_retried(tmp_path, upstream, logs):
    with serve(tmp_path, upstream, submit_timeout=0.3) as svc:
        check_in(svc)
        upstream.delay(GENERATIONS, 2.0, times=1)
        answer = generate(svc)
        assert_charge_kept_as_queued(svc, answer)
        assert len(upstream.recorded(GENERATIONS)) == 1


def test_gateway_errors_on_every_attempt_keep_the_charge_for_the_reconciler(retrying, upstream):
    """A gateway's 503 does not say the task was not created: the client gets its task."""
    check_in(retrying)
    upstream.fail(GENERATIONS, status=503)
    answer = generate(retrying)
    assert len(upstream.recorded(GENERATIONS)) == 3
    assert_charge_kept_as_queued(retrying, answer)


def test_a_generate_answers_within_the_submit_timeout_retries_included(tmp_path, upstream, logs):
    """Issue 9: never attempts × timeout; the whole submission is bounded by one timeout."""
    with serve(tmp_path, upstream, submit_timeout=1.0, submit_attempts=3) as svc:
        check_in(svc)
        upstream.delay(GENERATIONS, 0.6)
        upstream.fail(GENERATIONS, status=503)
        answer, took = timed(lambda: generate(svc))
        assert took < 1.0 + MARGIN
        assert_charge_kept_as_queued(svc, answer)


def test_a_poll_is_retried_once(service, upstream):
    check_in(service)
    task = generated(service)
    upstream.fail(LISTING, status=502, times=1)
    polled = service.http.get(f"/api/images/tasks/{task['id']}")
    assert polled.status_code == 200, polled.text
    assert polled.json()["data"]["status"] == "queued"
    assert len(upstream.recorded(LISTING, method="GET")) == 2


def test_a_poll_failing_twice_answers_502(service, upstream):
    check_in(service)
    task = generated(service)
    upstream.fail(LISTING, status=502, times=2)
    answer = service.http.get(f"/api/images/tasks/{task['id']}")
    assert_envelope(answer, 502, "upstream_failed")
    assert len(upstream.recorded(LISTING, method="GET")) == 2


def test_a_poll_is_not_retried_on_a_4xx(service, upstream):
    check_in(service)
    task = generated(service)
    upstream.fail(LISTING, status=404, times=1)
    assert_envelope(service.http.get(f"/api/images/tasks/{task['id']}"), 502, "upstream_failed")
    assert len(upstream.recorded(LISTING, method="GET")) == 1


# -- polls: every fault is an envelope error and moves no credit ------------------------------


@pytest.mark.parametrize(
    ("inject", "status", "code"),
    [
        pytest.param(lambda u: u.fail(LISTING, status=500), 502, "upstream_failed", id="500"),
        pytest.param(lambda u: u.fail(LISTING, status=503), 502, "upstream_failed", id="503"),
        pytest.param(
            lambda u: setattr(u, "api_key", "rotated-key"), 503, "upstream_unavailable", id="401"
        ),
        pytest.param(lambda u: u.garbage(LISTING), 502, "upstream_failed", id="invalid-json"),
        pytest.param(lambda u: u.wrong_shape(LISTING), 502, "upstream_failed", id="wrong-shape"),
        pytest.param(
            lambda u: u.wrong_shape(LISTING, payload={"items": [{"no": "id"}]}),
            502,
            "upstream_failed",
            id="item-without-id",
        ),
        pytest.param(lambda u: u.truncate(LISTING), 502, "upstream_failed", id="truncated"),
        pytest.param(lambda u: u.drop(LISTING), 502, "upstream_failed", id="reset"),
        pytest.param(lambda u: u.delay(LISTING, 3.0), 504, "upstream_timeout", id="read-timeout"),
        pytest.param(lambda u: u.never_end(LISTING), 504, "upstream_timeout", id="never-ending"),
    ],
)
def test_a_failed_poll_answers_an_error_in_time_and_moves_no_credit(
    shared, shared_upstream, inject, status, code
):
    running, fingerprint = shared
    task = generated(running, fingerprint)
    inject(shared_upstream)
    answer, took = timed(lambda: running.http.get(f"/api/images/tasks/{task['id']}"))
    assert_envelope(answer, status, code)
    assert took < TIMEOUT + MARGIN
    assert balance(running, fingerprint) == 9
    row = ledger(running, task["id"])
    assert row.state == "queued" and not row.refunded


def test_a_poll_of_an_unreachable_upstream_answers_502_and_moves_no_credit(service, upstream):
    check_in(service)
    task = generated(service)
    upstream.stop()
    answer, took = timed(lambda: service.http.get(f"/api/images/tasks/{task['id']}"))
    assert_envelope(answer, 502, "upstream_failed")
    assert took < TIMEOUT + MARGIN
    assert balance(service) == 9
    assert ledger(service, task["id"]).state == "queued"
    assert audit(service).refunds == 0


# -- the circuit breakers: one per upstream operation, opened by a failure rate -------------------


@pytest.fixture
def breaker(tmp_path, upstream, logs):
    settings = {
        "breaker_min_calls": 3,
        "breaker_failure_rate": 0.5,
        "breaker_cooldown": 0.5,
        "submit_attempts": 1,
    }
    with serve(tmp_path, upstream, **settings) as running:
        yield running


def open_submit_breaker(running: RunningService, upstream: FakeUpstream) -> None:
    """Fail submissions (each an unknown outcome: the charge is kept) until the breaker opens."""
    upstream.fail(GENERATIONS, status=500)
    for _ in range(3):
        answer = generate(running)
        if answer.status_code == 503:
            break
        assert answer.json()["data"]["status"] == "queued"
    upstream.clear_faults()
    assert running.service.router.client("default").http.breakers["submit"].is_open


def test_the_breaker_fails_fast_after_repeated_failures_without_spending(breaker, upstream):
    check_in(breaker)
    open_submit_breaker(breaker, upstream)
    assert len(upstream.recorded(GENERATIONS)) == 3
    answer, took = timed(lambda: generate(breaker))
    assert_envelope(answer, 503, "upstream_unavailable")
    assert took < 0.5  # no waiting on a timeout or a backoff
    assert len(upstream.recorded(GENERATIONS)) == 3  # not even tried
    assert balance(breaker) == 7
    assert audit(breaker).charges == 3  # the open breaker charged nothing


def test_the_breaker_lets_calls_through_after_the_cooldown(breaker, upstream):
    check_in(breaker)
    open_submit_breaker(breaker, upstream)
    assert_envelope(generate(breaker), 503, "upstream_unavailable")
    time.sleep(0.6)
    task = generated(breaker)
    assert task["remainingCredits"] == 6
    assert task["id"] in [r.json["client_task_id"] for r in upstream.recorded(GENERATIONS)]


def test_an_open_submit_breaker_leaves_polls_and_enhancements_alone(breaker, upstream):
    check_in(breaker)
    task = generated(breaker)
    open_submit_breaker(breaker, upstream)
    assert_envelope(generate(breaker), 503, "upstream_unavailable")
    polls_before = len(upstream.recorded(LISTING, method="GET"))
    answer = breaker.http.get(f"/api/images/tasks/{task['id']}")
    assert answer.status_code == 200, answer.text
    assert len(upstream.recorded(LISTING, method="GET")) == polls_before + 1
    enhance = breaker.http.post(
        "/api/prompts/enhance", json={"prompt": "a cat", "direction": "details"}
    )
    assert enhance.status_code == 200, enhance.text
    assert frames(enhance.text)[-1] == "data: [DONE]"


def test_failing_enhancements_never_block_generation(breaker, upstream):
    """The chat model being unreachable (a real chatgpt2api without its provider) opens the
    chat breaker only."""
    check_in(breaker)
    upstream.fail(CHAT, status=502)
    for _ in range(6):
        answer = breaker.http.post(
            "/api/prompts/enhance", json={"prompt": "a cat", "direction": "details"}
        )
        assert answer.status_code in (502, 503), answer.text
    assert answer.json()["error"] == "enhance_unavailable"  # the chat breaker is open
    task = generated(breaker)
    assert task["status"] == "queued"


def test_readiness_probes_never_count_toward_a_breaker(breaker, upstream):
    upstream.fail(LISTING, status=500)
    for _ in range(8):
        assert_envelope(breaker.http.get("/readyz"), 503, "not_ready")
    upstream.clear_faults()
    check_in(breaker)
    task = generated(breaker)
    assert breaker.http.get(f"/api/images/tasks/{task['id']}").status_code == 200


def test_a_thirty_percent_error_rate_does_not_open_the_breaker(tmp_path, upstream, logs):
    """Noise is not an outage: retries with the same client_task_id get the generations
    through, and the breaker, judging a rate over at least 20 calls, stays closed."""
    with serve(tmp_path, upstream, submit_attempts=3, breaker_cooldown=60) as svc:
        check_in(svc)
        check_in(svc, "other-fingerprint-2")
        upstream.fail(GENERATIONS, status=503, probability=0.3, seed=7)
        statuses = []
        for index in range(20):
            fingerprint = FINGERPRINT if index < 10 else "other-fingerprint-2"
            answer = svc.http.post(
                "/api/images/generate", json={"prompt": "a cat", "fingerprint": fingerprint}
            )
            statuses.append(answer.status_code)
        assert statuses.count(200) == 20, statuses
        assert len(upstream.recorded(GENERATIONS)) > 20  # some were retried
        assert svc.service.router.client("default").http.breakers["submit"].is_open is False


def test_client_errors_do_not_open_the_breaker(breaker, upstream):
    check_in(breaker)
    upstream.fail(GENERATIONS, status=400, times=4)
    for _ in range(4):
        assert_envelope(generate(breaker), 502, "upstream_failed")
    assert len(upstream.recorded(GENERATIONS)) == 4
    assert generate(breaker).status_code == 200


# -- separate timeouts ---------------------------------------------------------------------------


def test_the_poll_timeout_does_not_limit_submissions(tmp_path, upstream, logs):
    with serve(tmp_path, upstream, submit_timeout=3.0, poll_timeout=0.2) as svc:
        check_in(svc)
        upstream.delay(GENERATIONS, 0.4, times=1)
        task = generated(svc)
        assert ledger(svc, task["id"]).state == "queued"  # answered, not timed out
        upstream.delay(LISTING, 0.4, times=1)
        answer, took = timed(lambda: svc.http.get(f"/api/images/tasks/{task['id']}"))
        assert_envelope(answer, 504, "upstream_timeout")
        assert took < 0.2 + MARGIN


def test_the_submit_timeout_does_not_limit_polls(tmp_path, upstream, logs):
    with serve(tmp_path, upstream, submit_timeout=0.2, poll_timeout=3.0, submit_attempts=1) as svc:
        check_in(svc)
        task = generated(svc)
        upstream.delay(LISTING, 0.4, times=1)
        polled = svc.http.get(f"/api/images/tasks/{task['id']}")
        assert polled.status_code == 200, polled.text
        upstream.delay(GENERATIONS, 0.4, times=1)
        answer, took = timed(lambda: generate(svc))
        assert answer.json()["data"]["status"] == "queued"
        assert took < 0.2 + MARGIN
        assert ledger(svc, answer.json()["data"]["id"]).state == "submitting"


# -- images: copied into our store; a copy that keeps failing refunds at the fetch deadline -----

FETCH_DEADLINE = 1.0


def finished_task(
    running: RunningService,
    upstream: FakeUpstream,
    fingerprint: str = FINGERPRINT,
    **file_options: object,
) -> str:
    """A task the upstream finished with the image file `img-<id>` (made with file_options)."""
    task = generated(running, fingerprint)
    options = {"data": make_png(32, 32), **file_options}
    url = upstream.add_file(f"img-{task['id']}", **options)
    upstream.set_task(task["id"], status="success", data=[{"url": url}], error=None)
    return str(task["id"])


def settled(running: RunningService, task_id: str, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        task = running.http.get(f"/api/images/tasks/{task_id}").json()["data"]
        if task["status"] in ("completed", "failed") or time.monotonic() > deadline:
            return task
        time.sleep(0.02)


def assert_refunded_for_its_image(running: RunningService, task_id: str, fingerprint: str) -> None:
    task = settled(running, task_id)
    assert task["status"] == "failed", task
    assert ledger(running, task_id).error_code == "image_unavailable"
    assert balance(running, fingerprint) == 10
    assert_envelope(running.http.get(f"/api/images/tasks/{task_id}/image"), 404, "image_not_ready")


@pytest.fixture
def copies(tmp_path, upstream, logs) -> Iterator[RunningService]:
    with serve(
        tmp_path,
        upstream,
        image_fetch_deadline=FETCH_DEADLINE,
        image_first_byte_timeout=TIMEOUT,
        image_idle_timeout=TIMEOUT,
    ) as running:
        check_in(running)
        yield running


@pytest.mark.parametrize(
    "inject",
    [
        pytest.param(lambda u: u.fail(FILES, status=500), id="500"),
        pytest.param(lambda u: u.fail(FILES, status=404), id="404"),
        pytest.param(lambda u: u.drop(FILES), id="reset"),
        pytest.param(lambda u: u.delay(FILES, 3.0), id="first-byte"),
        pytest.param(lambda u: u.truncate(FILES), id="truncated"),
        pytest.param(lambda u: u.garbage(FILES), id="garbage"),
    ],
)
def test_an_image_that_cannot_be_copied_fails_its_task_at_the_fetch_deadline(
    copies, upstream, inject
):
    """Every attempt ends within its own limits; the task is running meanwhile (the user
    never sees a completed task without its image), then failed and refunded."""
    inject(upstream)
    started = time.monotonic()
    task_id = finished_task(copies, upstream)
    assert_refunded_for_its_image(copies, task_id, FINGERPRINT)
    assert time.monotonic() - started < FETCH_DEADLINE + 2 * TIMEOUT + 2 * MARGIN
    assert not list((copies.settings.data_dir / "images").rglob("*.*"))


def test_an_image_host_that_goes_down_fails_its_task_in_time(copies, upstream):
    task_id = finished_task(copies, upstream)
    upstream.hold(FILES)  # the first copy waits on the upstream...
    copies.http.get(f"/api/images/tasks/{task_id}")
    upstream.stop()  # ...which goes away
    started = time.monotonic()
    assert settled(copies, task_id)["status"] == "failed"
    assert time.monotonic() - started < FETCH_DEADLINE + 2 * TIMEOUT + 2 * MARGIN
    assert balance(copies) == 10


def test_an_image_that_stalls_mid_body_is_cut_after_the_idle_gap(copies, upstream):
    task_id = finished_task(
        copies, upstream, data=noisy_png(50, 50), chunk_size=1000, chunk_delay=3.0
    )
    started = time.monotonic()
    assert_refunded_for_its_image(copies, task_id, FINGERPRINT)
    assert time.monotonic() - started < FETCH_DEADLINE + 2 * TIMEOUT + 2 * MARGIN


def test_image_first_byte_and_idle_gap_have_their_own_limits(tmp_path, upstream, logs):
    """A slow first byte within its own limit is fine even when it exceeds the idle gap."""
    with serve(tmp_path, upstream, image_first_byte_timeout=3.0, image_idle_timeout=0.3) as svc:
        check_in(svc)
        upstream.delay(FILES, 0.8, times=1)
        task_id = finished_task(svc, upstream)
        assert settled(svc, task_id)["status"] == "completed"
        assert len(upstream.recorded(FILES)) == 1  # the first attempt made it
    with serve(
        tmp_path / "b", upstream, image_first_byte_timeout=0.3, image_idle_timeout=3.0
    ) as svc:
        check_in(svc)
        upstream.reset()
        upstream.delay(FILES, 0.8, times=1)
        task_id = finished_task(svc, upstream)
        assert settled(svc, task_id)["status"] == "completed"
        assert len(upstream.recorded(FILES)) == 2  # the first attempt timed out, then one more
        metrics = svc.http.get("/metrics").text
        failures = (
            'scenemint_upstream_failures_total{kind="image",reason="timeout",upstream="default"}'
        )
        assert f"{failures} 1.0" in metrics


# -- prompt enhancement ------------------------------------------------------------------------


def enhance(running: RunningService) -> httpx.Response:
    return running.http.post(
        "/api/prompts/enhance", json={"prompt": "a lighthouse", "direction": "details"}
    )


def frames(body: str) -> list[str]:
    return [block for block in body.split("\n\n") if block]


ERROR_FRAME = (
    'data: {"error": {"message": "The prompt enhancement stream was interrupted.",'
    ' "code": "enhance_interrupted"}}'
)


@pytest.mark.parametrize(
    ("inject", "status", "code"),
    [
        pytest.param(lambda u: u.fail(CHAT, status=500), 502, "enhance_failed", id="500"),
        pytest.param(lambda u: u.fail(CHAT, status=400), 502, "enhance_failed", id="400"),
        pytest.param(
            lambda u: setattr(u, "api_key", "rotated-key"), 503, "enhance_unavailable", id="401"
        ),
        pytest.param(
            lambda u: setattr(u, "chat_content_type", "application/json"),
            502,
            "enhance_failed",
            id="not-event-stream",
        ),
        pytest.param(lambda u: u.drop(CHAT), 502, "enhance_failed", id="reset"),
        pytest.param(lambda u: u.delay(CHAT, 3.0), 504, "enhance_timeout", id="no-headers"),
    ],
)
def test_an_enhancement_refused_before_streaming_is_an_envelope_error(
    shared, shared_upstream, inject, status, code
):
    running, _ = shared
    inject(shared_upstream)
    answer, took = timed(lambda: enhance(running))
    assert_envelope(answer, status, code)
    assert took < TIMEOUT + MARGIN


@pytest.mark.parametrize(
    "inject",
    [
        pytest.param(lambda u: setattr(u, "chat_fail_after", 2), id="cut-mid-stream"),
        pytest.param(lambda u: setattr(u, "chat_fail_after", 4), id="cut-before-done"),
        pytest.param(lambda u: u.garbage(CHAT), id="invalid-json-frame"),
        pytest.param(lambda u: u.wrong_shape(CHAT), id="wrong-shape-frame"),
    ],
)
def test_an_enhancement_failing_mid_stream_ends_with_an_error_frame_and_done(
    shared, shared_upstream, inject
):
    running, _ = shared
    inject(shared_upstream)
    answer = enhance(running)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/event-stream")
    blocks = frames(answer.text)
    assert blocks[-2:] == [ERROR_FRAME, "data: [DONE]"]
    for block in blocks[:-2]:
        assert json.loads(block.removeprefix("data: "))["object"] == "chat.completion.chunk"


def test_a_silent_stream_ends_with_an_error_frame_after_the_idle_gap(tmp_path, upstream, logs):
    with serve(tmp_path, upstream, stream_idle_timeout=0.4) as svc:
        upstream.never_end(CHAT)
        answer, took = timed(lambda: enhance(svc))
        assert took < 0.4 + MARGIN
        blocks = frames(answer.text)
        assert json.loads(blocks[0].removeprefix("data: "))["choices"][0]["delta"]["content"]
        assert blocks[-2:] == [ERROR_FRAME, "data: [DONE]"]


def test_slow_chunks_within_the_idle_gap_are_not_cut(tmp_path, upstream, logs):
    with serve(tmp_path, upstream, stream_idle_timeout=0.6) as svc:
        upstream.chat_chunk_delay = 0.15
        blocks = frames(enhance(svc).text)
        assert blocks[-1] == "data: [DONE]"
        assert ERROR_FRAME not in blocks
        assert len(blocks) == 6  # four chunks, the stop chunk, [DONE]


def test_a_stream_sends_ping_comments_during_upstream_silence(tmp_path, upstream, logs):
    with serve(tmp_path, upstream, stream_ping_interval=0.1) as svc:
        upstream.chat_chunk_delay = 0.35
        blocks = frames(enhance(svc).text)
        pings = [i for i, block in enumerate(blocks) if block == ": ping"]
        assert len(pings) >= 3
        data = [i for i, block in enumerate(blocks) if block.startswith("data: {")]
        assert pings[0] > data[0] and pings[-1] < data[-1]  # between frames
        assert blocks[-1] == "data: [DONE]"
        text = "".join(
            json.loads(blocks[i].removeprefix("data: "))["choices"][0]["delta"].get("content", "")
            for i in data
        )
        assert text == "A lighthouse at dusk"


def test_no_pings_when_the_upstream_is_quick(service, upstream):
    assert ": ping" not in enhance(service).text


def test_a_client_that_disconnects_closes_the_upstream_stream_within_a_second(service, upstream):
    upstream.chat_chunk_delay = 30.0
    with service.http.stream(
        "POST", "/api/prompts/enhance", json={"prompt": "a lighthouse", "direction": "details"}
    ) as answer:
        assert answer.status_code == 200
        first = next(answer.iter_lines())
        assert first.startswith("data: {")
    assert upstream.stream_closed.wait(1.0)
    gauge = 'scenemint_open_streams{kind="enhance"} 0.0'
    deadline = time.monotonic() + 2
    while gauge not in service.http.get("/metrics").text:
        assert time.monotonic() < deadline, "the open-stream gauge did not go back to 0"
        time.sleep(0.05)


# -- the key never leaks ----------------------------------------------------------------------


def test_an_upstream_echoing_our_key_is_redacted_in_logs_and_exceptions(service, upstream, logs):
    check_in(service)
    echo = f'{{"error": "bad key Bearer {DEFAULT_API_KEY}"}}'
    upstream.fail(GENERATIONS, status=400, body=echo)
    answer = generate(service)
    assert_envelope(answer, 502, "upstream_failed")
    assert DEFAULT_API_KEY not in answer.text
    assert any("[redacted]" in line for line in logs.lines)

    client = service.service.router.client("default")
    with pytest.raises(UpstreamError) as caught:
        service.run(client.submit_generation(task_id=str(uuid.uuid4()), prompt="a fox", size="1:1"))
    text = "".join(traceback.format_exception(caught.value)) + repr(caught.value)
    assert "[redacted]" in caught.value.detail
    assert DEFAULT_API_KEY not in text


def test_a_json_answer_arriving_in_pieces_is_read_whole(tmp_path, logs):
    """A slow but healthy upstream: the body comes in two writes 0.2 s apart."""
    missing = [str(uuid.uuid4()) for _ in range(20)]
    body = json.dumps({"items": [], "missing_ids": missing}).encode()

    class Slow(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:100])
            self.wfile.flush()
            time.sleep(0.2)
            self.wfile.write(body[100:])

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        with serve(tmp_path, None, upstream_base_url=base, upstream_api_key=DEFAULT_API_KEY) as svc:
            answer = svc.http.get("/readyz")
            assert answer.status_code == 200, answer.text
    finally:
        server.shutdown()
        server.server_close()
