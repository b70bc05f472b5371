"""Idempotency keys on POST /api/images/generate, and answers lost to a failing database."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from scenemint.errors import StoreUnavailable
from tests.conftest import FINGERPRINT, assert_envelope, balance, check_in, make_settings
from tests.fake_upstream import TINY_PNG, make_png
from tests.service_runner import running_service

GENERATIONS = "/api/image-tasks/generations"
BODY = {"prompt": "a red fox", "size": "16:9", "fingerprint": FINGERPRINT}


def generate(running, *, key: str | None, body: dict | None = None, **extra) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key is not None else {}
    return running.http.post("/api/images/generate", json=body or BODY, headers=headers, **extra)


def audit(running):
    return running.run(running.service.store.audit())


def ledger(running, task_id: str):
    return running.run(running.service.store.get_task(task_id))


def wait_until(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_the_same_key_and_body_get_the_same_task_without_a_second_charge(service, upstream):
    check_in(service)
    first = generate(service, key="k-1")
    assert first.status_code == 200, first.text
    again = generate(service, key="k-1")
    assert again.status_code == 200, again.text
    one, two = first.json()["data"], again.json()["data"]
    assert one["id"] == two["id"] and two["prompt"] == "a red fox"
    assert one["remainingCredits"] == 9 and two["remainingCredits"] == 9
    assert len(upstream.recorded(GENERATIONS)) == 1
    assert balance(service) == 9 and audit(service).charges == 1


def test_the_same_key_with_another_body_is_409_and_changes_nothing(service, upstream):
    check_in(service)
    first = generate(service, key="k-2").json()["data"]
    other = generate(service, key="k-2", body={**BODY, "prompt": "a blue fox"})
    assert_envelope(other, 409, "idempotency_key_reused")
    other_size = generate(service, key="k-2", body={**BODY, "size": "1:1"})
    assert_envelope(other_size, 409, "idempotency_key_reused")
    assert len(upstream.recorded(GENERATIONS)) == 1
    assert balance(service) == 9
    assert generate(service, key="k-2").json()["data"]["id"] == first["id"]


def test_keys_belong_to_their_fingerprint(service, upstream):
    check_in(service)
    check_in(service, "another-fingerprint")
    mine = generate(service, key="shared").json()["data"]
    theirs = generate(service, key="shared", body={**BODY, "fingerprint": "another-fingerprint"})
    assert theirs.status_code == 200
    assert theirs.json()["data"]["id"] != mine["id"]
    assert balance(service) == 9 and balance(service, "another-fingerprint") == 9


def test_an_edit_is_the_same_request_only_with_the_same_image(service, upstream):
    check_in(service)

    def edit(image: bytes) -> httpx.Response:
        return service.http.post(
            "/api/images/generate",
            data={"prompt": "make it blue", "fingerprint": FINGERPRINT},
            files={"image": ("ref.png", image, "image/png")},
            headers={"Idempotency-Key": "edit-1"},
        )

    first = edit(TINY_PNG).json()["data"]
    assert edit(TINY_PNG).json()["data"]["id"] == first["id"]
    assert_envelope(edit(make_png(2, 2)), 409, "idempotency_key_reused")
    assert balance(service) == 9


@pytest.mark.parametrize(
    "key",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"x" * 256, id="256-chars"),
        pytest.param(b"tab\tinside", id="control-char"),
        pytest.param("ключ".encode(), id="not-ascii"),
    ],
)
def test_a_malformed_key_is_400_and_charges_nothing(service, upstream, key):
    check_in(service)
    answer = service.http.post(
        "/api/images/generate", json=BODY, headers=[(b"Idempotency-Key", key)]
    )
    assert_envelope(answer, 400, "invalid_idempotency_key")
    assert balance(service) == 10 and upstream.recorded(GENERATIONS) == []


def test_a_key_of_255_printable_characters_is_accepted(service, upstream):
    check_in(service)
    key = "".join(chr(33 + i % 94) for i in range(253)).join("[]")  # inner spaces would do too
    assert generate(service, key=key).status_code == 200


def test_a_retry_after_an_unknown_outcome_gets_the_same_task(service, upstream):
    check_in(service)
    upstream.fail(GENERATIONS, status=504)
    first = generate(service, key="after-504")
    assert first.json()["data"]["status"] == "queued"
    sent = len(upstream.recorded(GENERATIONS))
    again = generate(service, key="after-504")
    assert again.json()["data"]["id"] == first.json()["data"]["id"]
    assert len(upstream.recorded(GENERATIONS)) <= sent + 1  # at most the reconciler's one
    assert balance(service) == 9


@pytest.fixture
def any_database_service(tmp_path, upstream, logs, database_url):
    settings = make_settings(tmp_path, upstream, database_url=database_url)
    with running_service(settings) as running:
        yield running


def test_twelve_requests_with_one_key_at_once_charge_once(any_database_service, upstream):
    running = any_database_service
    check_in(running)
    upstream.delay(GENERATIONS, 0.3)  # keep the first one in flight while the others arrive

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        "/api/images/generate", json=BODY, headers={"Idempotency-Key": "burst"}
                    )
                    for _ in range(12)
                )
            )

    answers = asyncio.run(burst())
    ok = [a.json()["data"]["id"] for a in answers if a.status_code == 200]
    busy = [a for a in answers if a.status_code != 200]
    assert len(ok) >= 1 and len(set(ok)) == 1
    for answer in busy:
        assert_envelope(answer, 409, "idempotency_in_progress")
        assert answer.headers["retry-after"] == "1"
    assert balance(running) == 9
    assert len(upstream.recorded(GENERATIONS)) == 1
    report = audit(running)
    assert report.charges == 1 and report.ok
    # once the first is answered, every retry gets that task
    assert generate(running, key="burst").json()["data"]["id"] == ok[0]


def test_keys_are_freed_after_their_time(tmp_path, upstream, logs):
    with running_service(make_settings(tmp_path, upstream, idempotency_ttl=0.2)) as running:
        check_in(running)
        first = generate(running, key="old").json()["data"]
        time.sleep(0.3)
        running.run(running.app.state.reconciler.run_once())
        fresh = generate(running, key="old", body={**BODY, "prompt": "something else"})
        assert fresh.status_code == 200, fresh.text
        assert fresh.json()["data"]["id"] != first["id"]
        assert balance(running) == 8


# -- a database that fails after the charge ------------------------------------------------


def fail_the_outcome(running) -> list[int]:
    """Make the store fail the write of a submission's outcome (the charge landed)."""
    store = running.service.store
    real = store.apply
    failed: list[int] = []

    async def flaky(row, decision, *, owner=None):
        if decision.keep_lease:
            failed.append(1)
            raise StoreUnavailable(detail="connection lost")
        return await real(row, decision, owner=owner)

    store.apply = flaky
    return failed


