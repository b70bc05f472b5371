"""Operations: health and readiness, Prometheus metrics, request ids in headers and JSON logs,
and a graceful shutdown of the real `scenemint serve` process on SIGTERM."""

from __future__ import annotations

import json
import re
import signal
import threading
import time
import uuid

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from scenemint.store import open_store
from tests.conftest import FINGERPRINT, assert_envelope, check_in, make_settings
from tests.fake_upstream import FakeUpstream
from tests.service_runner import RunningService, ServiceProcess, running_service

GENERATIONS = "/api/image-tasks/generations"
LISTING = "/api/image-tasks"
MODELS = "/v1/models"
CHAT = "/v1/chat/completions"
ROUTES = {
    "/api/images/generate",
    "/api/images/tasks/{id}",
    "/api/images/tasks/{id}/image",
    "/api/prompts/enhance",
    "/api/quota/status",
    "/api/quota/check-in",
    "/healthz",
    "/readyz",
    "/metrics",
    "/docs",
    "/openapi.json",
    "other",
}


def generate(running: RunningService) -> dict:
    answer = running.http.post(
        "/api/images/generate", json={"prompt": "a red fox", "fingerprint": FINGERPRINT}
    )
    assert answer.status_code == 200, answer.text
    return answer.json()["data"]


def enhance_body() -> dict:
    return {"prompt": "a lighthouse", "direction": "details"}


# -- health and readiness --------------------------------------------------------------------


def test_healthz_answers_alive(service, upstream):
    answer = service.http.get("/healthz")
    assert answer.status_code == 200
    assert answer.json() == {"code": 0, "message": "ok", "data": {"status": "alive"}}
    assert upstream.requests == []  # liveness asks nobody


def test_healthz_answers_even_without_an_upstream(tmp_path, logs):
    with running_service(make_settings(tmp_path, None)) as running:
        assert running.http.get("/healthz").status_code == 200
        assert_envelope(running.http.get("/readyz"), 503, "not_ready")


def test_readyz_asks_the_task_api_with_the_key_and_reports_chat(service, upstream):
    answer = service.http.get("/readyz")
    assert answer.status_code == 200, answer.text
    data = answer.json()["data"]
    assert (data["status"], data["chat"]) == ("ready", "available")
    assert data["upstreams"] == [
        {
            "name": "default",
            "kind": "chatgpt2api",
            "priority": 1,
            "weight": 1,
            "state": "ready",
            "takesTasks": True,
            "breakersOpen": [],
            "chat": "available",
        }
    ]
    listing, models = upstream.recorded(LISTING), upstream.recorded(MODELS)
    assert len(listing) == 1 and len(models) == 1
    (probed,) = listing[0].query["ids"].split(",")
    assert uuid.UUID(probed).version == 4  # a random id: never one of our tasks
    assert listing[0].authorization == f"Bearer {upstream.api_key}"


def test_readyz_is_cached_briefly(service, upstream):
    for _ in range(5):
        assert service.http.get("/readyz").status_code == 200
    assert len(upstream.recorded(LISTING)) == 1
    assert len(upstream.recorded(MODELS)) == 1


def test_readyz_fails_when_the_upstream_rejects_the_key(tmp_path, upstream, logs):
    with running_service(make_settings(tmp_path, upstream, upstream_api_key="wrong")) as running:
        assert_envelope(running.http.get("/readyz"), 503, "not_ready")
    assert any("CHATGPT2API_API_KEY" in line for line in logs.lines)


def test_a_failed_readiness_is_not_cached(service, upstream):
    upstream.fail(LISTING, status=500, times=1)
    assert_envelope(service.http.get("/readyz"), 503, "not_ready")
    assert service.http.get("/readyz").status_code == 200
    assert len(upstream.recorded(LISTING)) == 2


def test_an_unreachable_chat_model_is_reported_not_not_ready(service, upstream):
    """A real chatgpt2api that cannot reach its provider fails /v1/models and chat, while
    its image-task API works: the service is ready, and says chat is unavailable."""
    upstream.fail(MODELS, status=502)
    answer = service.http.get("/readyz")
    assert answer.status_code == 200, answer.text
    data = answer.json()["data"]
    assert (data["status"], data["chat"]) == ("ready", "unavailable")


