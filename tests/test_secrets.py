"""The upstream key never leaves the service; every request and upstream call is logged."""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections import Counter

import httpx
import pytest

from tests.conftest import FINGERPRINT, check_in, make_settings, wait_finished
from tests.fake_upstream import CHAT_PATH, TINY_PNG
from tests.service_runner import LogCapture, RunningService, free_port, running_service

GENERATIONS = "/api/image-tasks/generations"
EDITS = "/api/image-tasks/edits"
LISTING = "/api/image-tasks"
ENHANCE = "/api/prompts/enhance"
ACCESS = re.compile(
    r"^INFO scenemint\.access (GET|POST|HEAD) (\S+) -> (\d{3}|aborted) in \d+\.\d ms$"
)
UPSTREAM_CALL = re.compile(
    r"^INFO scenemint\.upstream upstream default (GET|POST) (submit|list|image|chat|models)"
    r" -> (\d{3})"
    r" in \d+\.\d ms$"
)


class Recorder:
    """Sends requests and keeps every answer (status, headers, whole body) to inspect later."""

    def __init__(self, service: RunningService) -> None:
        self.service = service
        self.answers: list[httpx.Response] = []

    def send(self, method: str, path: str, **kwargs) -> httpx.Response:
        answer = self.service.http.request(method, path, **kwargs)
        self.answers.append(answer)
        return answer

    def generate(self, **kwargs) -> httpx.Response:
        body = {"prompt": "a fox", "size": "1:1", "fingerprint": FINGERPRINT}
        return self.send("POST", "/api/images/generate", json=body, **kwargs)

    def enhance(self) -> httpx.Response:
        return self.send("POST", ENHANCE, json={"prompt": "a fox", "direction": "creative"})

    def assert_never_shows(self, secret: str) -> None:
        assert self.answers
        for answer in self.answers:
            assert secret not in answer.text, (answer.request.url, answer.text)
            for name, value in answer.headers.items():
                assert secret not in value, (answer.request.url, name)


def wait_for_lines(logs: LogCapture, pattern: re.Pattern[str], count: int) -> list[str]:
    """Access lines are written once the answer is sent: allow them a moment to arrive."""
    deadline = time.monotonic() + 5
    while True:
        lines = [line for line in logs.lines if pattern.match(line)]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.02)


# -- the key stays secret -----------------------------------------------------------------


def test_the_key_appears_in_no_answer_and_no_log_line(tmp_path, upstream, logs):
    key = upstream.api_key
    echo = f"bad key {key}"
    settings = make_settings(tmp_path, upstream, breaker_min_calls=1000, submit_attempts=1)
    with running_service(settings) as service:
        calls = Recorder(service)
        calls.send("POST", "/api/quota/check-in", json={"fingerprint": FINGERPRINT})

        # the happy path: generate, poll, image, enhance
        task_id = calls.generate().json()["data"]["id"]
        calls.send("GET", f"/api/images/tasks/{task_id}")
        upstream.complete_task(task_id)
        wait_finished(service, task_id)
        assert calls.send("GET", f"/api/images/tasks/{task_id}").json()["data"]["image"]
        assert calls.send("GET", f"/api/images/tasks/{task_id}/image").content == TINY_PNG
        assert calls.send("HEAD", f"/api/images/tasks/{task_id}/image").status_code == 200
        assert calls.enhance().status_code == 200

        # failures whose upstream bodies echo the key
        upstream.fail(GENERATIONS, status=400, body=echo, times=1)
        assert calls.generate().status_code == 502
        upstream.fail(EDITS, status=400, body=echo, times=1)
        edit = calls.send(
            "POST",
            "/api/images/generate",
            data={"prompt": "blue", "fingerprint": FINGERPRINT},
            files={"image": ("r.png", TINY_PNG, "image/png")},
        )
        assert edit.status_code == 502
        upstream.fail(GENERATIONS, status=401, body=echo, times=1)
        assert calls.generate().status_code == 503
        running = calls.generate().json()["data"]["id"]
        upstream.fail(LISTING, status=500, body=echo, times=1)
        assert calls.send("GET", f"/api/images/tasks/{running}").status_code == 502
        upstream.garbage(LISTING, times=1)
        assert calls.send("GET", f"/api/images/tasks/{running}").status_code == 502
        upstream.fail(CHAT_PATH, status=500, body=echo, times=1)
        assert calls.enhance().status_code == 502
        upstream.fail(CHAT_PATH, status=401, body=echo, times=1)
        assert calls.enhance().status_code == 503
        other = calls.generate().json()["data"]["id"]
        upstream.complete_task(other)
        upstream.fail("/files/", status=500, body=echo, times=1)  # the first copy fails
        wait_finished(service, other)
        assert calls.send("GET", f"/api/images/tasks/{other}/image").status_code == 200
        # a failed task whose upstream error text carries the key
        failed = calls.generate().json()["data"]["id"]
        upstream.fail_task(failed, error=echo)
        polled = calls.send("GET", f"/api/images/tasks/{failed}").json()["data"]
        assert polled["status"] == "failed"
        assert polled["error"]
        # a chat stream whose frames carry the key
        upstream.chat_chunks = ["your key is ", key]
        assert calls.enhance().status_code == 200
        upstream.chat_chunks = ["A ", "fox"]
        upstream.chat_fail_after = 1
        assert calls.enhance().status_code == 200

        calls.assert_never_shows(key)
        assert key not in repr(service.settings)
        assert key not in str(service.settings)
        assert key not in repr(service.service.settings)

    # every request upstream did carry it
    assert upstream.requests
    assert all(r.authorization == f"Bearer {key}" for r in upstream.requests)
    assert any("upstream default failure" in line for line in logs.lines)  # failures logged
    assert key not in logs.text()


