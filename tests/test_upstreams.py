"""Several upstreams, black-box: a real service configured by `SCENEMINT_UPSTREAMS_FILE` with
three fake upstreams — two chatgpt2api pools and an OpenAI-compatible API behind them — and
every failover rule: when a task moves on, when it is refunded, and that it is charged once
and at most one upstream's image is ever delivered.
"""

from __future__ import annotations

import collections
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FINGERPRINT, assert_envelope, balance, check_in, make_settings
from tests.fake_openai import FakeOpenAI
from tests.fake_upstream import FakeUpstream, make_png
from tests.service_runner import LogCapture, RunningService, free_port, running_service

GENERATIONS = "/api/image-tasks/generations"
LISTING = "/api/image-tasks"


class Pools:
    """pool-a (priority 1), pool-b (priority 2): chatgpt2api; oai (priority 3): OpenAI."""

    def __init__(self, a: FakeUpstream, b: FakeUpstream, oai: FakeOpenAI) -> None:
        self.a, self.b, self.oai = a, b, oai


@pytest.fixture
def pools(monkeypatch: pytest.MonkeyPatch) -> Iterator[Pools]:
    with (
        FakeUpstream(api_key="pool-a-SECRET-key-0001") as a,
        FakeUpstream(api_key="pool-b-SECRET-key-0002") as b,
        FakeOpenAI(api_key="sk-oai-SECRET-key-0003") as oai,
    ):
        monkeypatch.setenv("POOL_A_KEY", a.api_key)
        monkeypatch.setenv("POOL_B_KEY", b.api_key)
        monkeypatch.setenv("OAI_KEY", oai.api_key)
        yield Pools(a, b, oai)


def upstreams_file(path: Path, pools: Pools, *tables: dict[str, Any]) -> Path:
    """A TOML file of the three (overridden per name by `tables`, or only those given)."""
    defaults = {
        "pool-a": {
            "kind": "chatgpt2api",
            "base_url": pools.a.base_url,
            "api_key_env": "POOL_A_KEY",
            "priority": 1,
            "prompt_model": "gpt-5.5",
        },
        "pool-b": {
            "kind": "chatgpt2api",
            "base_url": pools.b.base_url + "/v1",
            "api_key_env": "POOL_B_KEY",
            "priority": 2,
            "prompt_model": "gpt-5.5",
        },
        "oai": {
            "kind": "openai",
            "base_url": pools.oai.base_url + "/v1",
            "api_key_env": "OAI_KEY",
            "image_model": "gpt-image-1",
            "priority": 3,
        },
    }
    chosen = {t["name"]: {**defaults.get(t["name"], {}), **t} for t in tables} or {
        name: {"name": name, **values} for name, values in defaults.items()
    }
    lines = []
    for values in chosen.values():
        lines.append("[[upstream]]")
        lines += [f"{key} = {_toml(value)}" for key, value in values.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def settings_for(tmp_path: Path, file: Path, **overrides: object) -> Any:
    values: dict[str, object] = {"upstreams_file": file, "lease_seconds": 2.0}
    values.update(overrides)
    return make_settings(tmp_path, None, **values)


@pytest.fixture
def service(tmp_path: Path, pools: Pools, logs: LogCapture) -> Iterator[RunningService]:
    file = upstreams_file(tmp_path / "upstreams.toml", pools)
    with running_service(settings_for(tmp_path, file)) as running:
        check_in(running)
        yield running


def generate(running: RunningService, prompt: str = "a red fox") -> Any:
    return running.http.post(
        "/api/images/generate", json={"prompt": prompt, "size": "1:1", "fingerprint": FINGERPRINT}
    )


def row(running: RunningService, task_id: str) -> Any:
    return running.run(running.service.store.get_task(task_id))


def reconcile(running: RunningService) -> None:
    reconciler = running.app.state.reconciler
    running.run(reconciler.run_once())
    running.run(reconciler.wait_resubmissions())


def finished(running: RunningService, task_id: str, timeout: float = 15.0) -> dict[str, Any]:
    """Poll (and reconcile) until the task is completed or failed."""
    deadline = time.monotonic() + timeout
    while True:
        task = running.http.get(f"/api/images/tasks/{task_id}").json()["data"]
        if task["status"] in ("completed", "failed"):
            return task
        assert time.monotonic() < deadline, f"still {task['status']}: {row(running, task_id)}"
        reconcile(running)
        time.sleep(0.05)


def submitted_to(fake: FakeUpstream, task_id: str) -> int:
    return sum(
        1 for r in fake.recorded(GENERATIONS) if (r.json or {}).get("client_task_id") == task_id
    )


def audit_ok(running: RunningService) -> None:
    report = running.run(running.service.store.audit())
    assert report.ok, report.violations


# -- at submission ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body"),
    [
        pytest.param(401, '{"error": {"message": "bad key"}}', id="401-key"),
        pytest.param(403, '{"error": {"message": "account banned"}}', id="403-account"),
        pytest.param(404, '{"error": {"message": "no such model"}}', id="404-model"),
        pytest.param(429, '{"error": {"message": "slow down"}}', id="429"),
        pytest.param(503, '{"error": {"message": "overloaded"}}', id="503"),
    ],
)
def test_an_upstream_refusing_for_its_own_reason_moves_the_task_to_the_next(
    service, pools, status, body
):
    pools.a.fail(GENERATIONS, status=status, body=body)
    answer = generate(service)
    assert answer.status_code == 200, answer.text
    task = answer.json()["data"]
    assert task["remainingCredits"] == 9
    ledger = row(service, task["id"])
    assert ledger.upstream == "pool-b"
    assert [(a.upstream, a.why.split(":")[0]) for a in ledger.attempts] == [("pool-a", "submit")]
    assert str(status) in ledger.attempts[0].why
    assert submitted_to(pools.b, task["id"]) == 1
    pools.b.complete_task(task["id"], image=make_png(5, 5))
    assert finished(service, task["id"])["status"] == "completed"
    assert balance(service) == 9
    audit_ok(service)
    metrics = service.http.get("/metrics").text
    assert 'scenemint_failovers_total{to="pool-b",upstream="pool-a"} 1.0' in metrics


