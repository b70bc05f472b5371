"""GET/HEAD /api/images/tasks/{id}/image: the finished image, streamed from the upstream."""

from __future__ import annotations

import hashlib
import tracemalloc
import uuid

import httpx
import pytest

from tests.conftest import FINGERPRINT, assert_envelope, check_in, make_settings
from tests.fake_upstream import TINY_PNG, FakeUpstream, generated_file_bytes, make_png
from tests.service_runner import RunningService, free_port, running_service

MiB = 1024 * 1024
IMMUTABLE = "public, max-age=31536000, immutable"


def generate(service: RunningService) -> str:
    answer = service.http.post(
        "/api/images/generate", json={"prompt": "a red fox", "fingerprint": FINGERPRINT}
    )
    assert answer.status_code == 200, answer.text
    return str(answer.json()["data"]["id"])


def new_task(service: RunningService) -> str:
    check_in(service)
    return generate(service)


def finish_with(upstream: FakeUpstream, task_id: str, url: str) -> None:
    upstream.set_task(task_id, status="success", data=[{"url": url}], error=None)


def image_url(task_id: str) -> str:
    return f"/api/images/tasks/{task_id}/image"


# -- a completed task ----------------------------------------------------------------------


def test_completed_image_is_served_with_the_upstream_bytes_and_cache_headers(service, upstream):
    task_id = new_task(service)
    picture = make_png(7, 5, rgb=(1, 2, 3))
    upstream.complete_task(task_id, image=picture)
    answer = service.http.get(image_url(task_id))
    assert answer.status_code == 200
    assert answer.content == picture
    assert answer.headers["content-type"] == "image/png"
    assert answer.headers["content-length"] == str(len(picture))
    assert answer.headers["cache-control"] == IMMUTABLE
    assert answer.headers["etag"] == f'"{task_id}"'
    assert answer.headers["x-content-type-options"] == "nosniff"


def test_the_image_request_upstream_carries_the_key(service, upstream):
    upstream.files_require_auth = True
    task_id = new_task(service)
    upstream.complete_task(task_id)
    answer = service.http.get(image_url(task_id))
    assert answer.status_code == 200
    assert answer.content == TINY_PNG
    files = upstream.recorded("/files/")
    assert len(files) == 1
    assert files[0].authorization == f"Bearer {upstream.api_key}"


def test_an_image_on_another_allowed_host_gets_no_key(tmp_path, upstream, logs):
    with FakeUpstream(api_key="other-host-key") as host:
        url = host.add_file("x.png", TINY_PNG)
        settings = make_settings(tmp_path, upstream, image_hosts=[host.base_url])
        with running_service(settings) as service:
            task_id = new_task(service)
            finish_with(upstream, task_id, url)
            answer = service.http.get(image_url(task_id))
            assert answer.status_code == 200
            assert answer.content == TINY_PNG
        sent = host.recorded("/files/")
        assert len(sent) == 1
        assert sent[0].authorization is None


def test_an_image_on_a_host_not_allowed_is_not_fetched(service, upstream):
    task_id = new_task(service)
    with FakeUpstream() as stranger:
        url = stranger.add_file("x.png", TINY_PNG)
        finish_with(upstream, task_id, url)
        assert_envelope(service.http.get(image_url(task_id)), 502, "upstream_failed")
        assert stranger.requests == []


@pytest.mark.parametrize(
    "upstream_type",
    [None, "text/html", "text/html; charset=utf-8", "image/svg+xml", "image/jpeg", "image/webp"],
)
def test_a_body_that_is_not_an_image_is_never_served(service, upstream, upstream_type):
    task_id = new_task(service)
    url = upstream.add_file(
        "img", b"<html><script>alert(1)</script></html>", content_type=upstream_type
    )
    finish_with(upstream, task_id, url)
    answer = service.http.get(image_url(task_id))
    assert_envelope(answer, 502, "upstream_failed")
    assert "script" not in answer.text


@pytest.mark.parametrize("upstream_type", ["image/png", "image/jpeg", "image/webp"])
def test_the_served_type_is_what_the_bytes_are(service, upstream, upstream_type):
    task_id = new_task(service)
    url = upstream.add_file("img", TINY_PNG, content_type=upstream_type)
    finish_with(upstream, task_id, url)
    answer = service.http.get(image_url(task_id))
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "image/png"
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.content == TINY_PNG


