"""GET /api/images/tasks/{id}: the public task shape, mapped from the upstream's task state."""

from __future__ import annotations

import datetime as dt
import threading
import uuid

import pytest

from tests.conftest import FINGERPRINT, balance, check_in, wait_finished
from tests.fake_upstream import TINY_PNG, FakeUpstream
from tests.service_runner import RunningService

LISTING = "/api/image-tasks"
MISSING_ERROR = "task not found or expired"
FORGOTTEN_ERROR = (
    "The image service lost this task before it finished (it may have restarted)."
    " Your credit was returned."
)
OPTIONAL = ("image", "error", "revisedPrompt", "prompt", "remainingCredits")


def generate(service: RunningService, prompt: str = "a red fox") -> dict:
    answer = service.http.post(
        "/api/images/generate", json={"prompt": prompt, "size": "16:9", "fingerprint": FINGERPRINT}
    )
    assert answer.status_code == 200, answer.text
    return answer.json()["data"]


def generate_edit(service: RunningService) -> dict:
    answer = service.http.post(
        "/api/images/generate",
        data={"prompt": "make it blue", "size": "1:1", "fingerprint": FINGERPRINT},
        files={"image": ("ref.png", TINY_PNG, "image/png")},
    )
    assert answer.status_code == 200, answer.text
    return answer.json()["data"]


def poll(service: RunningService, task_id: str) -> dict:
    answer = service.http.get(f"/api/images/tasks/{task_id}")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["code"] == 0
    return body["data"]


def polls_sent(upstream: FakeUpstream) -> int:
    return len(upstream.recorded(LISTING, method="GET"))


def is_rfc3339(value: str) -> bool:
    parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed.tzinfo is not None and "T" in value


# -- status and mode mapping -------------------------------------------------------------


@pytest.mark.parametrize(
    ("upstream_status", "public_status"),
    [("queued", "queued"), ("running", "running"), ("weird", "queued"), ("", "queued")],
)
def test_unfinished_upstream_statuses_map_to_queued_or_running(
    service, upstream, upstream_status, public_status
):
    check_in(service)
    task = generate(service)
    upstream.set_task(task["id"], status=upstream_status)
    polled = poll(service, task["id"])
    assert polled["status"] == public_status
    assert "image" not in polled
    assert "error" not in polled


@pytest.mark.parametrize("upstream_status", ["success", "completed"])
def test_success_and_completed_map_to_completed_with_an_image_path(
    service, upstream, upstream_status
):
    check_in(service)
    task = generate(service)
    url = upstream.add_file("done.png", TINY_PNG)
    upstream.set_task(
        task["id"], status=upstream_status, data=[{"url": url, "revised_prompt": "a fox, red"}]
    )
    polled = wait_finished(service, task["id"])
    assert polled["status"] == "completed"
    assert polled["image"] == f"/api/images/tasks/{task['id']}/image"
    assert polled["revisedPrompt"] == "a fox, red"
    assert "error" not in polled
    assert url not in str(polled)  # the upstream URL is never shown


@pytest.mark.parametrize("upstream_status", ["error", "failed"])
def test_error_and_failed_map_to_failed_with_the_upstream_error_text(
    service, upstream, upstream_status
):
    check_in(service)
    task = generate(service)
    upstream.set_task(task["id"], status=upstream_status, error="content policy violation")
    polled = poll(service, task["id"])
    assert polled["status"] == "failed"
    assert polled["error"] == "content policy violation"
    assert "image" not in polled


def test_an_edit_task_is_mode_image(service, upstream):
    check_in(service)
    task = generate_edit(service)
    assert task["mode"] == "image"
    assert upstream.task(task["id"])["mode"] == "edit"
    assert poll(service, task["id"])["mode"] == "image"


def test_a_text_task_is_mode_text_whatever_the_upstream_says(service, upstream):
    """The ledger knows what we submitted; an upstream claiming "edit" does not change it."""
    check_in(service)
    task = generate(service)
    assert task["mode"] == "text"
    upstream.set_task(task["id"], mode="edit", status="running")
    polled = poll(service, task["id"])
    assert polled["mode"] == "text"
    assert polled["status"] == "running"