def test_a_refused_connection_moves_the_task_to_the_next(tmp_path, pools, logs):
    nobody = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    file = upstreams_file(
        tmp_path / "upstreams.toml",
        pools,
        {"name": "pool-a", "base_url": nobody},
        {"name": "pool-b"},
    )
    with running_service(settings_for(tmp_path, file)) as running:
        check_in(running)
        answer = generate(running)
        assert answer.status_code == 200, answer.text
        assert row(running, answer.json()["data"]["id"]).upstream == "pool-b"


@pytest.mark.parametrize("status", [400, 413, 415, 422])
def test_the_requests_own_fault_is_refunded_and_asks_no_other_upstream(service, pools, status):
    pools.a.fail(GENERATIONS, status=status, body='{"error": {"message": "bad prompt"}}')
    assert_envelope(generate(service), 502, "upstream_failed")
    assert pools.b.recorded(GENERATIONS) == [] and pools.oai.generations == []
    assert balance(service) == 10
    audit_ok(service)


def test_an_unknown_outcome_is_never_sent_to_another_upstream(service, pools):
    """A 500 after the first upstream made the task: it may still make the image, so only
    it is asked, until it answers; the image is its."""
    pools.a.fail(GENERATIONS, status=500, after_processing=True)
    answer = generate(service)
    assert answer.status_code == 200, answer.text
    task_id = answer.json()["data"]["id"]
    assert answer.json()["data"]["status"] == "queued"
    pools.a.clear_faults()
    reconcile(service)
    assert row(service, task_id).upstream == "pool-a"
    pools.a.complete_task(task_id, image=make_png(6, 6))
    assert finished(service, task_id)["status"] == "completed"
    assert pools.b.recorded(GENERATIONS) == [] and pools.oai.generations == []
    assert pools.b.recorded(LISTING) == []  # nobody asked pool-b about it either
    assert balance(service) == 9


