"""Real processes: a service killed mid-submission, and two instances on one PostgreSQL database."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.service_runner import ServiceProcess

GENERATIONS = "/api/image-tasks/generations"
FP = "process-fingerprint-1"


def env_for(upstream, **extra: str) -> dict[str, str]:
    return {
        "CHATGPT2API_BASE_URL": upstream.base_url,
        "CHATGPT2API_API_KEY": upstream.api_key,
        "SCENEMINT_RECONCILE_INTERVAL": "3600",
        "SCENEMINT_POLL_MIN_INTERVAL": "0",
        **extra,
    }


def wait_until(predicate, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def ledger_rows(data_dir: Path) -> list[tuple]:
    conn = sqlite3.connect(data_dir / "scenemint.sqlite3")
    try:
        return conn.execute("SELECT id, state, refunded FROM tasks").fetchall()
    finally:
        conn.close()


def handed(data_dir: Path) -> bool:
    conn = sqlite3.connect(data_dir / "scenemint.sqlite3")
    try:
        return all(row[0] is not None for row in conn.execute("SELECT handed_at FROM tasks"))
    finally:
        conn.close()


def audit(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scenemint", "audit", "credits"],
        env={"PATH": "/usr/bin:/bin", **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def balance(url: str, fingerprint: str = FP) -> int:
    answer = httpx.post(url + "/api/quota/status", json={"fingerprint": fingerprint}, timeout=10)
    return int(answer.json()["data"]["balance"])


def post_generate(url: str, *, key: str | None = None, timeout: float = 30) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key else {}
    return httpx.post(
        url + "/api/images/generate",
        json={"prompt": "a boat", "fingerprint": FP},
        headers=headers,
        timeout=timeout,
    )


def kill_during_submission(
    upstream, tmp_path: Path, env: dict[str, str], *, key: str | None = None
) -> str:
    """Start a service, let it charge and submit, SIGKILL it while the upstream holds the answer."""
    hold = upstream.hold(GENERATIONS)
    first = ServiceProcess(env, cwd=str(tmp_path)).wait_ready()
    try:
        httpx.post(first.url + "/api/quota/check-in", json={"fingerprint": FP}, timeout=10)

        def doomed_request() -> None:
            with contextlib.suppress(httpx.HTTPError):  # the server dies under it
                post_generate(first.url, key=key)

        client = threading.Thread(target=doomed_request, daemon=True)
        client.start()
        assert hold.wait(15), "the submission never reached the upstream"
        first.kill()
        client.join(10)
    finally:
        first.stop()
    task_id = upstream.recorded(GENERATIONS)[0].json["client_task_id"]
    assert ledger_rows(tmp_path / "data") == [(task_id, "submitting", 0)]
    return task_id


@pytest.mark.parametrize("upstream_kept_it", [True, False])
def test_a_task_whose_answer_never_left_is_refunded_after_a_sigkill(
    upstream, tmp_path, upstream_kept_it
):
    """Killed between charge and answer: the client never got the task id, so the credit
    comes back within one lease period, the grace and one round, whatever the upstream made
    of it."""
    env = env_for(
        upstream,
        SCENEMINT_DATA_DIR=str(tmp_path / "data"),
        SCENEMINT_LEASE_SECONDS="1",
        SCENEMINT_HANDOFF_GRACE="1",
        SCENEMINT_RECONCILE_INTERVAL="0.5",
    )
    task_id = kill_during_submission(upstream, tmp_path, env)
    upstream.release()
    if not upstream_kept_it:
        upstream.forget_task(task_id)
    killed_at = time.monotonic()
    second = ServiceProcess(env, cwd=str(tmp_path)).wait_ready()
    try:
        wait_until(lambda: ledger_rows(tmp_path / "data")[0][2] == 1, what="the refund")
        assert time.monotonic() - killed_at < 1 + 1 + 0.5 + 5  # lease + grace + round + start
        assert ledger_rows(tmp_path / "data") == [(task_id, "failed", 1)]
        assert balance(second.url) == 10
        assert len(upstream.recorded(GENERATIONS)) == 1  # never sent again
    finally:
        second.stop()
    checked = audit(env, tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "charged 1, refunded 1" in checked.stdout


def test_a_client_coming_back_with_its_key_gets_the_task_of_a_killed_request(upstream, tmp_path):
    """The same Idempotency-Key after a crash: the client gets its task (no second charge);
    while the dead request's lease runs it is told to come back (409 in progress)."""
    env = env_for(
        upstream,
        SCENEMINT_DATA_DIR=str(tmp_path / "data"),
        SCENEMINT_LEASE_SECONDS="6",  # the client comes back before the lease lapses
        SCENEMINT_RECONCILE_INTERVAL="3600",
    )
    task_id = kill_during_submission(upstream, tmp_path, env, key="retry-me-1")
    upstream.release()
    second = ServiceProcess(env, cwd=str(tmp_path)).wait_ready()
    try:
        statuses = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            answer = post_generate(second.url, key="retry-me-1")
            statuses.append(answer.status_code)
            if answer.status_code != 409:
                break
            assert answer.headers["retry-after"] == "1"
            assert answer.json()["error"] == "idempotency_in_progress"
            time.sleep(0.3)
        assert statuses[-1] == 200, answer.text
        data = answer.json()["data"]
        assert data["id"] == task_id and data["remainingCredits"] == 9
        assert len(upstream.tasks) == 1  # the resubmission found the same upstream task
        again = post_generate(second.url, key="retry-me-1")
        assert again.json()["data"]["id"] == task_id
        assert balance(second.url) == 9
    finally:
        second.stop()
    checked = audit(env, tmp_path)
    assert checked.returncode == 0 and "charged 1, refunded 0" in checked.stdout