def test_revised_prompt_comes_from_the_first_image(service, upstream):
    check_in(service)
    task = generate(service)
    first = upstream.add_file("one.png", TINY_PNG)
    second = upstream.add_file("two.png", TINY_PNG)
    upstream.set_task(
        task["id"],
        status="success",
        data=[{"url": first, "revised_prompt": "first"}, {"url": second, "revised_prompt": "x"}],
    )
    assert poll(service, task["id"])["revisedPrompt"] == "first"


def test_empty_optional_fields_are_omitted(service, upstream):
    check_in(service)
    task = generate(service)
    polled = poll(service, task["id"])
    assert polled["status"] == "queued"
    for name in OPTIONAL:
        assert name not in polled, name
    assert None not in polled.values()
    assert set(polled) == {"id", "mode", "size", "status", "createdAt", "updatedAt"}
    assert polled["size"] == "16:9"


def test_timestamps_are_ours_whatever_the_upstream_writes(service, upstream):
    """createdAt/updatedAt come from our ledger: an upstream in UTC+8 writing naive local
    times, or garbage, changes nothing (issue 9, defect 9 and 4)."""
    upstream.naive_timestamps = True
    check_in(service)
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    task = generate(service)
    eight_hours_ahead = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=8)).strftime(
        "%Y-%m-%d %H:%M:%S"
    )
    upstream.set_task(
        task["id"],
        status="running",
        created_at=eight_hours_ahead,
        updated_at="9999-12-31T23:59:59-01:00",
    )
    polled = poll(service, task["id"])
    assert polled["status"] == "running"
    after = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
    for field in ("createdAt", "updatedAt"):
        assert is_rfc3339(polled[field]), polled
        moment = dt.datetime.fromisoformat(polled[field].replace("Z", "+00:00"))
        assert before <= moment <= after, polled
    assert polled["createdAt"] == task["createdAt"]
    upstream.set_task(task["id"], status="error", created_at=1_700_000_000_000, error="nope")
    failed = poll(service, task["id"])
    assert failed["status"] == "failed" and failed["error"] == "nope"
    assert balance(service) == 10


def test_generate_answer_timestamps_are_rfc3339(service, upstream):
    upstream.naive_timestamps = True
    check_in(service)
    task = generate(service)
    assert is_rfc3339(task["createdAt"])
    assert is_rfc3339(task["updatedAt"])


# -- the upstream poll -------------------------------------------------------------------


def test_poll_asks_the_upstream_by_id_with_the_key(service, upstream):
    check_in(service)
    task = generate(service)
    before = polls_sent(upstream)
    poll(service, task["id"])
    sent = upstream.recorded(LISTING, method="GET")
    assert len(sent) == before + 1
    request = sent[-1]
    assert request.path == "/api/image-tasks"
    assert request.query == {"ids": task["id"]}
    assert request.authorization == f"Bearer {upstream.api_key}"


# -- the "missing" shape -----------------------------------------------------------------


def test_a_task_the_upstream_forgot_fails_and_is_refunded(service, upstream):
    check_in(service)
    task = generate(service)
    assert balance(service) == 9
    upstream.forget_task(task["id"])
    polled = poll(service, task["id"])
    assert polled["id"] == task["id"]
    assert polled["status"] == "failed"
    # ours: what happened, and that the credit came back (not the words for a stranger's id)
    assert polled["error"] == FORGOTTEN_ERROR
    assert "image" not in polled
    assert balance(service) == 10


def test_an_id_a_listing_leaves_out_is_unknown_not_missing(service, upstream):
    """A partial (or paginated) listing names the id in neither `items` nor `missing_ids`:
    that proves nothing. Neither a poll nor the reconciler fails or refunds the task."""
    check_in(service)
    task = generate(service)
    upstream.wrong_shape(LISTING, payload={"items": [], "missing_ids": []})
    answer = service.http.get(f"/api/images/tasks/{task['id']}")
    assert answer.status_code == 502  # what a listing that did not answer gets
    service.run(service.app.state.reconciler.run_once())
    assert service.run(service.service.store.get_task(task["id"])).state == "queued"
    assert balance(service) == 9
    upstream.clear_faults()
    upstream.complete_task(task["id"], image=TINY_PNG)
    assert wait_finished(service, task["id"])["status"] == "completed"
    assert balance(service) == 9