def test_a_task_moves_on_to_an_openai_upstream_as_a_job(service, pools):
    pools.a.fail(GENERATIONS, status=429)
    pools.b.fail(GENERATIONS, status=401)
    answer = generate(service)
    assert answer.status_code == 200, answer.text
    task_id = answer.json()["data"]["id"]
    ledger = row(service, task_id)
    assert (ledger.upstream, ledger.kind) == ("oai", "sync")
    assert [a.upstream for a in ledger.attempts] == ["pool-a", "pool-b"]
    assert finished(service, task_id)["status"] == "completed"
    assert len(pools.oai.generations) == 1
    assert balance(service) == 9
    audit_ok(service)


def test_a_task_that_runs_out_of_upstreams_is_refunded_once(service, pools):
    pools.a.fail(GENERATIONS, status=429)
    pools.b.fail(GENERATIONS, status=503)
    pools.oai.fail_next(401, times=10)
    answer = generate(service)
    assert answer.status_code == 200, answer.text  # a job at oai: the client has its task
    done = finished(service, answer.json()["data"]["id"])
    assert done["status"] == "failed"
    assert balance(service) == 10
    report = service.run(service.service.store.audit())
    assert report.refunds == 1 and report.ok


# -- late failures -------------------------------------------------------------------------------


def test_a_late_no_available_image_quota_moves_the_task_on(service, pools):
    """chatgpt2api fails a task once its accounts are used up: the task goes to the next
    upstream instead of being refunded; the user is charged once and gets pool-b's image."""
    answer = generate(service)
    task_id = answer.json()["data"]["id"]
    pools.a.fail_task(task_id, "no available image quota")
    service.http.get(f"/api/images/tasks/{task_id}")  # the poll sees it, the task moves on
    ledger = row(service, task_id)
    assert ledger.upstream == "pool-b"
    assert ledger.attempts[0].why == "no available image quota"
    reconcile(service)  # sends it there
    assert submitted_to(pools.b, task_id) == 1
    picture = make_png(7, 3, rgb=(1, 2, 3))
    pools.b.complete_task(task_id, image=picture)
    assert finished(service, task_id)["status"] == "completed"
    image = service.http.get(f"/api/images/tasks/{task_id}/image")
    assert image.status_code == 200 and image.content == picture
    assert balance(service) == 9
    audit_ok(service)


def test_a_late_content_policy_failure_is_refunded_not_moved_on(service, pools):
    answer = generate(service)
    task_id = answer.json()["data"]["id"]
    pools.a.fail_task(task_id, "Image generation was rejected by upstream policy.")
    done = finished(service, task_id)
    assert done["status"] == "failed"
    assert row(service, task_id).upstream == "pool-a"
    assert pools.b.recorded(GENERATIONS) == []
    assert balance(service) == 10


def test_a_task_the_upstream_lost_moves_on(service, pools):
    answer = generate(service)
    task_id = answer.json()["data"]["id"]
    pools.a.forget_task(task_id)
    service.http.get(f"/api/images/tasks/{task_id}")
    assert row(service, task_id).upstream == "pool-b"
    reconcile(service)
    pools.b.complete_task(task_id)
    assert finished(service, task_id)["status"] == "completed"
    assert balance(service) == 9


def test_a_late_failure_past_the_resubmit_window_is_refunded(tmp_path, pools, logs):
    file = upstreams_file(tmp_path / "upstreams.toml", pools)
    with running_service(settings_for(tmp_path, file, resubmit_window=0.5)) as running:
        check_in(running)
        task_id = generate(running).json()["data"]["id"]
        time.sleep(0.6)
        pools.a.fail_task(task_id, "no available image quota")
        assert finished(running, task_id)["status"] == "failed"
        assert row(running, task_id).upstream == "pool-a"
        assert balance(running) == 10


# -- choosing -----------------------------------------------------------------------------------


