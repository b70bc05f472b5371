"""Quick checks that the fake chatgpt2api upstream's knobs work."""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.fake_upstream import (
    DEFAULT_API_KEY,
    TINY_PNG,
    FakeUpstream,
    generated_file_bytes,
    make_png,
)

AUTH = {"Authorization": f"Bearer {DEFAULT_API_KEY}"}
GENERATIONS = "/api/image-tasks/generations"


@pytest.fixture
def client(upstream: FakeUpstream) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=upstream.base_url, headers=AUTH, timeout=5) as c:
        yield c


def submit(client: httpx.Client, task_id: str, prompt: str = "a lighthouse") -> httpx.Response:
    body = {"client_task_id": task_id, "prompt": prompt, "model": "gpt-image-2", "size": "1:1"}
    return client.post(GENERATIONS, json=body)


def sse_payloads(text: str) -> list[str]:
    return [frame.removeprefix("data: ") for frame in text.split("\n\n") if frame]


def test_png_helpers_build_valid_images() -> None:
    with Image.open(io.BytesIO(make_png(3, 2))) as image:
        assert image.size == (3, 2)
    with Image.open(io.BytesIO(TINY_PNG)) as image:
        assert image.size == (1, 1)


def test_submission_is_idempotent_by_client_task_id(
    upstream: FakeUpstream, client: httpx.Client
) -> None:
    first = submit(client, "t1").json()
    again = submit(client, "t1", prompt="something else").json()
    assert first == again
    assert first["status"] == "queued" and first["mode"] == "generate"
    assert list(upstream.tasks) == ["t1"]
    assert [r.json["prompt"] for r in upstream.recorded(GENERATIONS)] == [
        "a lighthouse",
        "something else",
    ]


def test_edit_multipart_is_recorded_with_its_file(
    upstream: FakeUpstream, client: httpx.Client
) -> None:
    fields = {"client_task_id": "e1", "prompt": "make it blue", "model": "m", "size": "1:1"}
    files = {"image": ("ref.png", TINY_PNG, "image/png")}
    task = client.post("/api/image-tasks/edits", data=fields, files=files).json()
    assert task["mode"] == "edit"
    (request,) = upstream.recorded("/api/image-tasks/edits")
    assert request.form == fields
    assert request.files["image"].filename == "ref.png"
    assert request.files["image"].content_type == "image/png"
    assert request.files["image"].data == TINY_PNG
    assert request.content_length == len(request.body) and not request.chunked


def test_listing_reports_missing_ids(upstream: FakeUpstream, client: httpx.Client) -> None:
    submit(client, "a")
    url = upstream.complete_task("a", revised_prompt="better")
    answer = client.get("/api/image-tasks", params={"ids": "a,gone"}).json()
    assert answer["missing_ids"] == ["gone"]
    (item,) = answer["items"]
    assert item["status"] == "success"
    assert item["data"] == [{"url": url, "revised_prompt": "better"}]
    image = client.get(url)
    assert image.content == TINY_PNG and image.headers["content-type"] == "image/png"
    upstream.forget_task("a")
    assert client.get("/api/image-tasks", params={"ids": "a"}).json()["missing_ids"] == ["a"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}])
def test_wrong_or_missing_key_is_401(upstream: FakeUpstream, headers: dict[str, str]) -> None:
    answer = httpx.get(upstream.url("/v1/models"), headers=headers)
    assert answer.status_code == 401
    assert answer.json() == {"error": {"message": "unauthorized"}}


def test_fail_once_then_succeed_and_the_failed_request_is_recorded(
    upstream: FakeUpstream, client: httpx.Client
) -> None:
    upstream.fail(GENERATIONS, status=503, times=1)
    assert submit(client, "f1").status_code == 503
    assert "f1" not in upstream.tasks
    assert submit(client, "f1").status_code == 200
    assert len(upstream.recorded(GENERATIONS)) == 2


def test_garbage_and_wrong_shape_answer_200(upstream: FakeUpstream, client: httpx.Client) -> None:
    upstream.garbage("/api/image-tasks", times=1)
    upstream.wrong_shape("/v1/models", payload=[1, 2], times=1)
    garbage = client.get("/api/image-tasks", params={"ids": "x"})
    assert garbage.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        garbage.json()
    assert client.get("/v1/models").json() == [1, 2]
    assert client.get("/v1/models").json()["object"] == "list"


