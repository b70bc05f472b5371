"""The openai kind: any OpenAI Images API as the upstream, its synchronous generations run as
durable jobs of ours (charged queued, run by lease, sent at most once)."""

from __future__ import annotations

import base64
import json
import signal
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import (
    FINGERPRINT,
    POSTGRES_URL,
    SKIP_POSTGRES,
    balance,
    check_in,
    make_settings,
    postgres_schema_url,
    wait_finished,
)
from tests.fake_openai import API_KEY, FakeOpenAI
from tests.fake_upstream import make_png
from tests.service_runner import RunningService, ServiceProcess, running_service

GENERATIONS = "/v1/images/generations"


@pytest.fixture
def openai() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


def openai_settings(tmp_path: Path, fake: FakeOpenAI, **overrides: object):
    values: dict[str, object] = {
        "upstream_kind": "openai",
        "upstream_base_url": fake.base_url + "/v1",
        "upstream_api_key": fake.api_key,
        "image_model": "gpt-image-1",
        "prompt_model": "gpt-5-mini",
        "lease_seconds": 2.0,
    }
    values.update(overrides)
    return make_settings(tmp_path, None, **values)


@pytest.fixture
def service(tmp_path, openai, logs) -> Iterator[RunningService]:
    with running_service(openai_settings(tmp_path, openai)) as running:
        check_in(running)
        yield running


def generate(running: RunningService, prompt: str = "a red fox", **body: object) -> dict:
    answer = running.http.post(
        "/api/images/generate",
        json={"prompt": prompt, "fingerprint": FINGERPRINT, **body},
    )
    assert answer.status_code == 200, answer.text
    return answer.json()["data"]


def audit(running: RunningService):
    return running.run(running.service.store.audit())


def row(running: RunningService, task_id: str):
    return running.run(running.service.store.get_task(task_id))


# -- the whole flow ------------------------------------------------------------------------------


def test_a_generation_is_queued_at_once_then_runs_then_completes(service, openai):
    """The original web UI's poll loop sees queued -> running -> completed."""
    openai.delay = 0.6
    started = time.monotonic()
    task = generate(service, size="16:9")
    assert time.monotonic() - started < 0.5  # answered at once, not after the generation
    assert task["status"] == "queued" and task["remainingCredits"] == 9
    seen = [task["status"]]
    deadline = time.monotonic() + 10
    while seen[-1] != "completed" and time.monotonic() < deadline:
        status = service.http.get(f"/api/images/tasks/{task['id']}").json()["data"]["status"]
        if status != seen[-1]:
            seen.append(status)
        time.sleep(0.05)
    assert seen == ["queued", "running", "completed"]
    done = service.http.get(f"/api/images/tasks/{task['id']}").json()["data"]
    assert done["revisedPrompt"] == "revised: a red fox"
    image = service.http.get(done["image"])
    assert image.status_code == 200 and image.content == openai.image
    (sent,) = openai.generations
    # only the fields named by the issue: gateways refuse others (response_format...)
    assert sent.fields == {
        "model": "gpt-image-1",
        "prompt": "a red fox",
        "n": 1,
        "size": "1536x1024",
    }
    assert sent.authorization == f"Bearer {API_KEY}"
    assert balance(service) == 9 and audit(service).ok


def test_a_url_answer_is_copied_into_the_store(tmp_path, openai, logs):
    openai.answer = "url"
    settings = openai_settings(tmp_path, openai, image_hosts=[openai.base_url])
    with running_service(settings) as running:
        check_in(running)
        task = generate(running)
        assert wait_finished(running, task["id"])["status"] == "completed"
        assert running.http.get(f"/api/images/tasks/{task['id']}/image").content == openai.image
        assert row(running, task["id"]).image_key is not None


def test_an_edit_sends_the_reference_as_multipart(service, openai):
    reference = make_png(4, 4)
    answer = service.http.post(
        "/api/images/generate",
        data={"prompt": "make it blue", "fingerprint": FINGERPRINT, "size": "9:16"},
        files={"image": ("ref.png", reference, "image/png")},
    )
    task = answer.json()["data"]
    assert task["mode"] == "image"
    assert wait_finished(service, task["id"])["status"] == "completed"
    (sent,) = openai.generations
    assert sent.path == "/v1/images/edits"
    assert sent.image == reference
    assert sent.fields == {
        "model": "gpt-image-1",
        "prompt": "make it blue",
        "n": "1",
        "size": "1024x1536",
    }


