"""POST /api/prompts/enhance: a streamed rewrite of the prompt by the upstream's chat model."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.conftest import assert_envelope, make_settings
from tests.fake_upstream import CHAT_PATH, FakeUpstream
from tests.service_runner import RunningService, running_service

ENHANCE = "/api/prompts/enhance"
DONE = "data: [DONE]"


def frames_of(text: str) -> list[str]:
    """The SSE events of a body, each exactly `data: ...` (every event ends with a blank line)."""
    assert text.endswith("\n\n"), text[-50:]
    return text[:-2].split("\n\n")


def payloads(frames: list[str]) -> list[dict]:
    out = []
    for frame in frames:
        assert frame.startswith("data: "), frame
        if frame != DONE:
            out.append(json.loads(frame[len("data: ") :]))
    return out


def content_of(chunks: list[dict]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)


def enhance(service: RunningService, prompt: str = "a fox", direction: str = "details"):
    return service.http.post(ENHANCE, json={"prompt": prompt, "direction": direction})


def chat_requests(upstream: FakeUpstream):
    return upstream.recorded(CHAT_PATH, method="POST")


# -- the upstream request -------------------------------------------------------------------


@pytest.mark.parametrize(("direction", "temperature"), [("details", 0.35), ("creative", 0.7)])
def test_the_upstream_request_is_a_streaming_chat_completion(
    service, upstream, direction, temperature
):
    answer = enhance(service, "  a lighthouse at dusk \n", direction)
    assert answer.status_code == 200, answer.text
    sent = chat_requests(upstream)
    assert len(sent) == 1
    request = sent[0]
    assert request.path == "/v1/chat/completions"
    assert request.authorization == f"Bearer {upstream.api_key}"
    body = request.json
    assert body["model"] == "gpt-5.5"
    assert body["stream"] is True
    assert body["temperature"] == temperature
    messages = body["messages"]
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[1]["content"] == "a lighthouse at dusk"
    assert "aspect ratio" in messages[0]["content"].lower()


def test_the_two_directions_have_different_system_prompts(service, upstream):
    for direction in ("details", "creative"):
        assert enhance(service, direction=direction).status_code == 200
    details, creative = (r.json["messages"][0]["content"] for r in chat_requests(upstream))
    assert details != creative
    for system in (details, creative):
        assert "aspect ratio" in system.lower()
        assert "a fox" not in system  # the user's text goes in its own message


def test_the_configured_prompt_model_is_used(tmp_path, upstream, logs):
    settings = make_settings(tmp_path, upstream, prompt_model="my-rewriter")
    with running_service(settings) as service:
        assert enhance(service).status_code == 200
    assert chat_requests(upstream)[0].json["model"] == "my-rewriter"


# -- the response ---------------------------------------------------------------------------


def test_the_answer_is_an_sse_stream_of_chunks_ending_with_done(service, upstream):
    upstream.chat_chunks = ["A ", "lighthouse ", "on a ", "cliff"]
    answer = enhance(service)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/event-stream")
    assert answer.headers["cache-control"] == "no-store"
    assert answer.headers["x-accel-buffering"] == "no"
    frames = frames_of(answer.text)
    assert frames[-1] == DONE
    assert frames.count(DONE) == 1
    chunks = payloads(frames)
    # one frame per upstream chunk, plus the upstream's closing frame (finish_reason "stop")
    assert len(chunks) == len(upstream.chat_chunks) + 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert content_of(chunks) == "A lighthouse on a cliff"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_chunks_are_not_buffered(service, upstream):
    upstream.chat_chunks = ["one ", "two ", "three ", "four"]
    upstream.chat_chunk_delay = 0.3
    started = time.monotonic()
    first_at = None
    with service.http.stream("POST", ENHANCE, json={"prompt": "x", "direction": "details"}) as r:
        assert r.status_code == 200
        text = ""
        for piece in r.iter_text():
            if first_at is None and "\n\n" in text + piece:
                first_at = time.monotonic()
            text += piece
    finished = time.monotonic()
    assert first_at is not None
    assert first_at - started < 0.25, f"first frame after {first_at - started:.2f}s"
    assert first_at < upstream.chunk_sent_times[-1]  # before the upstream sent the last chunk
    assert finished - started > 0.8  # the upstream really was slow
    assert content_of(payloads(frames_of(text))) == "one two three four"


# -- validation: nothing is sent upstream ---------------------------------------------------


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"prompt": "", "direction": "details"}, "empty_prompt"),
        ({"prompt": "   \n\t", "direction": "creative"}, "empty_prompt"),
        ({"direction": "details"}, "empty_prompt"),
        ({"prompt": "a fox", "direction": "sideways"}, "invalid_direction"),
        ({"prompt": "a fox", "direction": ""}, "invalid_direction"),
        ({"prompt": "a fox", "direction": 1}, "invalid_direction"),
        ({"prompt": "a fox"}, "invalid_direction"),
    ],
)
def test_bad_input_is_400_and_reaches_no_upstream(service, upstream, body, code):
    assert_envelope(service.http.post(ENHANCE, json=body), 400, code)
    assert chat_requests(upstream) == []


def test_a_body_that_is_not_json_is_400(service, upstream):
    answer = service.http.post(
        ENHANCE, content=b"prompt=x", headers={"Content-Type": "application/json"}
    )
    assert_envelope(answer, 400, "invalid_json")
    assert chat_requests(upstream) == []


def test_without_an_upstream_enhancement_is_503_in_its_own_words(tmp_path, logs):
    """Not "the image service is unavailable": an enhancement failure speaks of itself."""
    with running_service(make_settings(tmp_path, None)) as service:
        body = assert_envelope(enhance(service), 503, "enhance_not_configured")
    assert "image service" not in body["message"]
    assert "enhancement" in body["message"]


def test_without_a_prompt_model_enhancement_is_503(tmp_path, upstream, logs):
    with running_service(make_settings(tmp_path, upstream, prompt_model="  ")) as service:
        assert_envelope(enhance(service), 503, "enhance_not_configured")
    assert chat_requests(upstream) == []


# -- upstream refusals: a clear error before anything is streamed ----------------------------------


def test_an_upstream_500_is_502(service, upstream):
    upstream.fail(CHAT_PATH, status=500)
    assert_envelope(enhance(service), 502, "enhance_failed")
    assert len(chat_requests(upstream)) == 1  # a stream is not retried


def test_a_rejected_key_is_503_enhance_unavailable(tmp_path, upstream, logs):
    settings = make_settings(tmp_path, upstream, upstream_api_key="not-the-key")
    with running_service(settings) as service:
        assert_envelope(enhance(service), 503, "enhance_unavailable")
    assert chat_requests(upstream)[0].authorization == "Bearer not-the-key"


def test_an_upstream_401_is_503_enhance_unavailable(service, upstream):
    upstream.fail(CHAT_PATH, status=401, body='{"error": "unauthorized"}')
    assert_envelope(enhance(service), 503, "enhance_unavailable")


def test_an_answer_that_is_not_an_event_stream_is_502(service, upstream):
    upstream.chat_content_type = "application/json"
    answer = enhance(service)
    assert_envelope(answer, 502, "enhance_failed")
    assert "chat.completion" not in answer.text


def test_an_unreachable_upstream_is_502(service, upstream):
    upstream.stop()
    assert_envelope(enhance(service), 502, "enhance_failed")


# -- failures once streaming -----------------------------------------------------------------------


def test_a_stream_broken_midway_ends_with_an_error_frame_then_done(service, upstream):
    upstream.chat_chunks = ["A ", "lighthouse ", "at ", "dusk"]
    upstream.chat_fail_after = 2
    upstream.chat_chunk_delay = 0.2  # the first chunk arrives on its own, before the break
    answer = enhance(service)
    assert answer.status_code == 200
    frames = frames_of(answer.text)
    assert frames[-1] == DONE
    assert frames.count(DONE) == 1
    chunks = payloads(frames)
    # what arrived before the break was passed on (a chunk arriving together with the break
    # may be lost: aiohttp drops buffered data once the connection failed)
    before = content_of(chunks[:-1])
    assert before.startswith("A ")
    assert "A lighthouse ".startswith(before)
    error = chunks[-1]["error"]
    assert isinstance(error["message"], str)
    assert error["message"]


def test_a_garbage_stream_still_ends_with_done(service, upstream):
    upstream.garbage(CHAT_PATH)
    answer = enhance(service)
    assert answer.status_code == 200
    frames = frames_of(answer.text)
    assert frames[-1] == DONE


def test_a_client_leaving_closes_the_upstream_request(service, upstream):
    upstream.chat_chunks = [f"word{i} " for i in range(40)]
    upstream.chat_chunk_delay = 0.5
    body = {"prompt": "x", "direction": "creative"}
    with (
        httpx.Client(base_url=service.url, timeout=10) as client,
        client.stream("POST", ENHANCE, json=body) as r,
    ):
        assert r.status_code == 200
        for piece in r.iter_text():
            if "\n\n" in piece:
                break
    # the response (and its connection) is closed here, long before the upstream is done
    assert upstream.stream_closed.wait(2)
    assert len(upstream.chunk_sent_times) < 10
