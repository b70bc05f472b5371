"""The boundary nothing crosses: one black-box test per finding of the outside read (issue 10).

Hostile input from clients and odd answers from the upstream are each answered with a clean
envelope error or a well-formed stream; nothing reaches a client as a 500, nothing waits
without a deadline, and nothing is charged for a request that failed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from scenemint.logs import TextFormatter
from tests.conftest import (
    FINGERPRINT,
    POSTGRES_URL,
    SKIP_POSTGRES,
    assert_envelope,
    balance,
    check_in,
    fill,
    make_settings,
    postgres_schema_url,
    wait_finished,
)
from tests.fake_upstream import TINY_PNG, FakeUpstream, make_png
from tests.service_runner import RunningService, running_service

GENERATE = "/api/images/generate"
ENHANCE = "/api/prompts/enhance"
JSON_ROUTES = [GENERATE, ENHANCE, "/api/quota/status", "/api/quota/check-in"]
CHAT = "/v1/chat/completions"
LISTING = "/api/image-tasks"
MODELS = "/v1/models"


def audit(running: RunningService):
    return running.run(running.service.store.audit())


def generated(running: RunningService, prompt: str = "a fox") -> dict:
    answer = running.http.post(GENERATE, json={"prompt": prompt, "fingerprint": FINGERPRINT})
    assert answer.status_code == 200, answer.text
    return answer.json()["data"]


def frames(text: str) -> list[str]:
    return [block for block in text.split("\n\n") if block]


# -- client input that used to reach a driver or an encoder -------------------------------------


@pytest.mark.parametrize("route", JSON_ROUTES)
def test_deeply_nested_json_is_400_on_every_json_route(service, route):
    """RecursionError from the JSON decoder answered 500."""
    check_in(service)
    for body in ("[" * 30_000 + "]" * 30_000, '{"prompt": ' + "[" * 40 + "]" * 40 + "}"):
        answer = service.http.post(
            route, content=body, headers={"content-type": "application/json"}
        )
        assert_envelope(answer, 400, "json_too_deep")
    assert balance(service) == 10


@pytest.mark.parametrize("route", [GENERATE, ENHANCE])
@pytest.mark.parametrize("text", ["a \\ud800 cat", "a \\udfff", "a\\u0000cat"])
def test_a_lone_surrogate_or_nul_in_a_prompt_is_400(service, upstream, route, text):
    """A lone surrogate was a UnicodeEncodeError (SQLite, enhancement); a NUL a DataError on
    PostgreSQL."""
    check_in(service)
    body = '{"prompt": "' + text + '", "direction": "details", "fingerprint": "' + FINGERPRINT
    answer = service.http.post(
        route, content=body + '"}', headers={"content-type": "application/json"}
    )
    assert_envelope(answer, 400, "invalid_text")
    assert balance(service) == 10
    assert upstream.requests == []


def test_a_nul_in_a_prompt_is_400_on_postgresql(tmp_path, upstream, logs):
    if not POSTGRES_URL:
        pytest.skip(SKIP_POSTGRES)
    for url in postgres_schema_url():
        settings = make_settings(tmp_path, upstream, database_url=url)
        with running_service(settings) as running:
            check_in(running)
            answer = running.http.post(
                GENERATE,
                content='{"prompt": "a\\u0000b", "fingerprint": "' + FINGERPRINT + '"}',
                headers={"content-type": "application/json"},
            )
            assert_envelope(answer, 400, "invalid_text")
            assert balance(running) == 10
            assert audit(running).ok


def multipart(boundary: str, *, close: bool, cut_image: bool = False) -> bytes:
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nmake it winter\r\n',
        f'--{boundary}\r\nContent-Disposition: form-data; name="fingerprint"\r\n\r\n'
        f"{FINGERPRINT}\r\n",
    ]
    body = "".join(parts).encode()
    image = TINY_PNG[: len(TINY_PNG) // 2] if cut_image else TINY_PNG
    body += (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode() + image
    if close:
        body += f"\r\n--{boundary}--\r\n".encode()
    return body


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(multipart("XyZ", close=False), id="no-closing-boundary"),
        pytest.param(multipart("XyZ", close=False, cut_image=True), id="truncated-part"),
    ],
)
def test_a_multipart_body_cut_short_is_400_and_charges_nothing(service, upstream, body):
    """It was accepted and charged as a *text* generation, the image part silently dropped."""
    check_in(service)
    answer = service.http.post(
        GENERATE, content=body, headers={"content-type": "multipart/form-data; boundary=XyZ"}
    )
    assert_envelope(answer, 400, "invalid_form")
    assert balance(service) == 10
    assert upstream.requests == []


def test_a_whole_multipart_body_is_still_an_edit(service, upstream):
    check_in(service)
    answer = service.http.post(
        GENERATE,
        content=multipart("XyZ", close=True),
        headers={"content-type": "multipart/form-data; boundary=XyZ"},
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["data"]["mode"] == "image"


# -- memory bounded by bytes ---------------------------------------------------------------------


def test_long_paths_are_refused_before_any_work(service):
    """Any path segment was cached with a body that echoed it: a few thousand polls of 60 KB
    ids took hundreds of MiB."""
    long_id = "x" * 60_000
    answer = service.http.get(f"/api/images/tasks/{long_id}")
    assert_envelope(answer, 414, "path_too_long")
    assert long_id not in answer.text
    for _ in range(200):
        odd = "y" * 900 + uuid.uuid4().hex
        assert service.http.get(f"/api/images/tasks/{odd}").json()["data"]["status"] == "failed"
    assert len(service.service.answers) == 0  # only ids of the UUID shape are ever cached


# -- enhancement streams -------------------------------------------------------------------------


CHUNK = (
    b'{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"%s"}}]}'
)


@pytest.fixture
def quick_streams(tmp_path, upstream, logs) -> Iterator[RunningService]:
    settings = make_settings(
        tmp_path, upstream, stream_idle_timeout=1.0, stream_deadline=2.0, stream_ping_interval=5
    )
    with running_service(settings) as running:
        yield running


def enhance(running: RunningService, **headers: str) -> httpx.Response:
    return running.http.post(
        ENHANCE, json={"prompt": "a cat", "direction": "details"}, headers=headers, timeout=10
    )


def test_an_oversize_sse_line_ends_the_stream_with_an_error_frame(quick_streams, upstream):
    """aiohttp's LineTooLong killed the reader silently: `: ping` for ever, never [DONE]."""
    upstream.chat_raw = [b"data: " + CHUNK % b"a" + b"\n\n", b"data: " + b"x" * 300_000]
    started = time.monotonic()
    answer = enhance(quick_streams)
    assert answer.status_code == 200
    blocks = frames(answer.text)
    assert blocks[-1] == "data: [DONE]"
    assert json.loads(blocks[-2][6:])["error"]["code"] == "enhance_interrupted"
    assert time.monotonic() - started < 1.5