def test_the_sizes_can_be_mapped(tmp_path, openai, logs):
    settings = openai_settings(tmp_path, openai, openai_sizes="16:9=1792x1024")
    with running_service(settings) as running:
        check_in(running)
        wait_finished(running, generate(running, size="16:9")["id"])
    assert openai.generations[0].fields["size"] == "1792x1024"


# -- every outcome settles the credit right ------------------------------------------------------


def test_a_content_policy_refusal_fails_and_refunds_with_a_clear_message(service, openai):
    openai.fail_next(400, code="content_policy_violation", message="Your request was rejected")
    task = generate(service, "something forbidden")
    done = wait_finished(service, task["id"])
    assert done["status"] == "failed"
    assert "safety" in done["error"] and "credit was returned" in done["error"]
    zh = service.http.get(
        f"/api/images/tasks/{task['id']}", headers={"Accept-Language": "zh-CN"}
    ).json()["data"]
    assert "额度已退回" in zh["error"]
    assert balance(service) == 10 and audit(service).ok


def test_a_plain_refusal_fails_and_refunds(service, openai):
    openai.fail_next(400, code="invalid_value", message="Invalid size")
    done = wait_finished(service, generate(service)["id"])
    assert done["status"] == "failed"
    assert row(service, done["id"]).error_code == "submit_refused"
    assert balance(service) == 10


@pytest.mark.parametrize(
    "outcome",
    [
        pytest.param({"status": 429, "retry_after": "1", "code": "rate_limit_exceeded"}, id="429"),
        pytest.param({"status": 503, "code": "overloaded"}, id="503"),
    ],
)
def test_an_answer_proving_nothing_was_made_is_sent_again(service, openai, outcome):
    openai.fail_next(**outcome)
    started = time.monotonic()
    done = wait_finished(service, generate(service)["id"])
    assert done["status"] == "completed"
    assert len(openai.generations) == 2
    if outcome["status"] == 429:
        assert time.monotonic() - started >= 1.0  # Retry-After was honoured
    assert balance(service) == 9


@pytest.mark.parametrize(
    "outcome",
    [
        pytest.param({"status": 500}, id="500"),
        pytest.param({"status": 502}, id="502"),
        pytest.param({"status": 504}, id="504"),
        pytest.param({"drop": True}, id="dropped-mid-generation"),
    ],
)
def test_a_generation_without_an_answer_is_refunded_never_sent_again(service, openai, outcome):
    """It may have been made (and paid for upstream): never silently re-run."""
    openai.delay = 0.3
    openai.fail_next(**outcome)
    done = wait_finished(service, generate(service)["id"])
    assert done["status"] == "failed"
    assert row(service, done["id"]).error_code == "generation_interrupted"
    time.sleep(0.5)
    assert len(openai.generations) == 1
    assert balance(service) == 10 and audit(service).ok


def test_jobs_wait_while_our_breaker_is_open_instead_of_being_refunded(tmp_path, openai, logs):
    """Four 500s open the breaker; the jobs queued behind them were never sent, so they are
    not refused: they wait for the cool-down and then run."""
    settings = openai_settings(
        tmp_path,
        openai,
        job_concurrency=1,
        breaker_min_calls=4,
        breaker_failure_rate=0.5,
        breaker_cooldown=2.0,
    )
    with running_service(settings) as running:
        check_in(running)
        openai.delay = 0.1
        openai.fail_next(500, times=4)
        # all queued at once, run one at a time: four fail (and open the breaker), three wait
        ids = [generate(running, f"job {i}")["id"] for i in range(7)]
        for task_id in ids[:4]:
            assert wait_finished(running, task_id)["status"] == "failed"
        assert running.service.router.client("default").http.breakers["submit"].is_open
        waiting = running.http.get(f"/api/images/tasks/{ids[4]}").json()["data"]
        assert waiting["status"] == "queued" and waiting["queuePosition"] == 1
        assert (
            row(running, ids[4]).lease_owner is None
            or row(running, ids[4]).lease_until < time.time()
        )
        for task_id in ids[4:]:
            assert wait_finished(running, task_id, timeout=20)["status"] == "completed"
        assert len(openai.generations) == 4 + 3  # each sent once
        assert balance(running) == 10 - 3 and audit(running).ok