def test_without_a_known_length_the_image_is_streamed_whole(service, upstream):
    task_id = new_task(service)
    url = upstream.add_file("big.png", size=300_000, chunk_size=10_000, declare_length=False)
    finish_with(upstream, task_id, url)
    answer = service.http.get(image_url(task_id))
    assert answer.status_code == 200
    assert answer.content == generated_file_bytes(300_000)
    assert "content-length" not in answer.headers or answer.headers["content-length"] == "300000"


# -- not available ---------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["queued", "running"])
def test_an_unfinished_task_has_no_image(service, upstream, status):
    task_id = new_task(service)
    upstream.set_task(task_id, status=status)
    assert_envelope(service.http.get(image_url(task_id)), 404, "image_not_ready")
    assert upstream.recorded("/files/") == []


def test_a_failed_task_has_no_image(service, upstream):
    task_id = new_task(service)
    upstream.fail_task(task_id)
    assert_envelope(service.http.get(image_url(task_id)), 404, "image_not_ready")


def test_an_image_that_completed_since_the_last_poll_is_served(service, upstream):
    """No poll in between: the image route itself finds out the task finished."""
    task_id = new_task(service)
    upstream.complete_task(task_id)
    answer = service.http.get(image_url(task_id))
    assert answer.status_code == 200
    assert answer.content == TINY_PNG


def test_an_unknown_task_has_no_image(service, upstream):
    assert_envelope(service.http.get(image_url(str(uuid.uuid4()))), 404, "image_not_ready")
    assert upstream.requests == []


@pytest.mark.parametrize("bad_id", ["not-a-uuid", "..", "x" * 36])
def test_a_non_uuid_id_has_no_image(service, upstream, bad_id):
    answer = service.http.get(f"/api/images/tasks/{bad_id}/image")
    assert answer.status_code == 404
    assert answer.json()["code"] == -1
    assert upstream.requests == []


@pytest.mark.parametrize(
    "url", ["/relative.png", "files/relative.png", "ftp://127.0.0.1/x.png", "file:///etc/passwd"]
)
def test_an_image_url_that_is_not_absolute_http_is_404(service, upstream, url):
    task_id = new_task(service)
    upstream.set_task(task_id, status="success", data=[{"url": url}])
    assert_envelope(service.http.get(image_url(task_id)), 404, "image_not_ready")
    assert upstream.recorded("/files/") == []
    assert upstream.recorded("/relative") == []


# -- upstream failures -------------------------------------------------------------------------


def test_an_image_file_missing_upstream_is_502(service, upstream):
    task_id = new_task(service)
    finish_with(upstream, task_id, upstream.url("/files/never-added.png"))
    assert_envelope(service.http.get(image_url(task_id)), 502, "upstream_failed")
    assert len(upstream.recorded("/files/never-added.png")) == 1


def test_an_image_file_failing_upstream_is_502(service, upstream):
    task_id = new_task(service)
    upstream.complete_task(task_id)
    upstream.fail("/files/", status=500, times=1)
    assert_envelope(service.http.get(image_url(task_id)), 502, "upstream_failed")
    # a passing failure: the next request is served
    assert service.http.get(image_url(task_id)).content == TINY_PNG


def test_an_unreachable_upstream_is_502(service, upstream):
    task_id = new_task(service)
    upstream.complete_task(task_id)
    polled = service.http.get(f"/api/images/tasks/{task_id}").json()["data"]
    assert polled["status"] == "completed"
    upstream.stop()
    assert_envelope(service.http.get(image_url(task_id)), 502, "upstream_failed")


def test_an_unreachable_image_host_is_502(tmp_path, upstream, logs):
    dead = f"http://127.0.0.1:{free_port()}"
    with running_service(make_settings(tmp_path, upstream, image_hosts=[dead])) as service:
        task_id = new_task(service)
        finish_with(upstream, task_id, dead + "/x.png")
        assert_envelope(service.http.get(image_url(task_id)), 502, "upstream_failed")


# -- HEAD and conditional requests ---------------------------------------------------------------


def test_head_answers_the_headers_without_a_body(service, upstream):
    task_id = new_task(service)
    picture = make_png(3, 3)
    upstream.complete_task(task_id, image=picture)
    answer = service.http.head(image_url(task_id))
    assert answer.status_code == 200
    assert answer.content == b""
    assert answer.headers["content-type"] == "image/png"
    assert answer.headers["content-length"] == str(len(picture))
    assert answer.headers["cache-control"] == IMMUTABLE
    assert answer.headers["etag"] == f'"{task_id}"'