def streamed_text(body: str, field: str = "content") -> str:
    """What a reader of an enhancement stream puts together: the chunks' content (or another
    text field of their deltas), whatever their `finish_reason` says."""
    parts = []
    for frame in body.split("\n\n"):
        if frame.startswith("data: {"):
            for choice in json.loads(frame[len("data: ") :]).get("choices", []):
                parts.append(choice.get("delta", {}).get(field) or "")
    return "".join(parts)


def chunk(content: str, *, finish: str | None = None, field: str = "content") -> bytes:
    frame = {"choices": [{"index": 0, "delta": {field: content}, "finish_reason": finish}]}
    return b"data: " + json.dumps(frame).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


@pytest.mark.parametrize(
    ("key", "chunks", "raw", "expected"),
    [
        pytest.param(
            "sk-live-0123456789",
            ["the key is ", "sk-li", "ve-01234", "56789", ", and s", "k-", "y is not it"],
            None,
            "the key is [redacted], and sk-y is not it",
            id="three-chunks",
        ),
        pytest.param(
            "sk-live-0123456789", ["SK-LIVE", "-0123456789!"], None, "[redacted]!", id="case"
        ),
        pytest.param(  # its end is also its start: redacted whole before anything is held
            "ab-key-ab", ["say ab-key-ab", " now"], None, "say [redacted] now", id="border"
        ),
        pytest.param(  # what only began like the key goes out with the finishing chunk
            "sk-live-0123456789", ["ends with sk-li"], None, "ends with sk-li", id="finish"
        ),
        pytest.param(  # ... or, without one, in a chunk of its own before [DONE]
            "sk-live-0123456789",
            [],
            [chunk("ends with sk-li"), DONE],
            "ends with sk-li",
            id="done",
        ),
        pytest.param(  # ... or before the end of a stream without [DONE]
            "sk-live-0123456789",
            [],
            [chunk("s"), chunk("k-live-0"), chunk("123456789.")],
            "[redacted].",
            id="eof",
        ),
        pytest.param(  # a gateway that sends finish_reason "" with every chunk
            "sk-live-0123456789",
            [],
            [chunk("key: sk-li", finish=""), chunk("ve-01234", finish=""), chunk("56789.")],
            "key: [redacted].",
            id="empty-finish",
        ),
        pytest.param(  # a choice that goes on after its finish_reason
            "sk-live-0123456789",
            [],
            [chunk("the key is sk-li", finish="stop"), chunk("ve-0123456789!"), DONE],
            "the key is [redacted]!",
            id="after-finish",
        ),
        pytest.param(  # "ſ" (long s) is an "s" to a case-insensitive match of the key
            "sk-live-0123456789",
            [],
            [chunk("the key is \u017f"), chunk("k-live-0123456789!"), DONE],
            "the key is [redacted]!",
            id="long-s",
        ),
    ],
)
def test_a_key_spelled_out_across_stream_chunks_is_redacted(
    tmp_path, upstream, key, chunks, raw, expected
):
    upstream.api_key = key
    upstream.chat_chunks = chunks
    upstream.chat_raw = raw
    with running_service(make_settings(tmp_path, upstream)) as service:
        answer = service.http.post(ENHANCE, json={"prompt": "a fox", "direction": "creative"})
    assert answer.status_code == 200, answer.text
    assert answer.text.endswith("data: [DONE]\n\n")
    assert key.lower() not in answer.text.lower()
    assert streamed_text(answer.text) == expected