def test_a_database_failure_after_the_charge_is_503_and_the_credit_comes_back(
    tmp_path, upstream, logs
):
    """Issue 9, defect 7: the client got no task id, so it does not pay (not a 500) — once
    the grace in which it could have come back with its key has passed."""
    settings = make_settings(tmp_path, upstream, lease_seconds=0.5, handoff_grace=3)
    with running_service(settings) as running:
        check_in(running)
        failed = fail_the_outcome(running)
        answer = generate(running, key=None)
        body = assert_envelope(answer, 503, "store_unavailable")
        assert answer.headers["retry-after"] == "2" and body["retryAfter"] == 2
        assert failed  # retried, and failed each time
        del running.service.store.apply  # the database is back
        assert balance(running) == 9  # charged, not yet settled
        time.sleep(0.6)  # the request's lease lapses: its client may still come back
        running.run(running.app.state.reconciler.run_once())
        assert balance(running) == 9
        time.sleep(3)  # ... for the grace
        running.run(running.app.state.reconciler.run_once())
        assert balance(running) == 10
        assert audit(running).refunds == 1


def test_after_a_database_failure_the_same_key_gets_the_task(tmp_path, upstream, logs):
    settings = make_settings(tmp_path, upstream, lease_seconds=0.5)
    with running_service(settings) as running:
        check_in(running)
        fail_the_outcome(running)
        assert generate(running, key="db-down").status_code == 503
        del running.service.store.apply
        answer = generate(running, key="db-down")
        while answer.status_code == 409:  # the dead request's lease has not lapsed yet
            time.sleep(0.2)
            answer = generate(running, key="db-down")
        assert answer.status_code == 200, answer.text
        task = answer.json()["data"]
        row = ledger(running, task["id"])
        assert row.handed and not row.refunded
        assert {r.json["client_task_id"] for r in upstream.recorded(GENERATIONS)} == {task["id"]}
        assert len(upstream.tasks) == 1
        running.run(running.app.state.reconciler.run_once())
        assert balance(running) == 9 and audit(running).ok


# -- the answer must leave before the task is the client's ------------------------------------