def test_an_id_we_never_created_answers_missing_without_asking_upstream(service, upstream):
    unknown = str(uuid.uuid4())
    before = len(upstream.requests)
    answer = service.http.get(f"/api/images/tasks/{unknown}")
    assert answer.status_code == 200
    assert answer.json() == {
        "code": 0,
        "message": "ok",
        "data": {"id": unknown, "mode": "text", "status": "failed", "error": MISSING_ERROR},
    }
    assert len(upstream.requests) == before


@pytest.mark.parametrize("bad_id", ["not-a-uuid", "12345", "x" * 36, "DROP%20TABLE"])
def test_a_non_uuid_id_answers_missing_without_asking_upstream(service, upstream, bad_id):
    answer = service.http.get(f"/api/images/tasks/{bad_id}")
    assert answer.status_code == 200
    data = answer.json()["data"]
    assert data["mode"] == "text"
    assert data["status"] == "failed"
    assert data["error"] == MISSING_ERROR
    assert set(data) == {"id", "mode", "status", "error"}
    assert upstream.requests == []


def test_an_empty_id_answers_missing_like_any_id_that_is_not_ours(service, upstream):
    """One implementation of the task routes: the empty id is one more id not ours."""
    answer = service.http.get("/api/images/tasks/")
    assert answer.status_code == 200
    assert answer.json()["data"] == {
        "id": "",
        "mode": "text",
        "status": "failed",
        "error": MISSING_ERROR,
    }
    assert service.http.get("/api/images/tasks//image").json()["error"] == "image_not_ready"
    assert upstream.requests == []


@pytest.mark.parametrize(
    ("path", "allow"),
    [
        (f"/api/images/tasks/{uuid.uuid4()}", "GET, HEAD"),
        (f"/api/images/tasks/{uuid.uuid4()}/image", "GET, HEAD"),
        (f"/api/images/tasks/{uuid.uuid4()}/events", "GET, HEAD"),
    ],
)
def test_the_wrong_method_on_a_task_route_is_405_saying_what_is_allowed(service, path, allow):
    for method in ("POST", "PUT", "DELETE"):
        answer = service.http.request(method, path)
        assert answer.status_code == 405
        assert answer.json()["error"] == "method_not_allowed"
        assert answer.headers["allow"] == allow


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "task", "events"])
def test_head_answers_what_a_get_would_without_a_body(service, upstream, path):
    """RFC 9110: a server that supports GET on a resource supports HEAD on it too."""
    check_in(service)
    task = generate(service)
    url = {
        "task": f"/api/images/tasks/{task['id']}",
        "events": f"/api/images/tasks/{task['id']}/events",
    }
    path = url.get(path, path)
    head = service.http.head(path)
    assert head.status_code in (200, 503) and head.content == b""
    if path.endswith("/events"):
        assert head.status_code == 200
        assert head.headers["content-type"].startswith("text/event-stream")
        return
    get = service.http.get(path)
    assert head.status_code == get.status_code
    assert head.headers["content-type"] == get.headers["content-type"]
    if "tasks" in path:
        assert int(head.headers["content-length"]) == len(get.content)


def test_an_upper_case_spelling_of_our_id_is_not_sent_upstream(service, upstream):
    check_in(service)
    task = generate(service)
    before = polls_sent(upstream)
    data = service.http.get(f"/api/images/tasks/{task['id'].upper()}").json()["data"]
    assert data["status"] == "failed"
    assert data["error"] == MISSING_ERROR
    assert polls_sent(upstream) == before
    assert balance(service) == 9  # our real task was not touched


# -- finished tasks come from the ledger --------------------------------------------------


def test_a_completed_task_is_answered_from_the_ledger(service, upstream):
    check_in(service)
    task = generate(service)
    upstream.complete_task(task["id"], revised_prompt="a fox")
    first = wait_finished(service, task["id"])
    assert first["status"] == "completed"
    sent = polls_sent(upstream)
    upstream.forget_task(task["id"])  # even a forgetful upstream cannot change it now
    for _ in range(3):
        again = poll(service, task["id"])
        assert again == first
    assert polls_sent(upstream) == sent
    assert balance(service) == 9


def test_a_failed_task_is_answered_from_the_ledger(service, upstream):
    check_in(service)
    task = generate(service)
    upstream.fail_task(task["id"], error="nope")
    first = poll(service, task["id"])
    assert first["status"] == "failed"
    assert first["error"] == "nope"
    sent = polls_sent(upstream)
    upstream.complete_task(task["id"])  # a late change of mind upstream is ignored
    assert poll(service, task["id"]) == first
    assert polls_sent(upstream) == sent


