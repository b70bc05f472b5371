"""Credits that are never lost: late failures, unknown outcomes, the reconciler, leases."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

import pytest

from tests.conftest import FINGERPRINT, balance, check_in, make_settings, wait_finished
from tests.fake_upstream import make_png
from tests.service_runner import running_service

GENERATIONS = "/api/image-tasks/generations"


@pytest.fixture
def service(tmp_path, upstream, logs):
    """One submission attempt: a dropped submission stays lost until the reconciler acts."""
    with running_service(make_settings(tmp_path, upstream, submit_attempts=1)) as running:
        yield running


def generate(running, prompt: str = "a red fox") -> dict:
    answer = running.http.post(
        "/api/images/generate", json={"prompt": prompt, "fingerprint": FINGERPRINT}
    )
    assert answer.status_code == 200, answer.text
    return answer.json()["data"]


def reconcile(running):
    """One reconcile round, and the resubmissions it started."""
    reconciler = running.app.state.reconciler
    result = running.run(reconciler.run_once())
    running.run(reconciler.wait_resubmissions())
    return result


def wait_until(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def ledger(running, task_id: str):
    return running.run(running.service.store.get_task(task_id))


def audit(running):
    return running.run(running.service.store.audit())


def test_reconciler_refunds_a_task_that_failed_while_nobody_polled(service, upstream):
    check_in(service)
    task = generate(service)
    upstream.fail_task(task["id"], "content policy")
    listed_before = len(upstream.recorded("/api/image-tasks", method="GET"))
    result = reconcile(service)
    assert result.settled == 1
    assert len(upstream.recorded("/api/image-tasks", method="GET")) == listed_before + 1
    assert balance(service) == 10
    row = ledger(service, task["id"])
    assert row.state == "failed" and row.refunded and row.error == "content policy"
    reconcile(service)  # a second round changes nothing
    assert balance(service) == 10 and audit(service).refunds == 1


def test_reconciler_refunds_a_task_the_upstream_forgot(service, upstream):
    check_in(service)
    task = generate(service)
    upstream.forget_task(task["id"])
    reconcile(service)
    assert balance(service) == 10
    polled = service.http.get(f"/api/images/tasks/{task['id']}").json()["data"]
    assert polled["status"] == "failed"
    assert polled["error"].startswith("The image service lost this task before it finished")


def test_reconciler_asks_in_batches(tmp_path, upstream, logs):
    settings = make_settings(tmp_path, upstream, poll_batch_size=3)
    with running_service(settings) as running:
        check_in(running)
        ids = [generate(running, f"p{i}")["id"] for i in range(7)]
        before = len(upstream.recorded("/api/image-tasks", method="GET"))
        assert reconcile(running).checked == 7
        listings = upstream.recorded("/api/image-tasks", method="GET")[before:]
        assert sorted(len(r.query["ids"].split(",")) for r in listings) == [1, 3, 3]
        assert {i for r in listings for i in r.query["ids"].split(",")} == set(ids)


def test_task_unfinished_after_max_age_is_declared_failed_and_refunded(tmp_path, upstream, logs):
    with running_service(make_settings(tmp_path, upstream, task_max_age=0.3)) as running:
        check_in(running)
        task = generate(running)
        upstream.set_task(task["id"], status="running")
        time.sleep(0.4)
        reconcile(running)
        assert balance(running) == 10
        row = ledger(running, task["id"])
        assert row.state == "failed" and row.error_code == "timed_out"


def test_a_task_the_upstream_finished_is_copied_not_refunded_past_the_age_limit(
    tmp_path, upstream, logs
):
    """The age limit is for tasks still unfinished upstream: one whose listing says it is
    done (found by the settlement machine: the first listing after the limit saw it done)
    gets its image, whenever that listing comes."""
    with running_service(make_settings(tmp_path, upstream, task_max_age=0.3)) as running:
        check_in(running)
        task = generate(running)
        upstream.set_task(task["id"], status="running")
        time.sleep(0.4)
        upstream.complete_task(task["id"])
        reconcile(running)
        wait_until(lambda: ledger(running, task["id"]).state == "completed", what="the copy")
        assert balance(running) == 9


def test_the_age_limit_applies_whatever_the_listing_does(tmp_path, upstream, logs):
    """A task whose listing always fails is still failed and refunded at the age limit."""
    with running_service(make_settings(tmp_path, upstream, task_max_age=0.3)) as running:
        check_in(running)
        task = generate(running)
        upstream.garbage("/api/image-tasks", contains=task["id"])
        time.sleep(0.4)
        reconcile(running)
        assert balance(running) == 10
        assert ledger(running, task["id"]).error_code == "timed_out"


def test_an_unknown_outcome_keeps_the_charge_and_is_looked_at_at_once(tmp_path, upstream, logs):
    """A timeout after sending: no refund, no 502, the task answered as queued; the
    reconciler asks the upstream right away, not after a minute (issue 9, defect 5)."""
    with running_service(make_settings(tmp_path, upstream, submit_timeout=0.5)) as running:
        check_in(running)
        upstream.hold(GENERATIONS)
        began = time.monotonic()
        task = generate(running)
        assert task["status"] == "queued" and task["remainingCredits"] == 9
        row = ledger(running, task["id"])
        assert row.state == "submitting" and row.handed and row.lease_owner is None
        upstream.release()
        wait_until(lambda: ledger(running, task["id"]).state == "queued", what="the reconciler")
        assert time.monotonic() - began < 5
        assert len(upstream.recorded(GENERATIONS)) == 1  # found, not resubmitted
        assert balance(running) == 9 and audit(running).ok


def test_connection_reset_after_sending_is_unknown_too(service, upstream):
    check_in(service)
    upstream.drop(GENERATIONS, times=1, after_processing=True)
    task = generate(service)
    assert task["status"] == "queued"
    assert balance(service) == 9
    assert upstream.task(task["id"]) is not None
    wait_until(lambda: ledger(service, task["id"]).state == "queued", what="the reconciler")
    assert len(upstream.recorded(GENERATIONS)) == 1


def test_lost_submission_is_resubmitted_once_with_the_same_id(service, upstream):
    check_in(service)
    upstream.drop(GENERATIONS, times=1)  # the upstream never created it
    task = generate(service)
    wait_until(lambda: ledger(service, task["id"]).state == "queued", what="the resubmission")
    submissions = upstream.recorded(GENERATIONS)
    assert [r.json["client_task_id"] for r in submissions] == [task["id"], task["id"]]
    assert upstream.task(task["id"]) is not None
    assert balance(service) == 9 and audit(service).charges == 1


def test_lost_edit_is_resubmitted_with_its_reference_then_the_file_is_dropped(service, upstream):
    check_in(service)
    reference = make_png(16, 16)
    upstream.drop("/api/image-tasks/edits", times=1)
    answer = service.http.post(
        "/api/images/generate",
        data={"prompt": "make it blue", "fingerprint": FINGERPRINT},
        files={"image": ("ref.png", reference, "image/png")},
    )
    task = answer.json()["data"]
    path = ledger(service, task["id"]).reference_path
    assert path
    wait_until(lambda: ledger(service, task["id"]).state == "queued", what="the resubmission")
    resent = upstream.recorded("/api/image-tasks/edits")[-1]
    assert resent.files["image"].data == reference
    assert resent.files["image"].filename == "ref.png"
    assert resent.form["client_task_id"] == task["id"]
    upstream.complete_task(task["id"])
    assert wait_finished(service, task["id"])["status"] == "completed"
    from pathlib import Path

    assert not Path(path).exists()
    assert ledger(service, task["id"]).reference_path is None


def test_lost_submission_past_the_resubmit_window_is_refunded(tmp_path, upstream, logs):
    with running_service(
        make_settings(tmp_path, upstream, resubmit_window=0.0, submit_attempts=1)
    ) as running:
        check_in(running)
        upstream.drop(GENERATIONS, times=1)
        task = generate(running)
        wait_until(lambda: ledger(running, task["id"]).state == "failed", what="the refund")
        assert ledger(running, task["id"]).error_code == "task_lost"
        assert len(upstream.recorded(GENERATIONS)) == 1
        assert balance(running) == 10


def test_resubmission_refused_for_good_is_refunded(service, upstream):
    check_in(service)
    upstream.drop(GENERATIONS, times=1)
    upstream.fail(GENERATIONS, status=400, times=1)
    task = generate(service)
    wait_until(lambda: ledger(service, task["id"]).refunded, what="the refund")
    assert balance(service) == 10
    assert ledger(service, task["id"]).error_code == "submit_refused"


def test_a_resubmission_the_upstream_is_too_busy_for_is_tried_again(service, upstream):
    """429 and refused connections prove nothing was created, but the next round may do
    better: the charge is kept and the row resubmitted again (within the window)."""
    check_in(service)
    upstream.drop(GENERATIONS, times=1)
    upstream.fail(GENERATIONS, status=429, times=1)
    task = generate(service)
    wait_until(lambda: len(upstream.recorded(GENERATIONS)) >= 2, what="the first resubmission")
    assert not ledger(service, task["id"]).refunded
    reconcile(service)
    assert ledger(service, task["id"]).state == "queued"
    assert balance(service) == 9


def test_a_submission_in_flight_is_left_to_its_lease_holder(tmp_path, upstream, logs):
    """While a generate request holds its row's lease (renewed while it waits), no
    reconciler touches the row, however long the submission takes (issue 9, defect 2)."""
    settings = make_settings(tmp_path, upstream, submit_timeout=3.0, lease_seconds=0.6)
    with running_service(settings) as running:
        check_in(running)
        hold = upstream.hold(GENERATIONS)
        pending: dict = {}

        def send() -> None:
            pending["answer"] = running.http.post(
                "/api/images/generate", json={"prompt": "slow", "fingerprint": FINGERPRINT}
            )

        import threading

        client = threading.Thread(target=send)
        client.start()
        assert hold.wait(5)
        for _ in range(4):  # well past the lease term: renewals keep it
            time.sleep(0.4)
            assert reconcile(running).checked == 0
        hold.release()
        client.join(10)
        task = pending["answer"].json()["data"]
        assert task["status"] == "queued"
        assert len(upstream.recorded(GENERATIONS)) == 1
        assert balance(running) == 9 and audit(running).ok


def test_another_instance_takes_a_row_only_when_its_lease_lapsed(tmp_path, upstream, logs):
    """Two instances on one database: one sends slowly, the other's reconciler rounds leave
    the row alone; once the sender answered, the row is settled as usual."""
    settings = make_settings(tmp_path, upstream, submit_timeout=2.5, lease_seconds=0.6)
    with running_service(settings) as first, running_service(settings) as second:
        check_in(first)
        hold = upstream.hold(GENERATIONS)
        import threading

        pending: dict = {}
        client = threading.Thread(
            target=lambda: pending.setdefault(
                "answer",
                first.http.post(
                    "/api/images/generate", json={"prompt": "slow", "fingerprint": FINGERPRINT}
                ),
            )
        )
        client.start()
        assert hold.wait(5)
        deadline = time.monotonic() + 1.8
        while time.monotonic() < deadline:
            assert reconcile(second).checked == 0
            time.sleep(0.1)
        hold.release()
        client.join(10)
        task = pending["answer"].json()["data"]
        assert task["status"] == "queued" and len(upstream.recorded(GENERATIONS)) == 1
        upstream.complete_task(task["id"])
        assert wait_finished(second, task["id"])["status"] == "completed"
        assert balance(first) == 9 and audit(second).ok


def test_a_stale_missing_never_fails_a_resubmitted_task(tmp_path, upstream, logs):
    """Issue 9, defect 1: a "missing" heard before the resubmission must not fail the task
    the resubmission created, however answers are reused."""
    settings = make_settings(tmp_path, upstream, poll_min_interval=5.0, submit_attempts=1)
    with running_service(settings) as running:
        check_in(running)
        upstream.drop(GENERATIONS, times=1)
        task = generate(running)
        url = f"/api/images/tasks/{task['id']}"
        for _ in range(5):  # polls meanwhile, from several "tabs"
            assert running.http.get(url).json()["data"]["status"] == "queued"
        wait_until(lambda: ledger(running, task["id"]).state == "queued", what="the resubmission")
        for _ in range(5):
            assert running.http.get(url).json()["data"]["status"] in ("queued", "running")
            assert running.http.get(url + "/image").status_code == 404
        upstream.complete_task(task["id"])
        row = ledger(running, task["id"])
        assert row.state == "queued" and not row.refunded
        running.service.answers.forget(task["id"])  # as if the interval had passed
        assert wait_finished(running, task["id"])["status"] == "completed"
        assert running.http.get(url + "/image").status_code == 200
        assert balance(running) == 9 and audit(running).ok


def test_one_bad_id_does_not_block_its_batch(tmp_path, upstream, logs):
    """Issue 9, defect 8: a listing that fails whenever one id is in it is split; every other
    task of the batch is settled in the same round."""
    with running_service(make_settings(tmp_path, upstream, poll_batch_size=50)) as running:
        check_in(running)
        tasks = [generate(running, f"p{i}") for i in range(6)]
        poison = tasks[2]["id"]
        upstream.garbage("/api/image-tasks", contains=poison)
        for task in tasks:
            upstream.fail_task(task["id"], "failed upstream")
        result = reconcile(running)
        assert result.settled == 5 and result.errors == 1
        assert balance(running) == 9
        assert not ledger(running, poison).refunded


def test_hanging_resubmissions_do_not_delay_refunds(tmp_path, upstream, logs):
    """Issue 9, defect 8: resubmissions run beside the rounds, bounded; refunds of other
    tasks never wait for them."""
    settings = make_settings(
        tmp_path,
        upstream,
        submit_timeout=10.0,  # the held resubmissions are released well before this
        submit_attempts=1,
        resubmit_concurrency=8,
        breaker_min_calls=1000,
    )
    with running_service(settings) as running:
        check_in(running)
        failing = [generate(running, f"fails {i}") for i in range(2)]
        upstream.drop(GENERATIONS, times=8)
        upstream.hold(GENERATIONS)  # after the 8 drops, every resubmission hangs
        lost = [generate(running, f"lost {i}") for i in range(8)]
        wait_until(lambda: len(upstream.recorded(GENERATIONS)) >= 18, what="8 resubmissions")
        for task in failing:
            upstream.fail_task(task["id"], "late failure")
        began = time.monotonic()
        running.run(running.app.state.reconciler.run_once())
        assert time.monotonic() - began < 1.0
        assert all(ledger(running, t["id"]).refunded for t in failing)
        assert not any(ledger(running, t["id"]).refunded for t in lost)
        upstream.release()
        wait_until(
            lambda: all(ledger(running, t["id"]).state == "queued" for t in lost),
            what="the resubmissions to land",
        )
        assert balance(running) == 2 and audit(running).ok


def test_tasks_of_other_apps_on_the_same_key_are_not_ours(service, upstream):
    foreign = str(uuid.uuid4())
    upstream.set_task(foreign, status="success")
    upstream.complete_task(foreign)
    before = len(upstream.requests)
    polled = service.http.get(f"/api/images/tasks/{foreign}").json()["data"]
    image = service.http.get(f"/api/images/tasks/{foreign}/image")
    assert polled == {
        "id": foreign,
        "mode": "text",
        "status": "failed",
        "error": "task not found or expired",
    }
    assert image.status_code == 404
    assert len(upstream.requests) == before


def test_finished_tasks_are_answered_from_the_ledger(service, upstream):
    check_in(service)
    done, failed = generate(service, "one"), generate(service, "two")
    upstream.complete_task(done["id"], revised_prompt="revised one")
    upstream.fail_task(failed["id"], "nope")
    first = [wait_finished(service, t["id"]) for t in (done, failed)]
    before = len(upstream.recorded("/api/image-tasks", method="GET"))
    again = [
        service.http.get(f"/api/images/tasks/{t['id']}").json()["data"] for t in (done, failed)
    ]
    assert again == first
    assert len(upstream.recorded("/api/image-tasks", method="GET")) == before
    assert again[0]["revisedPrompt"] == "revised one" and again[1]["error"] == "nope"


def _audit_cli(tmp_path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scenemint", "audit", "credits"],
        env={"PATH": "/usr/bin:/bin", "SCENEMINT_DATA_DIR": str(tmp_path / "data")},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_credits_audit_passes_on_honest_books_and_fails_on_tampered_ones(
    service, upstream, tmp_path
):
    check_in(service)
    ok_task, bad_task = generate(service, "a"), generate(service, "b")
    upstream.fail_task(bad_task["id"])
    service.http.get(f"/api/images/tasks/{bad_task['id']}")
    upstream.complete_task(ok_task["id"])
    service.http.get(f"/api/images/tasks/{ok_task['id']}")
    honest = _audit_cli(tmp_path)
    assert honest.returncode == 0, honest.stderr
    assert "granted 10, charged 2, refunded 1" in honest.stdout
    assert "audit passed" in honest.stdout

    import sqlite3

    conn = sqlite3.connect(tmp_path / "data" / "scenemint.sqlite3")
    conn.execute("UPDATE accounts SET balance = balance + 5")
    conn.commit()
    conn.close()
    tampered = _audit_cli(tmp_path)
    assert tampered.returncode == 1
    assert "VIOLATION" in tampered.stderr and "audit FAILED" in tampered.stdout


def test_an_abandoned_edit_is_refunded_and_its_reference_file_removed(service, upstream):
    check_in(service)
    upstream.drop("/api/image-tasks/edits", times=1)
    answer = service.http.post(
        "/api/images/generate",
        data={"prompt": "make it blue", "fingerprint": FINGERPRINT},
        files={"image": ("ref.png", make_png(8, 8), "image/png")},
    )
    task = answer.json()["data"]
    reference = ledger(service, task["id"]).reference_path
    from pathlib import Path

    assert Path(reference).exists()
    upstream.fail("/api/image-tasks/edits", status=400, times=1)
    reconcile(service)
    assert balance(service) == 10
    assert ledger(service, task["id"]).state == "failed"
    assert not Path(reference).exists()