def test_a_generation_over_its_time_is_refunded_never_sent_again(tmp_path, openai, logs):
    openai.delay = 3.0
    with running_service(openai_settings(tmp_path, openai, generation_timeout=0.5)) as running:
        check_in(running)
        started = time.monotonic()
        done = wait_finished(running, generate(running)["id"])
        assert done["status"] == "failed" and time.monotonic() - started < 2.5
        assert len(openai.generations) == 1
        assert balance(running) == 10


def test_an_answer_that_is_not_an_image_is_refunded(service, openai):
    openai.image = b"<html>not an image</html>"
    done = wait_finished(service, generate(service)["id"])
    assert done["status"] == "failed"
    assert balance(service) == 10


# -- the queue ---------------------------------------------------------------------------------


def test_a_queued_task_says_its_place_in_the_queue(tmp_path, openai, logs):
    openai.delay = 1.0
    with running_service(openai_settings(tmp_path, openai, job_concurrency=1)) as running:
        check_in(running)
        first, second, third = (generate(running, f"p{i}") for i in range(3))
        time.sleep(0.3)
        polled = [
            running.http.get(f"/api/images/tasks/{t['id']}").json()["data"]
            for t in (first, second, third)
        ]
        assert polled[0]["status"] == "running" and "queuePosition" not in polled[0]
        assert [p.get("queuePosition") for p in polled[1:]] == [1, 2]
        assert first["queuePosition"] == 1 and third["queuePosition"] >= 2


# -- crashes: a job whose runner died is refunded, never run twice ------------------------------


def process_env(tmp_path: Path, fake: FakeOpenAI, **extra: str) -> dict[str, str]:
    """`scenemint serve` as a subprocess on the fake, with short leases."""
    return {
        "SCENEMINT_UPSTREAM_KIND": "openai",
        "CHATGPT2API_BASE_URL": fake.base_url,
        "CHATGPT2API_API_KEY": fake.api_key,
        "SCENEMINT_DATA_DIR": str(tmp_path / "data"),
        "SCENEMINT_LEASE_SECONDS": "2",
        **extra,
    }


def send_one_generation(process: ServiceProcess, fake: FakeOpenAI) -> dict:
    """Charge and queue one generation, and return once the fake has received it."""
    httpx.post(process.url + "/api/quota/check-in", json={"fingerprint": FINGERPRINT})
    task: dict = httpx.post(
        process.url + "/api/images/generate",
        json={"prompt": "a fox", "fingerprint": FINGERPRINT},
    ).json()["data"]
    deadline = time.monotonic() + 10
    while not fake.generations:
        assert time.monotonic() < deadline, "the job was never sent"
        time.sleep(0.05)
    return task


def ledger(tmp_path: Path, columns: str, task_id: str) -> tuple:
    """Columns of a task's row, read straight from the SQLite file."""
    conn = sqlite3.connect(tmp_path / "data" / "scenemint.sqlite3")
    try:
        ((*values,),) = conn.execute(
            f"SELECT {columns} FROM tasks WHERE id = ?", (task_id,)
        ).fetchall()
    finally:
        conn.close()
    return tuple(values)


def test_a_runner_killed_mid_generation_refunds_and_the_upstream_saw_one(tmp_path, openai):
    openai.delay = 30.0  # the generation is still running when the instance dies
    env = process_env(tmp_path, openai, SCENEMINT_RECONCILE_INTERVAL="0.5")
    first = ServiceProcess(env, cwd=str(tmp_path)).wait_ready()
    try:
        task = send_one_generation(first, openai)
        first.kill()
        killed = time.monotonic()
    finally:
        first.stop()
    second = ServiceProcess(env, cwd=str(tmp_path)).wait_ready()
    try:
        while True:
            state = httpx.get(f"{second.url}/api/images/tasks/{task['id']}").json()["data"]
            if state["status"] == "failed":
                break
            assert time.monotonic() - killed < 2 + 0.5 + 10, "not settled within a lease period"
            time.sleep(0.1)
        status = httpx.post(second.url + "/api/quota/status", json={"fingerprint": FINGERPRINT})
        assert status.json()["data"]["balance"] == 10
        time.sleep(1.0)
        assert len(openai.generations) == 1
    finally:
        second.stop()
    assert ledger(tmp_path, "error_code, refunded", task["id"]) == ("generation_interrupted", 1)