# -- refunds -----------------------------------------------------------------------------


def test_a_task_failing_upstream_is_refunded_once_however_often_polled(service, upstream):
    assert check_in(service) == 10
    task = generate(service)
    assert task["remainingCredits"] == 9
    upstream.fail_task(task["id"], error="boom")
    for _ in range(5):
        polled = poll(service, task["id"])
        assert polled["status"] == "failed"
        assert polled["error"] == "boom"
        assert balance(service) == 10


def test_concurrent_polls_of_a_failed_task_refund_once(service, upstream):
    check_in(service)
    task = generate(service)
    upstream.fail_task(task["id"])
    results: list[str] = []
    barrier = threading.Barrier(8)

    def one() -> None:
        barrier.wait(5)
        results.append(poll(service, task["id"])["status"])

    threads = [threading.Thread(target=one) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert results == ["failed"] * 8
    assert balance(service) == 10


def test_a_completed_task_keeps_its_charge(service, upstream):
    check_in(service)
    task = generate(service)
    upstream.complete_task(task["id"])
    assert wait_finished(service, task["id"])["status"] == "completed"
    for _ in range(3):
        assert poll(service, task["id"])["status"] == "completed"
    assert balance(service) == 9


# -- upstream poll failures --------------------------------------------------------------


def assert_upstream_failed(answer) -> None:
    assert answer.status_code == 502, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    body = answer.json()
    assert body["code"] == -1
    assert body["error"] == "upstream_failed"
    assert body["message"]


@pytest.mark.parametrize(
    "fault",
    [
        lambda u: u.fail(LISTING, status=500),
        lambda u: u.fail(LISTING, status=404, body="no such route"),
        lambda u: u.garbage(LISTING),
        lambda u: u.wrong_shape(LISTING, payload={"items": "nope"}),
        lambda u: u.wrong_shape(LISTING, payload=[1, 2]),
        lambda u: u.drop(LISTING),
    ],
    ids=["500", "404", "garbage", "items-not-a-list", "not-an-object", "dropped"],
)
def test_a_failed_upstream_poll_answers_502_and_changes_no_credit(service, upstream, fault):
    check_in(service)
    task = generate(service)
    fault(upstream)
    assert_upstream_failed(service.http.get(f"/api/images/tasks/{task['id']}"))
    assert balance(service) == 9
    upstream.clear_faults()
    # the task itself was not harmed: once the upstream answers again, it is still running
    polled = poll(service, task["id"])
    assert polled["status"] == "queued"
    assert balance(service) == 9


def test_a_poll_failure_after_a_failure_upstream_still_refunds_only_once(service, upstream):
    check_in(service)
    task = generate(service)
    upstream.fail_task(task["id"])
    upstream.fail(LISTING, status=500, times=1)
    assert_upstream_failed(service.http.get(f"/api/images/tasks/{task['id']}"))
    assert balance(service) == 9
    for _ in range(3):
        assert poll(service, task["id"])["status"] == "failed"
    assert balance(service) == 10


# -- answers a cache may not keep -------------------------------------------------------------


def test_every_answer_that_can_change_says_no_store(service, upstream):
    """A CDN rule that caches JSON must never keep a `queued` answer, a balance or an error."""
    check_in(service)
    answers = {
        "check-in": service.http.post("/api/quota/check-in", json={"fingerprint": FINGERPRINT}),
        "status": service.http.post("/api/quota/status", json={"fingerprint": FINGERPRINT}),
        "generate": service.http.post(
            "/api/images/generate",
            json={"prompt": "a red fox", "size": "1:1", "fingerprint": FINGERPRINT},
        ),
        "bad generate": service.http.post("/api/images/generate", json={"prompt": ""}),
        "unknown id": service.http.get(f"/api/images/tasks/{uuid.uuid4()}"),
        "not an id": service.http.get("/api/images/tasks/nope"),
        "no image yet": service.http.get(f"/api/images/tasks/{uuid.uuid4()}/image"),
        "path too long": service.http.get("/api/images/tasks/" + "x" * 2000),
    }
    task_id = answers["generate"].json()["data"]["id"]
    answers["poll"] = service.http.get(f"/api/images/tasks/{task_id}")
    for name, answer in answers.items():
        assert answer.headers.get("cache-control") == "no-store", (name, answer.headers)