def test_readyz_fails_when_the_upstream_is_down(service, upstream):
    upstream.stop()
    assert_envelope(service.http.get("/readyz"), 503, "not_ready")


def test_readyz_fails_when_the_database_is_unreachable(service, upstream, tmp_path):
    """The service's store is swapped for a real one that has been closed."""
    closed = service.run(open_store(make_settings(tmp_path / "elsewhere", None)))
    service.run(closed.close())
    ledger = service.service.ledger
    real = ledger.store
    ledger.store = closed
    try:
        assert_envelope(service.http.get("/readyz"), 503, "not_ready")
        assert service.http.get("/healthz").status_code == 200  # alive, just not ready
    finally:
        ledger.store = real
    assert service.http.get("/readyz").status_code == 200


# -- metrics --------------------------------------------------------------------------------


def samples(running: RunningService) -> list:
    answer = running.http.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    return [s for family in text_string_to_metric_families(answer.text) for s in family.samples]


def value(found: list, name: str, **labels: str) -> float:
    matching = [s.value for s in found if s.name == name and labels.items() <= s.labels.items()]
    return sum(matching)


def test_metrics_count_requests_credits_upstream_calls_and_tasks(service, upstream):
    check_in(service)
    task = generate(service)
    upstream.fail_task(task["id"], "content policy")
    polled = service.http.get(f"/api/images/tasks/{task['id']}").json()["data"]
    assert polled["status"] == "failed"
    enhanced = service.http.post("/api/prompts/enhance", json=enhance_body())
    assert enhanced.text.endswith("data: [DONE]\n\n")
    service.http.get(f"/api/images/tasks/{uuid.uuid4()}/image")

    found = samples(service)
    requests = "scenemint_http_requests_total"
    assert value(found, requests, route="/api/images/generate", status="200") == 1
    assert value(found, requests, route="/api/images/tasks/{id}", method="GET") == 1
    assert value(found, requests, route="/api/images/tasks/{id}/image", status="404") == 1
    assert value(found, requests, route="/api/prompts/enhance", status="200") == 1
    routes = {s.labels["route"] for s in found if "route" in s.labels}
    assert routes <= ROUTES
    assert not any(task["id"] in v for s in found for v in s.labels.values())

    latency = "scenemint_http_request_duration_seconds_count"
    assert value(found, latency, route="/api/images/generate") == 1
    assert value(found, "scenemint_credits_charged_total") == 1
    assert value(found, "scenemint_credits_refunded_total") == 1
    assert value(found, "scenemint_tasks_total", outcome="failed") == 1
    calls = "scenemint_upstream_calls_total"
    assert value(found, calls, kind="submit", status="200") == 1
    assert value(found, calls, kind="list", status="200") == 1
    assert value(found, calls, kind="chat", status="200") == 1
    assert value(found, "scenemint_open_streams", kind="enhance") == 0


def test_metrics_count_upstream_failures_by_kind_and_reason(service, upstream):
    check_in(service)
    task = generate(service)
    upstream.fail(LISTING, status=500, times=1)
    assert service.http.get(f"/api/images/tasks/{task['id']}").status_code == 502
    upstream.fail(CHAT, status=503, times=1)
    assert service.http.post("/api/prompts/enhance", json=enhance_body()).status_code == 502
    found = samples(service)
    failures = "scenemint_upstream_failures_total"
    assert value(found, failures, kind="list", reason="http_5xx") == 1
    assert value(found, failures, kind="chat", reason="http_5xx") == 1
    assert value(found, failures, kind="submit") == 0
    requests = "scenemint_http_requests_total"
    assert value(found, requests, route="/api/images/tasks/{id}", status="502") == 1


def test_metrics_show_open_streams_while_they_are_open(service, upstream):
    upstream.chat_chunk_delay = 0.5
    with service.http.stream("POST", "/api/prompts/enhance", json=enhance_body()) as answer:
        lines = answer.iter_lines()  # kept: a dropped iterator closes the connection
        next(lines)
        assert value(samples(service), "scenemint_open_streams", kind="enhance") == 1
        assert [line for line in lines if line][-1] == "data: [DONE]"
    deadline = time.monotonic() + 3
    while value(samples(service), "scenemint_open_streams", kind="enhance") != 0:
        assert time.monotonic() < deadline, "the gauge never went back to 0"
        time.sleep(0.05)