@pytest.mark.parametrize("ending", [b"\r\n", b"\r", b"\n"])
def test_every_sse_line_ending_is_read_and_frames_are_forwarded_whole(
    quick_streams, upstream, ending
):
    upstream.chat_raw = [
        b"data: " + CHUNK % b"one" + ending + ending,
        b": comment" + ending + b"data: " + CHUNK % b"two" + ending + ending,
        b"data: [DONE]" + ending + ending,
    ]
    answer = enhance(quick_streams)
    blocks = frames(answer.text)
    contents = [json.loads(b[6:])["choices"][0]["delta"]["content"] for b in blocks[:-1]]
    assert contents == ["one", "two"]
    assert blocks[-1] == "data: [DONE]"
    assert "\r" not in answer.text


def test_a_cr_inside_an_upstream_frame_never_reaches_the_browser_raw(quick_streams, upstream):
    """A CR inside a JSON frame was forwarded raw: the browser's parser saw a cut frame."""
    upstream.chat_raw = [
        b'data: {"choices":[{"delta":{"content":"a\rb"}}]}\n\n',
        b"data: [DONE]\n\n",
    ]
    answer = enhance(quick_streams)
    assert "\r" not in answer.text
    for block in frames(answer.text)[:-1]:
        json.loads(block[6:])  # every frame we send is a whole JSON object
    assert frames(answer.text)[-1] == "data: [DONE]"


