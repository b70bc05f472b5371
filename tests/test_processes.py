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


def audit(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scenemint", "credits", "audit"],
        env={"PATH": "/usr/bin:/bin", **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def balance(url: str, fingerprint: str = FP) -> int:
    answer = httpx.post(url + "/api/quota/status", json={"fingerprint": fingerprint}, timeout=10)
    return int(answer.json()["data"]["balance"])


def kill_during_submission(upstream, tmp_path: Path, env: dict[str, str]) -> str:
    """Start a service, let it charge and submit, SIGKILL it while the upstream holds the answer."""
    hold = upstream.hold(GENERATIONS)
    first = ServiceProcess(env, cwd=str(tmp_path)).wait_ready()
    try:
        httpx.post(first.url + "/api/quota/check-in", json={"fingerprint": FP}, timeout=10)

        def doomed_request() -> None:
            with contextlib.suppress(httpx.HTTPError):  # the server dies under it
                httpx.post(
                    first.url + "/api/images/generate",
                    json={"prompt": "a boat", "fingerprint": FP},
                    timeout=30,
                )

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
def test_credit_survives_a_sigkill_during_submission(upstream, tmp_path, upstream_kept_it):
    """Killed between charge and answer; after restart the credit is spent on a real task."""
    env = env_for(upstream, SCENEMINT_DATA_DIR=str(tmp_path / "data"))
    task_id = kill_during_submission(upstream, tmp_path, env)
    upstream.release()
    if not upstream_kept_it:
        upstream.forget_task(task_id)
    second = ServiceProcess(env, cwd=str(tmp_path)).wait_ready()
    try:
        # the start-up reconcile settles the row without anyone polling
        wait_until(
            lambda: ledger_rows(tmp_path / "data")[0][1] != "submitting",
            what="start-up reconciliation",
        )
        assert ledger_rows(tmp_path / "data") == [(task_id, "queued", 0)]
        assert upstream.task(task_id) is not None
        assert len(upstream.recorded(GENERATIONS)) == (1 if upstream_kept_it else 2)
        assert balance(second.url) == 9
        upstream.complete_task(task_id)
        polled = httpx.get(f"{second.url}/api/images/tasks/{task_id}", timeout=10).json()["data"]
        assert polled["status"] == "completed"
    finally:
        second.stop()
    checked = audit(env, tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "charged 1, refunded 0" in checked.stdout


def test_credit_of_a_killed_submission_too_old_to_resubmit_is_refunded(upstream, tmp_path):
    env = env_for(upstream, SCENEMINT_DATA_DIR=str(tmp_path / "data"))
    task_id = kill_during_submission(upstream, tmp_path, env)
    upstream.release()
    upstream.forget_task(task_id)
    second = ServiceProcess({**env, "SCENEMINT_RESUBMIT_WINDOW": "0"}, cwd=str(tmp_path))
    try:
        second.wait_ready()
        wait_until(lambda: ledger_rows(tmp_path / "data")[0][2] == 1, what="refund")
        assert ledger_rows(tmp_path / "data") == [(task_id, "failed", 1)]
        assert balance(second.url) == 10
        assert len(upstream.recorded(GENERATIONS)) == 1
    finally:
        second.stop()
    checked = audit(env, tmp_path)
    assert checked.returncode == 0 and "charged 1, refunded 1" in checked.stdout


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