def test_the_python_client_retries_through_a_killed_requests_lease(upstream, tmp_path):
    """The client library's own retry path after a crash: `409 idempotency_in_progress` for
    the whole lease of the dead request (8 s here, 30 s by default) is waited out, as the
    server's Retry-After says, within the client's own budget: then it gets its task (it
    gave up after five quick attempts before)."""
    from scenemint.client import Client

    env = env_for(
        upstream,
        SCENEMINT_DATA_DIR=str(tmp_path / "data"),
        SCENEMINT_LEASE_SECONDS="8",
        SCENEMINT_RECONCILE_INTERVAL="3600",
    )
    task_id = kill_during_submission(upstream, tmp_path, env, key="client-key-1")
    upstream.release()
    second = ServiceProcess(env, cwd=str(tmp_path)).wait_ready()
    try:
        with Client(second.url, fingerprint=FP) as client:
            started = time.monotonic()
            task = client.generate("a boat", idempotency_key="client-key-1")
            assert time.monotonic() - started > 3  # it did wait for the lease
        assert task.id == task_id and task.status != "failed"
        assert balance(second.url) == 9
    finally:
        second.stop()


def test_a_task_answered_before_a_sigkill_is_settled_after_restart(upstream, tmp_path):
    """The answer (queued, outcome unknown) left; then the process died: after restart the
    task is found upstream and kept, not refunded."""
    env = env_for(
        upstream,
        SCENEMINT_DATA_DIR=str(tmp_path / "data"),
        SCENEMINT_SUBMIT_TIMEOUT="0.5",
        SCENEMINT_SUBMIT_ATTEMPTS="1",
    )
    upstream.hold(GENERATIONS)
    first = ServiceProcess({**env, "SCENEMINT_RECONCILE_INTERVAL": "3600"}, cwd=str(tmp_path))
    try:
        first.wait_ready()
        httpx.post(first.url + "/api/quota/check-in", json={"fingerprint": FP}, timeout=10)
        answer = post_generate(first.url)
        assert answer.json()["data"]["status"] == "queued"
        # the answer left; once the service has recorded that, the task is the client's
        wait_until(lambda: handed(tmp_path / "data"), what="the delivery to be recorded")
        first.kill()
    finally:
        first.stop()
    task_id = answer.json()["data"]["id"]
    upstream.release()
    second = ServiceProcess(env, cwd=str(tmp_path)).wait_ready()
    try:
        wait_until(lambda: ledger_rows(tmp_path / "data")[0][1] == "queued", what="the reconciler")
        assert balance(second.url) == 9
        upstream.complete_task(task_id)

        def completed() -> bool:
            url = f"{second.url}/api/images/tasks/{task_id}"
            return httpx.get(url, timeout=10).json()["data"]["status"] == "completed"

        wait_until(completed, what="the image copy")
    finally:
        second.stop()


def test_sigterm_answers_a_generate_in_flight_with_its_task(upstream, tmp_path):
    """On shutdown the request in flight gets its task (queued), not a plain-text 500."""
    env = env_for(upstream, SCENEMINT_DATA_DIR=str(tmp_path / "data"))
    hold = upstream.hold(GENERATIONS)
    server = ServiceProcess(env, cwd=str(tmp_path)).wait_ready()
    try:
        httpx.post(server.url + "/api/quota/check-in", json={"fingerprint": FP}, timeout=10)
        result: dict = {}
        client = threading.Thread(
            target=lambda: result.setdefault("answer", post_generate(server.url)), daemon=True
        )
        client.start()
        assert hold.wait(15)
        began = time.monotonic()
        server.process.terminate()
        client.join(15)
        assert time.monotonic() - began < 5
        answer = result["answer"]
        assert answer.status_code == 200, answer.text
        assert answer.json()["data"]["status"] == "queued"
        assert server.process.wait(15) == 0
    finally:
        upstream.release()
        server.stop()
    task_id = answer.json()["data"]["id"]
    conn = sqlite3.connect(tmp_path / "data" / "scenemint.sqlite3")
    handed, owner = conn.execute(
        "SELECT handed_at, lease_owner FROM tasks WHERE id = ?", (task_id,)
    ).fetchone()
    conn.close()
    assert handed is not None and owner is None