def test_an_endless_stream_ends_at_the_stream_deadline(quick_streams, upstream):
    """An endless SSE stream was relayed for ever."""
    upstream.chat_raw = [b"data: " + CHUNK % b"more" + b"\n\n"]
    upstream.chat_raw_delay = 0.05
    upstream.chat_raw_forever = True
    started = time.monotonic()
    answer = enhance(quick_streams)
    took = time.monotonic() - started
    blocks = frames(answer.text)
    assert blocks[-1] == "data: [DONE]"
    assert json.loads(blocks[-2][6:])["error"]["code"] == "enhance_too_long"
    assert 1.9 < took < 3.5
    assert upstream.stream_closed.wait(2)


def test_stream_error_frames_speak_the_readers_language(quick_streams, upstream):
    upstream.chat_raw = [b"data: {not json\n\n"]
    answer = enhance(quick_streams, **{"Accept-Language": "zh-CN,zh;q=0.9"})
    error = json.loads(frames(answer.text)[-2][6:])["error"]
    assert error["message"] == "提示词优化的输出被中断。"


def test_an_enhancement_failure_says_the_enhancement_failed(quick_streams, upstream):
    upstream.fail(CHAT, status=500)
    body = assert_envelope(enhance(quick_streams), 502, "enhance_failed")
    assert "enhancement" in body["message"]
    assert "image" not in body["message"]
    zh = assert_envelope(enhance(quick_streams, **{"Accept-Language": "zh"}), 502, "enhance_failed")
    assert zh["message"] == "提示词优化失败，请稍后重试。"