def test_head_of_an_unfinished_task_is_404(service, upstream):
    task_id = new_task(service)
    assert service.http.head(image_url(task_id)).status_code == 404


def test_if_none_match_with_the_etag_answers_304(service, upstream):
    task_id = new_task(service)
    upstream.complete_task(task_id)
    first = service.http.get(image_url(task_id))
    etag = first.headers["etag"]
    files_before = len(upstream.recorded("/files/"))
    again = service.http.get(image_url(task_id), headers={"If-None-Match": etag})
    assert again.status_code == 304
    assert again.content == b""
    assert again.headers["etag"] == etag
    assert len(upstream.recorded("/files/")) == files_before  # nothing fetched for a 304


def test_if_none_match_for_an_unfinished_task_is_not_304(service, upstream):
    task_id = new_task(service)
    answer = service.http.get(image_url(task_id), headers={"If-None-Match": f'"{task_id}"'})
    assert answer.status_code == 404


def test_another_etag_gets_the_image(service, upstream):
    task_id = new_task(service)
    upstream.complete_task(task_id)
    answer = service.http.get(image_url(task_id), headers={"If-None-Match": '"something-else"'})
    assert answer.status_code == 200
    assert answer.content == TINY_PNG


# -- big images: streamed, never held in memory ------------------------------------------


@pytest.fixture
def roomy_service(tmp_path, upstream):
    """A service allowing 200 MiB images (no log capture: it would only add to the memory)."""
    settings = make_settings(tmp_path, upstream, max_image_bytes=200 * MiB)
    with running_service(settings) as running:
        yield running


def expected_digest(size: int) -> str:
    # generated files repeat a 4 KiB pattern; hash it without building the whole file
    assert size % 4096 == 0
    block = generated_file_bytes(4096)
    digest = hashlib.sha256()
    for _ in range(size // 4096):
        digest.update(block)
    return digest.hexdigest()


@pytest.mark.parametrize("declare_length", [True, False], ids=["with-length", "chunked"])
def test_a_64_mib_image_streams_through_with_bounded_memory(
    roomy_service, upstream, declare_length
):
    size = 64 * MiB
    task_id = new_task(roomy_service)
    url = upstream.add_file("huge.png", size=size, declare_length=declare_length)
    finish_with(upstream, task_id, url)
    expected = expected_digest(size)
    digest = hashlib.sha256()
    received = 0
    tracemalloc.start()
    try:
        baseline, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        with roomy_service.http.stream("GET", image_url(task_id)) as answer:
            assert answer.status_code == 200
            if declare_length:
                assert answer.headers["content-length"] == str(size)
            for chunk in answer.iter_raw(256 * 1024):
                received += len(chunk)
                digest.update(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert received == size
    assert digest.hexdigest() == expected
    growth = peak - baseline
    assert growth < 16 * MiB, f"peak memory grew by {growth / MiB:.1f} MiB"


def test_an_image_declared_above_the_limit_is_refused_with_502(tmp_path, upstream):
    """The upstream's Content-Length says it is too big: refused before answering."""
    with running_service(make_settings(tmp_path, upstream, max_image_bytes=1 * MiB)) as service:
        task_id = new_task(service)
        url = upstream.add_file("too-big.png", size=4 * MiB)
        finish_with(upstream, task_id, url)
        assert_envelope(service.http.get(image_url(task_id)), 502, "upstream_failed")


def test_an_image_growing_above_the_limit_is_cut_short(tmp_path, upstream):
    """No Content-Length: the stream has begun when the limit is crossed; it is cut off."""
    size = 4 * MiB
    with running_service(make_settings(tmp_path, upstream, max_image_bytes=1 * MiB)) as service:
        task_id = new_task(service)
        url = upstream.add_file("too-big.png", size=size, declare_length=False)
        finish_with(upstream, task_id, url)
        received = 0
        with (
            pytest.raises(httpx.RemoteProtocolError),  # an incomplete chunked body
            service.http.stream("GET", image_url(task_id)) as answer,
        ):
            assert answer.status_code == 200
            for chunk in answer.iter_raw():
                received += len(chunk)
        assert received <= 1 * MiB