def test_unknown_paths_share_one_route_label(service, upstream):
    for i in range(3):
        service.http.get(f"/nothing-here/{uuid.uuid4()}?n={i}")
    found = samples(service)
    assert value(found, "scenemint_http_requests_total", route="other", status="404") == 3
    assert not any("nothing-here" in v for s in found for v in s.labels.values())


def test_no_metric_label_contains_the_key(tmp_path, upstream, logs):
    with running_service(make_settings(tmp_path, upstream, upstream_api_key="wrong-SECRET")) as run:
        check_in(run)
        run.http.post("/api/images/generate", json={"prompt": "x", "fingerprint": FINGERPRINT})
        run.http.get("/readyz")
        text = run.http.get("/metrics").text
    assert "scenemint_upstream_failures_total" in text
    assert "wrong-SECRET" not in text and upstream.api_key not in text


# -- request ids ------------------------------------------------------------------------------


def test_every_answer_carries_a_request_id(service, upstream):
    ids = set()
    for path in ("/healthz", "/api/images/tasks/nope", "/nothing", "/metrics"):
        answer = service.http.get(path)
        request_id = answer.headers["x-request-id"]
        assert len(request_id) >= 16
        ids.add(request_id)
    assert len(ids) == 4


def test_a_plain_caller_request_id_is_echoed(service, upstream):
    answer = service.http.get("/healthz", headers={"X-Request-ID": "edge-42.abc_DEF"})
    assert answer.headers["x-request-id"] == "edge-42.abc_DEF"


@pytest.mark.parametrize("hostile", ["has space", "x" * 65, "semi;colon", "new\tline", ""])
def test_a_hostile_caller_request_id_is_replaced(service, upstream, hostile):
    answer = service.http.get("/healthz", headers={"X-Request-ID": hostile})
    assert answer.headers["x-request-id"] != hostile
    assert re.fullmatch(r"[0-9a-f]{16}", answer.headers["x-request-id"])


def test_a_stream_carries_a_request_id(service, upstream):
    answer = service.http.post(
        "/api/prompts/enhance", json=enhance_body(), headers={"X-Request-ID": "stream-1"}
    )
    assert answer.headers["x-request-id"] == "stream-1"


# -- the real process: JSON logs and graceful shutdown ------------------------------------------


def process_env(upstream: FakeUpstream, tmp_path, **extra: str) -> dict[str, str]:
    return {
        "CHATGPT2API_BASE_URL": upstream.base_url,
        "CHATGPT2API_API_KEY": upstream.api_key,
        "SCENEMINT_DATA_DIR": str(tmp_path / "data"),
        "SCENEMINT_RECONCILE_INTERVAL": "3600",
        "SCENEMINT_POLL_MIN_INTERVAL": "0",
        "SCENEMINT_LOG_LEVEL": "INFO",
        **extra,
    }


def read_log(proc: ServiceProcess) -> str:
    """Everything the process wrote (stderr and stdout), also after it was stopped."""
    with open(proc.log_path, encoding="utf-8") as handle:
        return handle.read()


@pytest.fixture
def process(upstream, tmp_path):
    started: list[ServiceProcess] = []

    def start(**extra: str) -> ServiceProcess:
        proc = ServiceProcess(process_env(upstream, tmp_path, **extra), cwd=str(tmp_path))
        started.append(proc)
        return proc.wait_ready()

    yield start
    for proc in started:
        proc.stop()