def test_a_sigterm_lets_a_generation_already_sent_finish(tmp_path, openai):
    """The upstream makes (and bills) a generation it received anyway: a deploy's SIGTERM
    waits for it (SCENEMINT_JOB_DRAIN_TIMEOUT) instead of cutting and refunding it."""
    openai.delay = 2.0
    first = ServiceProcess(process_env(tmp_path, openai), cwd=str(tmp_path)).wait_ready()
    try:
        task = send_one_generation(first, openai)
        first.process.terminate()
        assert first.process.wait(15) is not None
        assert "letting 1 running finish" in first.log()
    finally:
        first.stop()
    assert ledger(tmp_path, "state, refunded", task["id"]) == ("completed", 0)
    assert len(openai.generations) == 1


def test_a_job_claimed_as_the_server_stops_is_not_sent_but_left_queued(service, openai):
    """Claimed but not yet sent when the shutdown began: sending it now could only have it
    cut (and billed upstream); it stays queued, free for the next runner."""
    svc = service.service
    svc.shutting_down.set()  # what the first stop signal does: the runners claim no more
    task = generate(service)
    assert service.run(svc.claim_jobs("default", owner=svc.owner, seconds=30, limit=5)) == []
    (claimed,) = service.run(
        svc.store.claim_jobs(upstream="default", owner=svc.owner, seconds=30, limit=5)
    )
    assert service.run(svc.run_job(claimed)) is None
    after = row(service, task["id"])
    assert after.state == "queued" and after.lease_until <= time.time()
    assert openai.generations == [] and balance(service) == 9


def test_a_second_stop_signal_cuts_the_drain(tmp_path, openai):
    openai.delay = 30.0
    process = ServiceProcess(process_env(tmp_path, openai), cwd=str(tmp_path)).wait_ready()
    try:
        send_one_generation(process, openai)
        process.process.terminate()
        deadline = time.monotonic() + 10
        while "letting 1 running finish" not in process.log():
            assert time.monotonic() < deadline, process.log()
            time.sleep(0.05)
        assert process.process.poll() is None  # draining
        process.process.send_signal(signal.SIGINT)
        process.process.wait(5)  # not the 30 s of the generation
    finally:
        process.stop()


# -- several instances share the work ------------------------------------------------------------


FLEET = [f"fleet-fingerprint-{i:03d}" for i in range(20)]