def test_new_tasks_are_shared_by_weight_within_a_priority(tmp_path, pools, logs):
    file = upstreams_file(
        tmp_path / "upstreams.toml",
        pools,
        {"name": "pool-a", "priority": 1, "weight": 3},
        {"name": "pool-b", "priority": 1, "weight": 1},
        {"name": "oai", "priority": 2},
    )
    with running_service(settings_for(tmp_path, file)) as running:
        counts: collections.Counter[str] = collections.Counter()
        for n in range(200):
            fingerprint = f"weights-fp-{n // 10:04d}"
            if n % 10 == 0:
                check_in(running, fingerprint)
            answer = running.http.post(
                "/api/images/generate",
                json={"prompt": f"task {n}", "size": "1:1", "fingerprint": fingerprint},
            )
            assert answer.status_code == 200, answer.text
            counts[row(running, answer.json()["data"]["id"]).upstream] += 1
    assert counts["oai"] == 0  # a lower priority gets nothing while the first can take it
    assert 130 <= counts["pool-a"] <= 170, counts  # 150 expected (binomial sd ~6)
    assert counts["pool-a"] + counts["pool-b"] == 200


def test_an_upstream_whose_breaker_is_open_gets_no_new_tasks(tmp_path, pools, logs):
    file = upstreams_file(tmp_path / "upstreams.toml", pools)
    settings = settings_for(
        tmp_path, file, breaker_min_calls=2, breaker_failure_rate=0.5, breaker_cooldown=60
    )
    with running_service(settings) as running:
        check_in(running)
        pools.a.fail(GENERATIONS, status=500)
        generate(running)  # unknown at pool-a, twice: its submit breaker opens
        generate(running)
        breaker = running.service.router.client("pool-a").http.breakers["submit"]
        assert breaker.is_open
        sent_before = len(pools.a.recorded(GENERATIONS))
        answer = generate(running)
        assert row(running, answer.json()["data"]["id"]).upstream == "pool-b"
        assert len(pools.a.recorded(GENERATIONS)) == sent_before  # skipped, not tried
        metrics = running.http.get("/metrics").text
        open_gauge = 'scenemint_upstream_breaker_open{operation="submit",upstream="pool-a"} 1.0'
        assert open_gauge in metrics


# -- an upstream removed from the file -----------------------------------------------------------


def test_an_upstream_removed_from_the_file_still_settles_its_tasks(tmp_path, pools, logs):
    """A task charged at pool-b stays with pool-b when the file no longer names it: pool-b
    is asked about it (drained: no new tasks) until it settles."""
    first = upstreams_file(tmp_path / "one.toml", pools, {"name": "pool-b", "priority": 1})
    with running_service(settings_for(tmp_path, first)) as running:
        check_in(running)
        task_id = generate(running).json()["data"]["id"]
        assert row(running, task_id).upstream == "pool-b"
    second = upstreams_file(tmp_path / "two.toml", pools, {"name": "pool-a"})
    with running_service(settings_for(tmp_path, second)) as running:
        ready = running.http.get("/readyz").json()["data"]
        states = {u["name"]: u["state"] for u in ready["upstreams"]}
        assert states == {"pool-a": "ready", "pool-b": "removed"}
        pools.b.complete_task(task_id, image=make_png(4, 4))
        assert finished(running, task_id)["status"] == "completed"
        assert row(running, task_id).upstream == "pool-b"
        fresh = generate(running).json()["data"]["id"]
        assert row(running, fresh).upstream == "pool-a"  # no new task for the drained one
        assert balance(running) == 8
    with running_service(settings_for(tmp_path, second)) as running:
        states = {u["name"] for u in running.http.get("/readyz").json()["data"]["upstreams"]}
        assert states == {"pool-a"}  # nothing left there: it is not followed any more


def test_a_drained_upstream_gets_no_new_tasks(tmp_path, pools, logs):
    file = upstreams_file(
        tmp_path / "upstreams.toml", pools, {"name": "pool-a", "drain": True}, {"name": "pool-b"}
    )
    with running_service(settings_for(tmp_path, file)) as running:
        check_in(running)
        task_id = generate(running).json()["data"]["id"]
        assert row(running, task_id).upstream == "pool-b"


# -- enhancement, readiness, keys --------------------------------------------------------------