@pytest.mark.parametrize("fault", ["drop", "truncate"])
def test_broken_connections_raise_protocol_errors(
    upstream: FakeUpstream, client: httpx.Client, fault: str
) -> None:
    getattr(upstream, fault)(GENERATIONS, times=1, after_processing=True)
    with pytest.raises(httpx.RemoteProtocolError):
        submit(client, "lost")
    assert "lost" in upstream.tasks  # accepted upstream, answer lost


def test_never_end_hangs_until_timeout_and_stop_is_quick() -> None:
    fake = FakeUpstream().start()
    try:
        fake.never_end("/v1/models")
        with pytest.raises(httpx.ReadTimeout):
            httpx.get(fake.url("/v1/models"), headers=AUTH, timeout=0.3)
    finally:
        started = time.monotonic()
        fake.stop()
    assert time.monotonic() - started < 2


def test_hold_keeps_the_response_until_release(
    upstream: FakeUpstream, client: httpx.Client
) -> None:
    hold = upstream.hold(GENERATIONS)
    answers: list[httpx.Response] = []
    worker = threading.Thread(target=lambda: answers.append(submit(client, "h1")))
    worker.start()
    assert hold.wait(timeout=5)
    assert upstream.task("h1") is not None and not answers
    upstream.release(GENERATIONS)
    worker.join(timeout=5)
    assert answers[0].status_code == 200
    assert submit(client, "h2").status_code == 200  # no longer held


def test_stop_cuts_off_held_requests() -> None:
    fake = FakeUpstream().start()
    hold = fake.hold("/v1/models")
    errors: list[Exception] = []

    def call() -> None:
        try:
            httpx.get(fake.url("/v1/models"), headers=AUTH, timeout=5)
        except httpx.HTTPError as exc:
            errors.append(exc)

    worker = threading.Thread(target=call)
    worker.start()
    assert hold.wait(timeout=5)
    fake.stop()
    worker.join(timeout=5)
    assert len(errors) == 1


CHAT_BODY: dict[str, Any] = {
    "model": "gpt-5.5",
    "stream": True,
    "messages": [{"role": "user", "content": "hi"}],
}


def test_chat_stream_sends_chunk_frames_then_done(
    upstream: FakeUpstream, client: httpx.Client
) -> None:
    answer = client.post("/v1/chat/completions", json=CHAT_BODY)
    assert answer.headers["content-type"] == "text/event-stream"
    payloads = sse_payloads(answer.text)
    assert payloads[-1] == "[DONE]"
    frames = [json.loads(p) for p in payloads[:-1]]
    assert {f["object"] for f in frames} == {"chat.completion.chunk"}
    text = "".join(f["choices"][0]["delta"].get("content", "") for f in frames)
    assert text == "A lighthouse at dusk"
    assert frames[-1]["choices"][0]["finish_reason"] == "stop"
    assert len(upstream.chunk_sent_times) == 4


def test_chat_fail_after_breaks_the_stream(upstream: FakeUpstream, client: httpx.Client) -> None:
    upstream.chat_fail_after = 2
    received = b""
    with (
        pytest.raises(httpx.RemoteProtocolError),
        client.stream("POST", "/v1/chat/completions", json=CHAT_BODY) as answer,
    ):
        for piece in answer.iter_bytes():
            received += piece
    assert received.count(b"data: ") == 2 and b"[DONE]" not in received


def test_client_leaving_a_chat_stream_is_noticed(
    upstream: FakeUpstream, client: httpx.Client
) -> None:
    upstream.chat_chunk_delay = 0.2
    with client.stream("POST", "/v1/chat/completions", json=CHAT_BODY) as answer:
        next(answer.iter_bytes())
    assert upstream.stream_closed.wait(timeout=3)


def test_generated_big_file_arrives_whole(upstream: FakeUpstream, client: httpx.Client) -> None:
    size = 3 * 1024 * 1024 + 17
    url = upstream.add_file("big.png", size=size, chunk_size=256 * 1024)
    digest = hashlib.sha256()
    with client.stream("GET", url) as answer:
        assert answer.headers["content-length"] == str(size)
        for piece in answer.iter_bytes():
            digest.update(piece)
    assert digest.hexdigest() == hashlib.sha256(generated_file_bytes(size)).hexdigest()


def test_file_without_content_type(upstream: FakeUpstream, client: httpx.Client) -> None:
    url = upstream.add_file("raw", b"12345", content_type=None)
    answer = client.get(url)
    assert answer.content == b"12345" and "content-type" not in answer.headers