@pytest.mark.parametrize("field", ["refusal", "reasoning", "reasoning_content"])
def test_a_key_spelled_out_across_chunks_of_any_delta_text_is_redacted(tmp_path, upstream, field):
    key = "sk-live-0123456789"
    upstream.api_key = key
    upstream.chat_raw = [
        chunk("the key is sk-li", field=field),
        chunk("ve-0123456789!", field=field),
        DONE,
    ]
    with running_service(make_settings(tmp_path, upstream)) as service:
        answer = service.http.post(ENHANCE, json={"prompt": "a fox", "direction": "creative"})
    assert answer.status_code == 200, answer.text
    assert streamed_text(answer.text, field) == "the key is [redacted]!"


def raw_chunk(choice: dict) -> bytes:
    frame = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [choice]}
    return b"data: " + json.dumps(frame).encode() + b"\n\n"


def tool_call(arguments: str) -> dict:
    call = {"index": 0, "function": {"arguments": arguments}}
    return {"index": 0, "delta": {"tool_calls": [call]}}


@pytest.mark.parametrize(
    ("pieces", "read"),
    [
        pytest.param(  # a tool call's arguments, cut anywhere
            [tool_call('{"q": "the key is sk-li'), tool_call('ve-0123456789"}')],
            lambda c: c["delta"]["tool_calls"][0]["function"]["arguments"],
            id="tool-call-arguments",
        ),
        pytest.param(  # a completions-style choice: `text`, no delta at all
            [{"index": 0, "text": "the key is sk-"}, {"index": 0, "text": "live-0123456789"}],
            lambda c: c["text"],
            id="choice-text",
        ),
        pytest.param(  # a field nobody has heard of, nested
            [
                {"index": 0, "delta": {"x": {"note": ["sk-live-01"]}}},
                {"index": 0, "delta": {"x": {"note": ["23456789"]}}},
            ],
            lambda c: c["delta"]["x"]["note"][0],
            id="unknown-nested-field",
        ),
        pytest.param(  # a chunk of something else between the two halves
            [
                {"index": 0, "delta": {"content": "key: sk-live"}},
                {"index": 0, "delta": {"refusal": "no"}},
                {"index": 0, "delta": {"content": "-0123456789."}},
            ],
            lambda c: c["delta"].get("content", ""),
            id="gap-between-halves",
        ),
    ],
)
def test_a_key_cut_across_chunks_in_any_field_is_redacted(tmp_path, upstream, pieces, read):
    """Whatever string of a chunk carries it (not only the text fields of `delta`), a key
    cut across chunks never reaches the reader: each place is redacted as one text."""
    key = "sk-live-0123456789"
    upstream.api_key = key
    upstream.chat_raw = [raw_chunk(piece) for piece in pieces] + [DONE]
    with running_service(make_settings(tmp_path, upstream)) as service:
        answer = service.http.post(ENHANCE, json={"prompt": "a fox", "direction": "creative"})
    assert answer.status_code == 200, answer.text
    assert answer.text.endswith("data: [DONE]\n\n")
    read_back = ""
    for frame in answer.text.split("\n\n"):
        if frame.startswith("data: {"):
            for choice in json.loads(frame[len("data: ") :])["choices"]:
                with contextlib.suppress(KeyError, IndexError, TypeError):
                    read_back += read(choice)
    assert key not in read_back and "[redacted]" in read_back, read_back
    assert key.lower() not in answer.text.lower()


