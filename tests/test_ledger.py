"""Credits that are never lost: late failures, ambiguous submissions, the reconciler, ownership."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

import pytest

from tests.conftest import FINGERPRINT, balance, check_in, make_settings
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


def reconcile(running, *, startup: bool = False):
    return running.run(running.app.state.reconciler.run_once(startup=startup))


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
    assert polled["status"] == "failed" and polled["error"] == "task not found or expired"


def test_reconciler_asks_in_batches(tmp_path, upstream, logs):
    settings = make_settings(tmp_path, upstream, poll_batch_size=3)
    with running_service(settings) as running:
        check_in(running)
        ids = [generate(running, f"p{i}")["id"] for i in range(7)]
        before = len(upstream.recorded("/api/image-tasks", method="GET"))
        assert reconcile(running).checked == 7
        listings = upstream.recorded("/api/image-tasks", method="GET")[before:]
        assert [len(r.query["ids"].split(",")) for r in listings] == [3, 3, 1]
        assert {i for r in listings for i in r.query["ids"].split(",")} == set(ids)


def test_task_unfinished_after_max_age_is_declared_failed_and_refunded(tmp_path, upstream, logs):
    with running_service(make_settings(tmp_path, upstream, task_max_age=0.3)) as running:
        check_in(running)
        task = generate(running)
        upstream.set_task(task["id"], status="running")
        time.sleep(0.4)
        reconcile(running)
        assert balance(running) == 10
        assert ledger(running, task["id"]).state == "failed"


def test_ambiguous_submission_keeps_the_charge_and_answers_queued(tmp_path, upstream, logs):
    """A timeout after sending: no refund, no 502; the reconciler later finds the task."""
    with running_service(make_settings(tmp_path, upstream, submit_timeout=0.5)) as running:
        check_in(running)
        upstream.hold(GENERATIONS)
        task = generate(running)
        assert task["status"] == "queued" and task["remainingCredits"] == 9
        assert ledger(running, task["id"]).state == "submitting"
        upstream.release()
        reconcile(running, startup=True)
        assert ledger(running, task["id"]).state == "queued"
        assert len(upstream.recorded(GENERATIONS)) == 1  # found, not resubmitted
        assert balance(running) == 9 and audit(running).ok


def test_connection_reset_after_sending_is_ambiguous_too(service, upstream):
    check_in(service)
    upstream.drop(GENERATIONS, times=1, after_processing=True)
    task = generate(service)
    assert task["status"] == "queued"
    assert balance(service) == 9
    assert upstream.task(task["id"]) is not None


def test_lost_submission_is_resubmitted_once_with_the_same_id(service, upstream):
    check_in(service)
    upstream.drop(GENERATIONS, times=1)  # the upstream never created it
    task = generate(service)
    assert upstream.task(task["id"]) is None
    result = reconcile(service, startup=True)
    assert result.resubmitted == 1
    submissions = upstream.recorded(GENERATIONS)
    assert [r.json["client_task_id"] for r in submissions] == [task["id"], task["id"]]
    assert upstream.task(task["id"]) is not None
    assert ledger(service, task["id"]).state == "queued"
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
    row = ledger(service, task["id"])
    assert row.state == "submitting" and row.reference_path
    reconcile(service, startup=True)
    resent = upstream.recorded("/api/image-tasks/edits")[-1]
    assert resent.files["image"].data == reference
    assert resent.files["image"].filename == "ref.png"
    assert resent.form["client_task_id"] == task["id"]
    upstream.complete_task(task["id"])
    assert (
        service.http.get(f"/api/images/tasks/{task['id']}").json()["data"]["status"] == "completed"
    )
    from pathlib import Path

    assert not Path(row.reference_path).exists()


def test_lost_submission_past_the_resubmit_window_is_refunded(tmp_path, upstream, logs):
    with running_service(
        make_settings(tmp_path, upstream, resubmit_window=0.0, submit_attempts=1)
    ) as running:
        check_in(running)
        upstream.drop(GENERATIONS, times=1)
        task = generate(running)
        reconcile(running, startup=True)
        assert len(upstream.recorded(GENERATIONS)) == 1
        assert balance(running) == 10
        assert ledger(running, task["id"]).state == "failed"


def test_resubmission_refused_for_good_is_refunded(service, upstream):
    check_in(service)
    upstream.drop(GENERATIONS, times=1)
    task = generate(service)
    upstream.fail(GENERATIONS, status=400, times=1)
    reconcile(service, startup=True)
    assert balance(service) == 10
    assert ledger(service, task["id"]).refunded


def test_in_flight_submissions_are_left_alone_outside_start_up(service, upstream):
    """A young "submitting" row may belong to a request still running: only start-up touches it."""
    check_in(service)
    upstream.drop(GENERATIONS, times=1)
    task = generate(service)
    assert reconcile(service).checked == 0
    assert ledger(service, task["id"]).state == "submitting"


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
    first = [
        service.http.get(f"/api/images/tasks/{t['id']}").json()["data"] for t in (done, failed)
    ]
    before = len(upstream.recorded("/api/image-tasks", method="GET"))
    again = [
        service.http.get(f"/api/images/tasks/{t['id']}").json()["data"] for t in (done, failed)
    ]
    assert again == first
    assert len(upstream.recorded("/api/image-tasks", method="GET")) == before
    assert again[0]["revisedPrompt"] == "revised one" and again[1]["error"] == "nope"


def _audit_cli(tmp_path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scenemint", "credits", "audit"],
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
    reconcile(service, startup=True)
    assert balance(service) == 10
    assert ledger(service, task["id"]).state == "failed"
    assert not Path(reference).exists()