def test_a_failure_recording_the_delivery_refunds_the_task(tmp_path, upstream, logs):
    """The answer left, but the database failed when it was to record that: the task may
    not be the client's, so it is refunded (the client keeps its task, in its favour)."""
    settings = make_settings(tmp_path, upstream, lease_seconds=0.5, handoff_grace=0.5)
    with running_service(settings) as running:
        check_in(running)
        store = running.service.store
        real = store.apply

        async def flaky(row, decision, *, owner=None):
            if decision.hand:
                raise StoreUnavailable(detail="connection lost")
            return await real(row, decision, owner=owner)

        store.apply = flaky
        answer = generate(running, key=None)
        assert answer.status_code == 200, answer.text
        task_id = answer.json()["data"]["id"]
        deadline = time.monotonic() + 5
        while not any("cannot record its delivery" in line for line in logs.lines):
            assert time.monotonic() < deadline, "the delivery write was not given up"
            time.sleep(0.05)
        del store.apply
        time.sleep(1.1)  # the request's lease lapses, and the grace passes
        running.run(running.app.state.reconciler.run_once())
        row = ledger(running, task_id)
        assert row.refunded and not row.handed
        assert balance(running) == 10 and audit(running).ok


def test_a_client_gone_before_its_answer_does_not_pay(tmp_path, upstream, logs):
    """Found by the chaos run: the answer was marked handed before it was sent. (A client
    without a key cannot come back for it: refunded once the grace has passed.)"""
    settings = make_settings(tmp_path, upstream, lease_seconds=0.5, handoff_grace=0.5)
    with running_service(settings) as running:
        check_in(running)
        upstream.delay(GENERATIONS, 1.0, times=1)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                running.url + "/api/images/generate",
                json={"prompt": "a red fox", "fingerprint": FINGERPRINT},
                timeout=httpx.Timeout(10, read=0.3),
            )
        time.sleep(2.0)  # the submission finishes after the client left; the grace passes
        running.run(running.app.state.reconciler.run_once())
        (task_id,) = [r.json["client_task_id"] for r in upstream.recorded(GENERATIONS)]
        row = ledger(running, task_id)
        assert row.refunded and not row.handed
        assert balance(running) == 10 and audit(running).ok


# -- one deadline for the whole request, the database's waits included ---------------------

SUBMIT_TIMEOUT = 3.0
BOUND = SUBMIT_TIMEOUT + 5.0  # the submit timeout plus the request margin (REQUEST_MARGIN)


def starve_the_database(running, database_url: str):
    """A way to make the database hand out nothing: every pooled PostgreSQL connection
    taken, or SQLite's write lock held by another connection. Returns the undo."""
    if database_url.startswith("sqlite"):
        import sqlite3

        locker = sqlite3.connect(database_url[len("sqlite:///") :], isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")
        return lambda: (locker.rollback(), locker.close())
    pool = running.service.store._backend._pool
    taken = [pool.getconn(timeout=5) for _ in range(pool.max_size)]
    return lambda: [pool.putconn(conn) for conn in taken]


def test_a_generate_answers_within_its_bound_when_the_database_hands_out_nothing(
    tmp_path, upstream, logs, database_url
):
    """The outcome write was tried three times, each waiting up to 10 s for a connection
    (35.6 s seen with a 5 s submit timeout): one deadline for the request now, and what is
    left of it is all the store may wait. The answer is a 503 in time; the key then gets
    the task once the database is back."""
    settings = make_settings(
        tmp_path,
        upstream,
        database_url=database_url,
        submit_timeout=SUBMIT_TIMEOUT,
        lease_seconds=2,
    )
    with running_service(settings) as running:
        check_in(running)
        hold = upstream.hold(GENERATIONS)
        answers: list[httpx.Response] = []

        def request() -> None:
            answers.append(generate(running, key="starved", timeout=60))

        started = time.monotonic()
        client = threading.Thread(target=request)
        client.start()
        assert hold.wait(5)
        undo = starve_the_database(running, database_url)
        try:
            hold.release()  # the submission is answered; its outcome cannot be written
            client.join(60)
            took = time.monotonic() - started
        finally:
            undo()
        (answer,) = answers
        assert took < BOUND + 1.5, f"answered after {took:.1f} s"
        assert_envelope(answer, 503, "store_unavailable")
        again = generate(running, key="starved")
        while again.status_code == 409:  # the request's lease lapses
            time.sleep(0.2)
            again = generate(running, key="starved")
        assert again.status_code == 200, again.text
        assert balance(running) == 9 and audit(running).ok