def test_a_stream_holding_back_text_for_too_many_choices_ends_with_an_error(tmp_path, upstream):
    """Each of 100 choices ends in the start of the key: what is held back is bounded (a
    chat stream has a few choices), the stream ends with our error frame and [DONE]."""
    key = "sk-live-0123456789"
    upstream.api_key = key
    choices = [{"index": i, "delta": {"content": "sk-"}} for i in range(100)]
    upstream.chat_raw = [b"data: " + json.dumps({"choices": choices}).encode() + b"\n\n", DONE]
    with running_service(make_settings(tmp_path, upstream)) as service:
        answer = service.http.post(ENHANCE, json={"prompt": "a fox", "direction": "creative"})
    assert answer.status_code == 200, answer.text
    frames = answer.text.split("\n\n")
    assert frames[-2:] == ["data: [DONE]", ""]
    assert json.loads(frames[-3][len("data: ") :])["error"]["code"] == "enhance_interrupted"


def test_a_refused_connection_leaks_no_key(tmp_path, logs):
    key = "refused-key-SECRET-9876"
    dead = f"http://127.0.0.1:{free_port()}/v1"
    settings = make_settings(
        tmp_path, None, upstream_base_url=dead, upstream_api_key=key, submit_attempts=2
    )
    with running_service(settings) as service:
        calls = Recorder(service)
        check_in(service)
        assert calls.generate().status_code == 502
        assert calls.enhance().status_code == 502
        assert calls.send("GET", "/readyz").status_code >= 500
        calls.assert_never_shows(key)
    assert "cannot connect" in logs.text()
    assert key not in logs.text()


def test_settings_never_show_the_key(tmp_path, upstream):
    settings = make_settings(tmp_path, upstream)
    assert settings.api_key == upstream.api_key
    for text in (repr(settings), str(settings), settings.model_dump_json()):
        assert upstream.api_key not in text


# -- logging ------------------------------------------------------------------------------


def test_one_access_line_per_request(service, upstream, logs):
    check_in(service)
    task_id = service.http.post(
        "/api/images/generate", json={"prompt": "a fox", "fingerprint": FINGERPRINT}
    ).json()["data"]["id"]
    upstream.complete_task(task_id)
    wait_finished(service, task_id)
    time.sleep(0.1)  # the access lines of the polls above are written after their answers
    sent = [
        ("GET", f"/api/images/tasks/{task_id}", 200),
        ("GET", f"/api/images/tasks/{task_id}/image", 200),
        ("HEAD", f"/api/images/tasks/{task_id}/image", 200),
        ("POST", ENHANCE, 200),
        ("POST", ENHANCE, 400),
        ("GET", "/api/images/tasks/not-a-uuid/image", 404),
        ("GET", "/no/such/route", 404),
        ("POST", "/api/quota/status", 200),
    ]
    before = len(wait_for_lines(logs, ACCESS, 3))  # check-in, generate and the polls
    for method, path, status in sent:
        body = None
        if path == ENHANCE:
            body = {"prompt": "x", "direction": "details" if status == 200 else "nope"}
        if path == "/api/quota/status":
            body = {"fingerprint": FINGERPRINT}
        answer = service.http.request(method, path, json=body)
        assert answer.status_code == status, (path, answer.text)
    lines = wait_for_lines(logs, ACCESS, before + len(sent))[before:]
    logged = Counter(ACCESS.match(line).groups() for line in lines)
    assert logged == Counter((m, p, str(s)) for m, p, s in sent)


def test_one_upstream_line_per_upstream_call_with_its_timing(service, upstream, logs):
    check_in(service)
    task_id = service.http.post(
        "/api/images/generate", json={"prompt": "a fox", "fingerprint": FINGERPRINT}
    ).json()["data"]["id"]
    service.http.get(f"/api/images/tasks/{task_id}")
    upstream.complete_task(task_id)
    service.http.get(f"/api/images/tasks/{task_id}")
    service.http.get(f"/api/images/tasks/{task_id}/image")
    service.http.post(ENHANCE, json={"prompt": "x", "direction": "details"})
    upstream.fail(GENERATIONS, status=400, times=1)
    service.http.post("/api/images/generate", json={"prompt": "b", "fingerprint": FINGERPRINT})

    kind_of = {
        GENERATIONS: "submit",
        LISTING: "list",
        CHAT_PATH: "chat",
    }
    expected = Counter(
        (r.method, kind_of.get(r.path, "image" if r.path.startswith("/files/") else "?"))
        for r in upstream.requests
    )
    lines = [line for line in logs.lines if UPSTREAM_CALL.match(line)]
    logged = Counter(UPSTREAM_CALL.match(line).groups()[:2] for line in lines)
    assert logged == expected
    assert expected == Counter(
        {("POST", "submit"): 2, ("GET", "list"): 2, ("GET", "image"): 1, ("POST", "chat"): 1}
    )
    statuses = Counter(UPSTREAM_CALL.match(line).group(3) for line in lines)
    assert statuses == Counter({"200": 5, "400": 1})