# --- two instances, one PostgreSQL database ------------------------------------------------


@pytest.fixture
def two_instances(upstream, postgres_url, tmp_path):
    env = env_for(upstream, SCENEMINT_DATABASE_URL=postgres_url, SCENEMINT_RECONCILE_INTERVAL="1")
    instances = [ServiceProcess(env, cwd=str(tmp_path)) for _ in range(2)]
    try:
        for instance in instances:
            instance.wait_ready()
        yield instances, env
    finally:
        for instance in instances:
            instance.stop()


def test_two_instances_charge_exactly_the_balance(two_instances, upstream, tmp_path):
    (a, b), env = two_instances
    httpx.post(a.url + "/api/quota/check-in", json={"fingerprint": FP}, timeout=10)

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=60) as client:
            answers = await asyncio.gather(
                *(
                    client.post(
                        (a, b)[i % 2].url + "/api/images/generate",
                        json={"prompt": f"p{i}", "fingerprint": FP},
                    )
                    for i in range(100)
                )
            )
        return [answer.status_code for answer in answers]

    statuses = asyncio.run(burst())
    assert statuses.count(200) == 10 and statuses.count(402) == 90
    assert len(upstream.recorded(GENERATIONS)) == 10
    assert balance(a.url) == 0 and balance(b.url) == 0
    checked = audit(env, tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_two_instances_polling_a_failed_task_refund_it_once(two_instances, upstream, tmp_path):
    (a, b), env = two_instances
    httpx.post(a.url + "/api/quota/check-in", json={"fingerprint": FP}, timeout=10)
    task = httpx.post(
        a.url + "/api/images/generate", json={"prompt": "doomed", "fingerprint": FP}, timeout=10
    ).json()["data"]
    upstream.fail_task(task["id"], "upstream exploded")

    async def polls() -> list[dict]:
        async with httpx.AsyncClient(timeout=30) as client:
            answers = await asyncio.gather(
                *(
                    client.get(f"{(a, b)[i % 2].url}/api/images/tasks/{task['id']}")
                    for i in range(60)
                )
            )
        return [answer.json()["data"] for answer in answers]

    results = asyncio.run(polls())
    assert {r["status"] for r in results} == {"failed"}
    assert balance(b.url) == 10
    checked = audit(env, tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "charged 1, refunded 1" in checked.stdout


def test_reconciler_refunds_a_failure_nobody_polls(two_instances, upstream, tmp_path):
    (a, b), env = two_instances
    httpx.post(a.url + "/api/quota/check-in", json={"fingerprint": FP}, timeout=10)
    task = httpx.post(
        b.url + "/api/images/generate", json={"prompt": "quiet", "fingerprint": FP}, timeout=10
    ).json()["data"]
    upstream.fail_task(task["id"])
    wait_until(lambda: balance(a.url) == 10, timeout=10, what="the reconciler's refund")
    checked = audit(env, tmp_path)
    assert checked.returncode == 0 and "refunded 1" in checked.stdout


def test_serve_with_two_workers_shares_one_sqlite_ledger(upstream, tmp_path):
    """`serve --workers 2`: both processes answer, on one WAL-mode SQLite file."""
    env = env_for(upstream, SCENEMINT_DATA_DIR=str(tmp_path / "data"))
    server = ServiceProcess(env, cwd=str(tmp_path), args=("--workers", "2")).wait_ready()
    try:
        wait_until(
            lambda: server.log().count("Application startup complete") >= 2,
            what="both workers started",
        )

        async def burst() -> list[int]:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                await client.post("/api/quota/check-in", json={"fingerprint": FP})
                answers = await asyncio.gather(
                    *(
                        client.post(
                            "/api/images/generate", json={"prompt": f"w{i}", "fingerprint": FP}
                        )
                        for i in range(30)
                    )
                )
            return [answer.status_code for answer in answers]

        statuses = asyncio.run(burst())
        assert statuses.count(200) == 10 and statuses.count(402) == 20
        assert len(upstream.recorded(GENERATIONS)) == 10
        pids = set(re.findall(r"Started server process \[(\d+)\]", server.log()))
        assert len(pids) == 2
    finally:
        server.stop()
    checked = audit(env, tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