def test_two_instances_run_every_job_exactly_once_sharing_the_work(tmp_path, openai, logs):
    if not POSTGRES_URL:
        pytest.skip(SKIP_POSTGRES)
    openai.delay = 0.25
    tasks = 200
    for database in postgres_schema_url():
        common = {"database_url": database, "job_concurrency": 4, "lease_seconds": 10.0}
        first = openai_settings(tmp_path / "a", openai, **common)
        second = openai_settings(tmp_path / "b", openai, **common)
        with running_service(first) as a, running_service(second) as b:
            for fingerprint in FLEET:
                check_in(a, fingerprint)

            def submit(index: int) -> str:
                target = (a, b)[index % 2]
                answer = target.http.post(
                    "/api/images/generate",
                    json={"prompt": f"job {index}", "fingerprint": FLEET[index // 10]},
                )
                assert answer.status_code == 200, answer.text
                return str(answer.json()["data"]["id"])

            started = time.monotonic()
            with ThreadPoolExecutor(16) as pool:
                ids = list(pool.map(submit, range(tasks)))
            for task_id in ids:
                assert wait_finished(a, task_id, timeout=60)["status"] == "completed"
            took = time.monotonic() - started
            counts = openai.by_prompt()
            assert len(counts) == tasks and set(counts.values()) == {1}, "a job ran twice"
            done_a = sum(r.finished for r in a.app.state.runners)
            done_b = sum(r.finished for r in b.app.state.runners)
            assert done_a + done_b == tasks and done_a > tasks // 4 and done_b > tasks // 4
            assert openai.most_in_flight <= 8
            # no task waited while a runner was idle: the 8 runners stayed busy
            ideal = tasks / 8 * openai.delay
            assert took < ideal * 2 + 3, f"{took:.1f} s for an ideal {ideal:.1f} s"
            assert audit(a).ok


def test_jobs_left_by_the_openai_kind_are_refunded_after_a_switch_never_spun_on(
    tmp_path, openai, upstream, logs
):
    """An operator switches back to chatgpt2api with jobs still queued: nobody claims them
    (no claim-and-release loop), and the age rule refunds them."""
    openai.delay = 3.0
    with running_service(openai_settings(tmp_path, openai, job_concurrency=1)) as running:
        check_in(running)
        sent = generate(running, "sent before the switch")
        waiting = generate(running, "queued at the switch")
        deadline = time.monotonic() + 5
        while not openai.generations:
            assert time.monotonic() < deadline, "the first job was never sent"
            time.sleep(0.05)
    switched = make_settings(
        tmp_path, upstream, lease_seconds=1.0, task_max_age=3.0, reconcile_interval=0.3
    )
    with running_service(switched) as running:
        owner = running.service.owner
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            assert row(running, waiting["id"]).lease_owner != owner, "a chatgpt2api runner took it"
            time.sleep(0.05)
        assert wait_finished(running, waiting["id"])["status"] == "failed"
        assert row(running, waiting["id"]).error_code == "timed_out"
        # the job already sent finished while the first instance shut down
        assert wait_finished(running, sent["id"])["status"] == "completed"
        assert balance(running) == 9 and audit(running).ok
    assert len(openai.generations) == 1  # the queued job was never sent


# -- the rest of the service does not change with the kind ----------------------------------------


def test_readiness_asks_the_models_with_the_key(service, openai):
    answer = service.http.get("/readyz")
    assert answer.status_code == 200, answer.text
    data = answer.json()["data"]
    assert (data["status"], data["chat"]) == ("ready", "available")
    assert [(u["name"], u["kind"], u["state"]) for u in data["upstreams"]] == [
        ("default", "openai", "ready")
    ]


def test_azure_style_keys_go_in_the_api_key_header(tmp_path, openai, logs):
    with running_service(openai_settings(tmp_path, openai, openai_auth="api-key")) as running:
        check_in(running)
        assert wait_finished(running, generate(running)["id"])["status"] == "completed"
        (sent,) = openai.generations
        assert sent.api_key == API_KEY and sent.authorization is None


def test_enhancement_works_with_a_reasoning_model_s_default_temperature(service, openai):
    answer = service.http.post(
        "/api/prompts/enhance", json={"prompt": "a cat", "direction": "creative"}
    )
    assert answer.status_code == 200
    assert answer.text.rstrip().endswith("data: [DONE]")
    (body,) = openai.chat_bodies
    assert "temperature" not in body  # gpt-5 and o-series models refuse any other
    assert body["model"] == "gpt-5-mini" and body["stream"] is True


def test_the_key_never_reaches_a_client_or_the_log(service, openai, logs):
    openai.fail_next(400, code="invalid_value", message=f"bad key {API_KEY}")
    done = wait_finished(service, generate(service)["id"])
    assert API_KEY not in json.dumps(done)
    assert API_KEY not in logs.text()


def test_b64_answers_decode_to_the_stored_bytes(service, openai):
    picture = make_png(3, 2, rgb=(1, 2, 3))
    openai.image = picture
    done = wait_finished(service, generate(service)["id"])
    stored = service.http.get(done["image"]).content
    assert stored == picture == base64.b64decode(base64.b64encode(picture))


def test_a_breaker_opening_between_attempts_puts_the_job_back_unsent(tmp_path, openai, logs):
    """Issue 18: two 503s (nothing was made) opened our breaker in the middle of a job's
    attempts; the next attempt was refused by our own breaker and the job was failed and
    refunded as `submit_refused`. Nothing was sent: it goes back to its queue, not running,
    and is sent once the cool-down lets calls through."""
    settings = openai_settings(
        tmp_path,
        openai,
        job_concurrency=1,
        breaker_min_calls=2,
        breaker_failure_rate=0.5,
        breaker_cooldown=2.0,
    )
    with running_service(settings) as running:
        check_in(running)
        openai.fail_next(503, times=2, code="overloaded")
        task_id = generate(running)["id"]
        breaker = running.service.router.client("default").http.breakers["submit"]
        deadline = time.monotonic() + 10
        while not breaker.is_open:
            assert time.monotonic() < deadline, "the breaker never opened"
            time.sleep(0.02)
        deadline = time.monotonic() + 5
        while (held := row(running, task_id)).state != "queued":
            assert time.monotonic() < deadline, held
            time.sleep(0.02)
        assert held.sent_at is None and not held.refunded
        assert wait_finished(running, task_id, timeout=20)["status"] == "completed"
        assert len(openai.generations) == 3  # two 503s, then the one that made it
        assert balance(running) == 9 and audit(running).ok