def test_enhancement_skips_an_upstream_that_refuses_before_its_first_byte(service, pools):
    pools.a.fail("/v1/chat/completions", status=503)
    pools.b.chat_chunks = ["from ", "pool-b"]
    answer = service.http.post(
        "/api/prompts/enhance", json={"prompt": "a fox", "direction": "details"}
    )
    assert answer.status_code == 200, answer.text
    assert "pool-b" in answer.text and answer.text.endswith("data: [DONE]\n\n")
    assert len(pools.a.recorded("/v1/chat/completions")) == 1


def test_readyz_is_ready_while_one_upstream_can_take_generations(service, pools):
    pools.a.fail("/", status=503)
    service.service.readiness.forget()
    answer = service.http.get("/readyz")
    assert answer.status_code == 200, answer.text
    states = {u["name"]: u["state"] for u in answer.json()["data"]["upstreams"]}
    assert states["pool-a"] != "ready" and states["pool-b"] == "ready"
    pools.b.fail("/", status=503)
    pools.oai.api_key = "another-key"  # ours is refused there
    service.service.readiness.forget()
    assert_envelope(service.http.get("/readyz"), 503, "not_ready")


def test_each_upstream_gets_its_own_key_and_no_key_shows_anywhere(service, pools, logs):
    pools.a.fail(GENERATIONS, status=401)
    task_id = generate(service).json()["data"]["id"]
    for request in pools.a.requests:
        assert request.authorization == f"Bearer {pools.a.api_key}"
    for request in pools.b.requests:
        assert request.authorization == f"Bearer {pools.b.api_key}"
    seen = [
        service.http.get(f"/api/images/tasks/{task_id}").text,
        service.http.get("/metrics").text,
        service.http.get("/readyz").text,
        logs.text(),
    ]
    for key in (pools.a.api_key, pools.b.api_key, pools.oai.api_key):
        for text in seen:
            assert key not in text


def test_two_upstreams_with_one_name_stop_the_service_at_start(tmp_path, pools, logs):
    from scenemint.upstream import UpstreamsError
    from scenemint.upstream.config import load_upstreams

    file = tmp_path / "twice.toml"
    text = upstreams_file(tmp_path / "x.toml", pools, {"name": "pool-a"}).read_text()
    file.write_text(text + "\n" + text)
    with pytest.raises(UpstreamsError, match="'pool-a' is used by more than one"):
        load_upstreams(settings_for(tmp_path, file))


def test_an_unknown_id_never_asks_any_upstream(service, pools):
    service.http.get(f"/api/images/tasks/{uuid.uuid4()}")
    assert pools.a.recorded(LISTING) == [] and pools.b.recorded(LISTING) == []


def test_scenemint_upstreams_prints_each_upstream_with_its_tasks_and_breakers(
    tmp_path, pools, logs, monkeypatch
):
    from typer.testing import CliRunner

    from scenemint.cli import app

    file = upstreams_file(tmp_path / "upstreams.toml", pools)
    settings = settings_for(tmp_path, file, breaker_min_calls=1, breaker_cooldown=60)
    with running_service(settings) as running:
        check_in(running)
        done = generate(running).json()["data"]["id"]
        pools.a.complete_task(done)
        assert finished(running, done)["status"] == "completed"
        generate(running)  # in flight at pool-a
        pools.b.fail("/v1/chat/completions", status=500)
        pools.a.fail("/v1/chat/completions", status=500)
        running.http.post("/api/prompts/enhance", json={"prompt": "x", "direction": "details"})
        monkeypatch.setenv("SCENEMINT_UPSTREAMS_FILE", str(file))
        monkeypatch.setenv("SCENEMINT_DATA_DIR", str(tmp_path / "data"))
        result = CliRunner().invoke(app, ["upstreams", "--server", running.url])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:4]}
    assert lines["pool-a"][1:6] == ["chatgpt2api", "1", "1", "active", "1"]
    assert "100%" in " ".join(lines["pool-a"]) and lines["pool-a"][-1] == "chat"
    assert lines["oai"][1:6] == ["openai", "3", "1", "active", "0"]
    for key in (pools.a.api_key, pools.b.api_key, pools.oai.api_key):
        assert key not in result.output