class SilentUpstream:
    """A TCP server that reads a request and never answers; notes when the peer hangs up."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.base_url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted = threading.Event()
        self.closed_at: float | None = None
        self.closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            conn, _ = self.sock.accept()
            self.accepted.set()
            with conn:
                while conn.recv(65536):
                    pass
                self.closed_at = time.monotonic()
                self.closed.set()

    def close(self) -> None:
        self.sock.close()


def test_a_client_leaving_before_the_upstream_answers_cancels_the_upstream_request(tmp_path, logs):
    """The upstream request stayed open for up to 120 s after the client had left."""
    silent = SilentUpstream()
    settings = make_settings(
        tmp_path,
        None,
        upstream_base_url=silent.base_url,
        upstream_api_key="k-silent-upstream-key",
        stream_idle_timeout=60,
    )
    try:
        with running_service(settings) as running:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(
                    running.url + ENHANCE,
                    json={"prompt": "a cat", "direction": "details"},
                    timeout=httpx.Timeout(10, read=0.5),
                )
            left = time.monotonic()
            assert silent.accepted.is_set()
            assert silent.closed.wait(3), "the upstream request was left open"
            assert silent.closed_at is not None and silent.closed_at - left < 1.5
    finally:
        silent.close()


# -- the image proxy -----------------------------------------------------------------------------


def completed_with(running: RunningService, upstream: FakeUpstream, url: str) -> str:
    task_id = generated(running)["id"]
    upstream.set_task(task_id, status="success", data=[{"url": url}], error=None)
    return task_id


def test_a_gzip_encoded_image_is_stored_and_served_with_headers_that_agree(service, upstream):
    """It was decompressed but served with the compressed Content-Length: a cut body."""
    check_in(service)
    picture = make_png(64, 64)  # a PNG of one colour: gzip shrinks it further
    url = upstream.add_file("z.png", picture, gzip_encoded=True)
    task_id = completed_with(service, upstream, url)
    assert wait_finished(service, task_id)["status"] == "completed"
    answer = service.http.get(f"/api/images/tasks/{task_id}/image")
    assert answer.status_code == 200
    assert answer.content == picture
    assert int(answer.headers["content-length"]) == len(picture)
    assert answer.headers.get("content-encoding") in (None, "identity")
    (request,) = upstream.recorded("/files/z.png")
    assert request.headers["Accept-Encoding"] == "identity"


@pytest.fixture
def gives_up_fast(tmp_path, upstream, logs) -> Iterator[RunningService]:
    settings = make_settings(tmp_path, upstream, image_fetch_deadline=1.0, image_deadline=1.0)
    with running_service(settings) as running:
        check_in(running)
        yield running


def assert_refunded_without_image(running: RunningService, task_id: str) -> None:
    task = wait_finished(running, task_id)
    assert task["status"] == "failed"
    answer = running.http.get(f"/api/images/tasks/{task_id}/image")
    assert_envelope(answer, 404, "image_not_ready")
    assert balance(running) == 10
    assert audit(running).ok


@pytest.mark.parametrize(
    "make_url",
    [
        pytest.param(lambda base: base.replace("http://", "http://user:pw@") + "/f", id="userinfo"),
        pytest.param(lambda base: "http://127.0.0.1:99999/f.png", id="port-out-of-range"),
        pytest.param(lambda base: "http://[::1/f.png", id="broken-ipv6"),
        pytest.param(lambda base: base + "/files/\x00.png", id="nul"),
    ],
)
def test_odd_image_urls_fail_the_task_cleanly_and_refund(gives_up_fast, upstream, make_url):
    """They answered 500."""
    task_id = completed_with(gives_up_fast, upstream, make_url(upstream.base_url))
    assert_refunded_without_image(gives_up_fast, task_id)


def test_a_backslash_in_a_redirect_location_fails_the_task_cleanly(tmp_path, upstream, logs):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Redirect(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", "\\\\evil.example\\a.png")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    origin = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        settings = make_settings(tmp_path, upstream, image_hosts=[origin], image_fetch_deadline=1.0)
        with running_service(settings) as running:
            check_in(running)
            task_id = completed_with(running, upstream, origin + "/a.png")
            assert_refunded_without_image(running, task_id)
    finally:
        server.shutdown()
        server.server_close()


def test_an_image_that_drips_is_cut_at_the_image_deadline(gives_up_fast, upstream):
    """One byte a second defeated the first-byte and idle timeouts: 60 s for 100 kB."""
    url = upstream.add_file("drip.png", make_png(40, 40), chunk_size=4, chunk_delay=0.1)
    task_id = completed_with(gives_up_fast, upstream, url)
    started = time.monotonic()
    assert_refunded_without_image(gives_up_fast, task_id)
    assert time.monotonic() - started < 6
    # each attempt was cut at the deadline: far fewer bytes than the whole image were read
    assert len(upstream.recorded("/files/drip.png")) <= 4


# -- logs ------------------------------------------------------------------------------------------


@pytest.fixture
def text_log() -> Iterator[list[str]]:
    """The service's own text log format, line by line."""
    lines: list[str] = []

    class Lines(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.extend(self.format(record).split("\n"))

    handler = Lines()
    handler.setFormatter(TextFormatter("%(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield lines
    finally:
        root.removeHandler(handler)


def test_a_line_break_in_a_path_never_forges_a_log_line(service, text_log):
    service.http.get("/api/images/tasks/x%0AINFO%20scenemint.access%20forged%0D%0A")
    assert not any(line.startswith("INFO scenemint.access forged") for line in text_log)
    assert any("forged" in line for line in text_log)


def test_a_key_straddling_the_cut_of_an_error_body_is_never_logged_in_part(
    tmp_path, upstream, logs
):
    """Error bodies were cut to 300 bytes *before* the key was redacted."""
    check_in_settings = make_settings(tmp_path, upstream, submit_attempts=1)
    with running_service(check_in_settings) as running:
        check_in(running)
        key = upstream.api_key
        for offset in (280, 290, 299):
            upstream.fail(
                "/api/image-tasks/generations", status=400, body="x" * offset + key, times=1
            )
            running.http.post(GENERATE, json={"prompt": "a", "fingerprint": FINGERPRINT})
    text = logs.text()
    for size in range(8, len(key) + 1):
        assert key[:size] not in text, f"{size} characters of the key were logged"


# -- one upstream's failures never block another's -----------------------------------------------


def test_failing_chat_and_readiness_probes_never_block_generation(tmp_path, upstream, logs):
    """As a real chatgpt2api behaves when it cannot reach its provider: /v1/models and chat
    fail with 502, its image-task API works. With the default breakers."""
    with running_service(make_settings(tmp_path, upstream)) as running:
        upstream.fail(MODELS, status=502)
        upstream.fail(CHAT, status=502)
        for _ in range(10):
            answer = running.http.get("/readyz")
            assert answer.status_code == 200, answer.text
            assert answer.json()["data"]["chat"] == "unavailable"
            running.service.readiness.forget()  # ask again, do not reuse the cached answer
        for _ in range(10):
            assert enhance(running).status_code in (502, 503)
        check_in(running)
        assert generated(running)["status"] == "queued"


# -- disk faults around reference files ----------------------------------------------------------


def test_a_failed_reference_removal_never_fails_a_poll_and_is_retried(service, upstream):
    check_in(service)
    answer = service.http.post(
        GENERATE,
        data={"prompt": "winter", "fingerprint": FINGERPRINT},
        files={"image": ("a.png", TINY_PNG, "image/png")},
    )
    task_id = answer.json()["data"]["id"]
    references = service.service.references
    path = references.path_for(task_id)
    assert path.exists()
    real_drop = references.drop
    failures = []

    async def failing_drop(target):
        failures.append(target)
        raise PermissionError(13, "read-only file system")

    references.drop = failing_drop
    try:
        upstream.complete_task(task_id)
        assert wait_finished(service, task_id)["status"] == "completed"
        assert failures and path.exists()
    finally:
        references.drop = real_drop
    service.run(service.app.state.reconciler.run_once())
    assert not path.exists()


def test_a_full_disk_is_not_ready_charges_nothing_and_leaves_no_empty_files(
    small_disk, upstream, logs
):
    """A failed write during a full disk left empty files, and /readyz said ready."""
    settings = make_settings(small_disk, upstream, data_dir=small_disk / "data")
    with running_service(settings) as running:
        check_in(running)
        assert running.http.get("/readyz").status_code == 200
        filler = fill(small_disk)
        try:
            assert_envelope(running.http.get("/readyz"), 503, "not_ready")
            answer = running.http.post(
                GENERATE,
                data={"prompt": "winter", "fingerprint": FINGERPRINT},
                files={"image": ("a.png", TINY_PNG * 200, "image/png")},
            )
            assert answer.status_code == 503, answer.text
            assert answer.json()["code"] == -1
            references = small_disk / "data" / "references"
            leftovers = list(references.iterdir()) if references.exists() else []
            assert leftovers == []
        finally:
            filler.unlink()
        running.service.readiness.forget()
        assert running.http.get("/readyz").status_code == 200
        assert balance(running) == 10
        assert audit(running).ok


# -- small things ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hosts", ["cdn.example.com", "https://cdn.example.com/images", "http://cdn:99999"]
)
def test_an_image_host_that_is_not_an_origin_stops_the_start(tmp_path, hosts):
    """`cdn.example.com` (no scheme) was dropped silently; a path widened the allowance."""
    result = subprocess.run(
        [sys.executable, "-m", "scenemint", "serve", "--port", "0"],
        env={"PATH": "/usr/bin:/bin", "SCENEMINT_IMAGE_HOSTS": hosts, "SCENEMINT_DATA_DIR": "d"},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "SCENEMINT_IMAGE_HOSTS" in result.stdout + result.stderr


def test_the_missing_task_message_speaks_chinese(service):
    answer = service.http.get(
        f"/api/images/tasks/{uuid.uuid4()}", headers={"Accept-Language": "zh-CN"}
    )
    assert answer.json()["data"]["error"] == "任务不存在或已过期"


def test_a_full_disk_under_the_database_never_answers_500_nor_loses_a_credit(
    small_disk, upstream, logs
):
    """Issue 9, defect 7: on a full SQLite disk a client got 500 and paid for nothing."""
    settings = make_settings(small_disk, upstream, data_dir=small_disk / "data", lease_seconds=0.5)
    with running_service(settings) as running:
        check_in(running)
        received = []
        filler = fill(small_disk)
        try:
            for index in range(8):
                answer = running.http.post(
                    GENERATE, json={"prompt": f"fox {index}", "fingerprint": FINGERPRINT}
                )
                assert answer.status_code in (200, 503), answer.text
                assert answer.json()["code"] in (0, -1)
                if answer.status_code == 200:
                    received.append(answer.json()["data"]["id"])
        finally:
            filler.unlink()
        time.sleep(0.6)  # leases of requests that could not finish lapse
        running.run(running.app.state.reconciler.run_once())
        report = audit(running)
        assert report.ok, report.violations
        kept = [t for t in received if not running.run(running.service.store.get_task(t)).refunded]
        assert balance(running) == 10 - len(kept)