def test_json_logs_carry_the_request_id_of_the_answer(process, upstream):
    proc = process(SCENEMINT_LOG_FORMAT="json")
    with httpx.Client(base_url=proc.url, timeout=10) as http:
        http.post("/api/quota/check-in", json={"fingerprint": FINGERPRINT})
        generated = http.post(
            "/api/images/generate", json={"prompt": "a fox", "fingerprint": FINGERPRINT}
        )
        echoed = http.get("/healthz", headers={"X-Request-ID": "caller-supplied-1"})
        upstream.fail(LISTING, status=500, times=2)
        failed = http.get(f"/api/images/tasks/{generated.json()['data']['id']}")
    assert failed.status_code == 502
    proc.stop()
    log = read_log(proc)
    entries = []
    for line in log.splitlines():
        if line.strip():
            entry = json.loads(line)  # every line is one JSON object
            assert {"time", "level", "logger", "message", "request_id"} <= entry.keys()
            entries.append(entry)

    def lines_of(request_id: str) -> list[str]:
        return [e["message"] for e in entries if e["request_id"] == request_id]

    generate_lines = lines_of(generated.headers["x-request-id"])
    assert any(m.startswith("POST /api/images/generate -> 200") for m in generate_lines)
    assert any(m.startswith("charged ") for m in generate_lines)  # the service's own line
    assert any(m.startswith("upstream default POST submit -> 200") for m in generate_lines)
    assert echoed.headers["x-request-id"] == "caller-supplied-1"
    assert any(m.startswith("GET /healthz -> 200") for m in lines_of("caller-supplied-1"))
    failure_lines = lines_of(failed.headers["x-request-id"])
    assert any("upstream default failure" in m for m in failure_lines)
    assert upstream.api_key not in log


def test_text_logs_carry_the_request_id_too(process, upstream):
    proc = process()
    answer = httpx.get(proc.url + "/healthz", headers={"X-Request-ID": "text-log-id"}, timeout=10)
    assert answer.status_code == 200
    proc.stop()
    lines = read_log(proc).splitlines()
    assert any("[text-log-id]" in line and "/healthz" in line for line in lines)


def test_sigterm_ends_an_open_stream_with_a_final_frame_and_exits_cleanly(process, upstream):
    upstream.chat_chunk_delay = 60.0
    proc = process()
    lines: list[str] = []
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", proc.url + "/api/prompts/enhance", json=enhance_body()) as answer,
    ):
        assert answer.status_code == 200
        stream = answer.iter_lines()
        lines.append(next(stream))
        assert lines[0].startswith("data: {")
        proc.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        lines.extend(stream)
        ended = time.monotonic() - signalled
    frames = [line for line in lines if line]
    assert frames[-2:] == [
        'data: {"error": {"message": "The server is restarting. Please try again.",'
        ' "code": "server_restarting"}}',
        "data: [DONE]",
    ]
    assert ended < 3  # well before the 10 s graceful timeout
    assert proc.process.wait(10) == 0
    assert time.monotonic() - signalled < 8
    assert upstream.stream_closed.wait(2)  # the upstream request was closed too
    with pytest.raises(httpx.ConnectError):
        httpx.get(proc.url + "/healthz", timeout=2)


def test_sigterm_lets_an_in_flight_request_finish_and_refuses_new_connections(process, upstream):
    hold = upstream.hold(GENERATIONS)
    proc = process()
    httpx.post(proc.url + "/api/quota/check-in", json={"fingerprint": FINGERPRINT}, timeout=10)
    result: dict[str, httpx.Response] = {}

    def in_flight() -> None:
        result["answer"] = httpx.post(
            proc.url + "/api/images/generate",
            json={"prompt": "a slow fox", "fingerprint": FINGERPRINT},
            timeout=30,
        )

    client = threading.Thread(target=in_flight)
    client.start()
    assert hold.wait(10), "the submission never reached the upstream"
    proc.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while True:  # the listening socket closes at once
        try:
            httpx.get(proc.url + "/healthz", timeout=1)
        except httpx.ConnectError:
            break
        except (httpx.ReadError, httpx.RemoteProtocolError):
            # A connection the kernel queued just before the listener closed is reset,
            # not served: also a refusal, but the next attempt must be refused outright.
            pass
        assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
        time.sleep(0.05)
    assert proc.process.poll() is None  # still finishing the in-flight request
    hold.release()
    client.join(15)
    answer = result["answer"]
    assert answer.status_code == 200, answer.text
    assert answer.json()["data"]["status"] == "queued"
    assert proc.process.wait(10) == 0
