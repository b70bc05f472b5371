"""Several upstreams with real `scenemint serve` processes: a SIGKILL in the middle of a
failover, two instances on PostgreSQL sharing the work, and a bad upstreams file."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.fake_upstream import FakeUpstream, make_png
from tests.service_runner import ServiceProcess

GENERATIONS = "/api/image-tasks/generations"
FP = "upstreams-process-fp-1"


@pytest.fixture
def two_pools():
    with (
        FakeUpstream(api_key="pool-a-SECRET-key-0001") as a,
        FakeUpstream(api_key="pool-b-SECRET-key-0002") as b,
    ):
        yield a, b


def write_file(path: Path, a: FakeUpstream, b: FakeUpstream) -> Path:
    path.write_text(
        f"""
[[upstream]]
name = "pool-a"
base_url = "{a.base_url}"
api_key_env = "POOL_A_KEY"
priority = 1

[[upstream]]
name = "pool-b"
base_url = "{b.base_url}"
api_key_env = "POOL_B_KEY"
priority = 2
"""
    )
    return path


def env_for(tmp_path: Path, a: FakeUpstream, b: FakeUpstream, **extra: str) -> dict[str, str]:
    return {
        "SCENEMINT_UPSTREAMS_FILE": str(write_file(tmp_path / "upstreams.toml", a, b)),
        "POOL_A_KEY": a.api_key,
        "POOL_B_KEY": b.api_key,
        "SCENEMINT_DATA_DIR": str(tmp_path / "data"),
        "SCENEMINT_RECONCILE_INTERVAL": "0.5",
        "SCENEMINT_POLL_MIN_INTERVAL": "0",
        **extra,
    }


def generate(url: str, *, key: str | None = None, prompt: str = "a boat") -> httpx.Response:
    headers = {"Idempotency-Key": key} if key else {}
    return httpx.post(
        url + "/api/images/generate",
        json={"prompt": prompt, "fingerprint": FP},
        headers=headers,
        timeout=30,
    )


def audit(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scenemint", "audit", "credits"],
        env={"PATH": "/usr/bin:/bin", **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def client_task_ids(fake: FakeUpstream) -> list[str]:
    return [r.json["client_task_id"] for r in fake.recorded(GENERATIONS) if r.json]


def test_a_sigkill_in_the_middle_of_a_failover_charges_once_and_makes_one_image(
    tmp_path, two_pools
):
    """pool-a refuses (429): the task moves on to pool-b, written before it is sent there;
    the process is killed while pool-b holds the answer. After a restart the client comes
    back with its key and gets the task pool-b made — charged once, pool-a never asked
    again, one image."""
    a, b = two_pools
    a.fail(GENERATIONS, status=429)
    hold = b.hold(GENERATIONS)
    env = env_for(tmp_path, a, b, SCENEMINT_LEASE_SECONDS="3")
    first = ServiceProcess(env, cwd=str(tmp_path)).wait_ready()
    try:
        httpx.post(first.url + "/api/quota/check-in", json={"fingerprint": FP}, timeout=10)

        def doomed() -> None:
            with contextlib.suppress(httpx.HTTPError):
                generate(first.url, key="failover-key")

        client = threading.Thread(target=doomed, daemon=True)
        client.start()
        assert hold.wait(15), "the task never reached pool-b"
        first.kill()
        client.join(10)
    finally:
        first.stop()
    hold.release()
    (task_id,) = client_task_ids(b)
    assert client_task_ids(a) == [task_id]  # refused there once, never sent there again
    second = ServiceProcess(env, cwd=str(tmp_path)).wait_ready()
    try:
        deadline = time.monotonic() + 20
        answer = generate(second.url, key="failover-key")
        while answer.status_code == 409:
            assert time.monotonic() < deadline
            time.sleep(0.3)
            answer = generate(second.url, key="failover-key")
        assert answer.status_code == 200, answer.text
        assert answer.json()["data"]["id"] == task_id
        b.complete_task(task_id, image=make_png(3, 3))
        deadline = time.monotonic() + 20
        while (
            task := httpx.get(f"{second.url}/api/images/tasks/{task_id}", timeout=10).json()["data"]
        )["status"] not in ("completed", "failed"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert task["status"] == "completed"
        assert len(b.tasks) == 1 and a.tasks == {}
        assert client_task_ids(a) == [task_id]  # still: pool-a was never sent it again
        balance = httpx.post(
            second.url + "/api/quota/status", json={"fingerprint": FP}, timeout=10
        ).json()["data"]["balance"]
        assert balance == 9
    finally:
        second.stop()
    checked = audit(env, tmp_path)
    assert checked.returncode == 0 and "charged 1, refunded 0" in checked.stdout, checked.stdout


def test_two_instances_on_postgresql_share_upstreams_and_moves(tmp_path, two_pools, postgres_url):
    """Two instances, one database, the same two upstreams: tasks sent from both, a late
    capacity failure at pool-a moves tasks on (by whichever instance sees it first), each
    task is charged once and made at one upstream."""
    a, b = two_pools
    env = env_for(tmp_path, a, b, SCENEMINT_DATABASE_URL=postgres_url)
    instances = [ServiceProcess(env, cwd=str(tmp_path)) for _ in range(2)]
    try:
        for instance in instances:
            instance.wait_ready()
        httpx.post(instances[0].url + "/api/quota/check-in", json={"fingerprint": FP}, timeout=10)
        ids = []
        for n in range(8):
            answer = generate(instances[n % 2].url, prompt=f"boat {n}")
            assert answer.status_code == 200, answer.text
            ids.append(answer.json()["data"]["id"])
        assert sorted(client_task_ids(a)) == sorted(ids)  # all went to the first priority
        for task_id in ids[:4]:
            a.fail_task(task_id, "no available image quota")
        for task_id in ids[4:]:
            a.complete_task(task_id)
        deadline = time.monotonic() + 30
        while sorted(client_task_ids(b)) != sorted(ids[:4]):  # moved on by the reconcilers
            assert time.monotonic() < deadline, client_task_ids(b)
            for instance in instances:
                for task_id in ids[:4]:
                    httpx.get(f"{instance.url}/api/images/tasks/{task_id}", timeout=10)
            time.sleep(0.2)
        for task_id in ids[:4]:
            b.complete_task(task_id)
        for n, task_id in enumerate(ids):
            url = instances[n % 2].url
            deadline = time.monotonic() + 30
            while (
                status := httpx.get(f"{url}/api/images/tasks/{task_id}", timeout=10).json()["data"][
                    "status"
                ]
            ) not in ("completed", "failed"):
                assert time.monotonic() < deadline
                time.sleep(0.1)
            assert status == "completed"
        balance = httpx.post(
            instances[1].url + "/api/quota/status", json={"fingerprint": FP}, timeout=10
        ).json()["data"]["balance"]
        assert balance == 2
    finally:
        for instance in instances:
            instance.stop()
    checked = audit(env, tmp_path)
    assert checked.returncode == 0 and "charged 8, refunded 0" in checked.stdout, checked.stdout


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            '[[upstream]]\nname = "a"\nbase_url = "http://x"\napi_key = "k"\nweight = 0\n',
            "[[upstream]] #1 (a): weight: Input should be greater than or equal to 1",
            id="weight",
        ),
        pytest.param(
            '[[upstream]]\nname = "a"\nbase_url = "ftp://x"\napi_key = "k"\n',
            "[[upstream]] #1 (a): base_url: must be an http(s) URL",
            id="url",
        ),
        pytest.param(
            '[[upstream]]\nname = "a"\nbase_url = "http://x"\napi_key_env = "NOT_SET_ANYWHERE"\n',
            "[[upstream]] #1 (a): api_key_env: the variable NOT_SET_ANYWHERE is not set",
            id="key-env",
        ),
        pytest.param(
            '[[upstream]]\nname = "a"\nbase_url = "http://x"\napi_key = "k"\nkind = "dall-e"\n',
            "[[upstream]] #1 (a): kind: Input should be 'chatgpt2api' or 'openai'",
            id="kind",
        ),
        pytest.param(
            '[[upstream]]\nname = "a"\nbase_url = "http://x"\napi_key = "k"\npriorty = 1\n',
            "[[upstream]] #1 (a): priorty: not a key of [[upstream]]",
            id="typo",
        ),
        pytest.param(
            '[[upstream]]\nname = "a"\nbase_url = "http://x"\napi_key = "sk-1 sk-2"\n',
            "[[upstream]] #1 (a): api_key: must be printable ASCII without spaces",
            id="key-with-a-space",
        ),
        pytest.param("[[upstream]\n", "not valid TOML", id="toml"),
    ],
)
def test_a_bad_upstreams_file_stops_the_service_naming_the_table_and_key(tmp_path, text, message):
    file = tmp_path / "upstreams.toml"
    file.write_text(text)
    done = subprocess.run(
        [sys.executable, "-m", "scenemint", "serve", "--port", "0"],
        env={
            "PATH": "/usr/bin:/bin",
            "SCENEMINT_UPSTREAMS_FILE": str(file),
            "SCENEMINT_DATA_DIR": str(tmp_path / "data"),
        },
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) <= 2, done.stderr
    assert '"k"' not in done.stderr