def test_an_upstream_failure_is_logged_with_its_status_and_a_truncated_body(
    service, upstream, logs
):
    check_in(service)
    long_body = "E" + "x" * 2000
    upstream.fail(GENERATIONS, status=400, body=long_body, content_type="text/plain", times=1)
    answer = service.http.post(
        "/api/images/generate", json={"prompt": "a fox", "fingerprint": FINGERPRINT}
    )
    assert answer.status_code == 502
    assert "xxx" not in answer.text  # the body is for the log only
    failures = [line for line in logs.lines if "upstream default failure" in line]
    assert len(failures) == 1
    line = failures[0]
    assert line.startswith("WARNING scenemint.upstream")
    assert "HTTP 400" in line
    assert "Ex" in line
    body_in_log = line[line.index("Ex") :]
    assert 100 <= len(body_in_log) <= 400  # a readable start, not the whole body
    assert long_body not in line


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_every_upstreams_key_is_redacted_from_every_log_line_however_encoded(
    tmp_path, monkeypatch, capsys, log_format
):
    """The log's last line of defence knows the keys of the upstreams file too, and finds
    them before JSON escapes a quote or a backslash in them."""
    import logging

    from scenemint.config import Settings
    from scenemint.logs import configure_logging

    file_key = 'sk-"file\\key-0123'
    env_key = "sk-env-key-4567"
    monkeypatch.setenv("POOL_B_KEY", env_key)
    upstreams = tmp_path / "upstreams.toml"
    upstreams.write_text(
        "[[upstream]]\nname = 'a'\nbase_url = 'http://127.0.0.1:1'\n"
        f"api_key = '{file_key}'\n"
        "[[upstream]]\nname = 'b'\nbase_url = 'http://127.0.0.1:2'\napi_key_env = 'POOL_B_KEY'\n"
    )
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        settings = Settings(upstreams_file=upstreams, log_format=log_format)
        configure_logging(settings)
        log = logging.getLogger("scenemint.test")
        log.warning("a: %s / b: %s", file_key, env_key.upper())
        try:
            raise RuntimeError(f"failed with {file_key}")
        except RuntimeError:
            log.exception("and an exception")
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
    err = capsys.readouterr().err
    assert err.count("[redacted]") >= 3, err
    for text in (file_key, json.dumps(file_key)[1:-1], env_key, env_key.upper()):
        assert text not in err, err


def test_a_key_with_a_quote_or_backslash_is_found_however_json_escapes_it():
    from scenemint.upstream.secrets import KeyRedactor

    key = 'sk-Quote"Back\\slash-0123'
    redactor = KeyRedactor([key])
    body = json.dumps({"error": {"message": f"bad credentials: Bearer {key}"}})
    # as an upstream sends it, with `/` escaped too, cut short (no longer JSON)
    for text in (body, body.replace("/", "\\/"), body[:-2]):
        shown = redactor.redact(text)
        assert key not in shown and json.dumps(key)[1:-1] not in shown, shown
        assert "[redacted]" in shown


def test_an_upstream_echoing_a_key_with_a_quote_leaks_it_nowhere(tmp_path, logs):
    """The review's case: an upstream that answers 500 with our Authorization header in its
    JSON error body, for a key holding `"` and `\\`."""
    from tests.fake_upstream import FakeUpstream

    key = 'sk-Quote"Back\\slash-0123'
    with FakeUpstream(api_key=key) as upstream:
        body = json.dumps({"error": {"message": f"bad credentials: Bearer {key}"}})
        upstream.fail(GENERATIONS, status=500, body=body)
        with running_service(make_settings(tmp_path, upstream, submit_attempts=1)) as running:
            check_in(running)
            answer = running.http.post(
                "/api/images/generate", json={"prompt": "a fox", "fingerprint": FINGERPRINT}
            )
            readyz = running.http.get("/readyz")
    seen = answer.text + readyz.text + logs.text()
    assert "[redacted]" in logs.text()
    for spelling in (key, json.dumps(key)[1:-1]):
        assert spelling not in seen
