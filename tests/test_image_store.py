"""Images we keep: a completed task's image is copied into our image store before the task is
reported completed, and served from there (GET/HEAD, conditional requests, ranges)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
import time
import tracemalloc
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from typer.testing import CliRunner, Result

from scenemint.cli import app
from scenemint.web.server import GuardedH11Protocol
from tests.conftest import (
    FINGERPRINT,
    assert_envelope,
    balance,
    check_in,
    fill,
    make_settings,
    remount,
    wait_finished,
)
from tests.fake_upstream import TINY_PNG, FakeUpstream, make_png, noisy_png
from tests.service_runner import RunningService, free_port, running_service

MiB = 1024 * 1024
IMMUTABLE = "public, max-age=31536000, immutable"
FILES = "/files/"


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


def audit(running: RunningService):
    return running.run(running.service.store.audit())


def row(running: RunningService, task_id: str):
    return running.run(running.service.store.get_task(task_id))


@pytest.fixture
def quick(tmp_path, upstream, logs):
    """A service whose image copies give up after 1.5 s (the fetch deadline)."""
    with running_service(make_settings(tmp_path, upstream, image_fetch_deadline=1.5)) as running:
        yield running


def failed_for_its_image(running: RunningService, task_id: str) -> None:
    """The copy gave up: the task failed, its credit came back, it has no image."""
    task = wait_finished(running, task_id)
    assert task["status"] == "failed", task
    assert task["error"] == "The finished image could not be retrieved. Your credit was returned."
    assert row(running, task_id).refunded
    assert_envelope(running.http.get(image_url(task_id)), 404, "image_not_ready")
    assert audit(running).ok


# -- completion includes the bytes -----------------------------------------------------------------


def test_a_completed_image_is_copied_then_served_from_the_store(service, upstream):
    task_id = new_task(service)
    picture = make_png(7, 5, rgb=(1, 2, 3))
    upstream.complete_task(task_id, image=picture)
    task = wait_finished(service, task_id)
    assert task["status"] == "completed"
    digest = hashlib.sha256(picture).hexdigest()
    stored = row(service, task_id)
    assert stored.image_key == f"{digest[:2]}/{digest}-{task_id}"
    assert (stored.image_type, stored.image_bytes) == ("image/png", len(picture))
    assert (stored.image_width, stored.image_height) == (7, 5)
    assert (service.settings.data_dir / "images" / stored.image_key).read_bytes() == picture
    answer = service.http.get(image_url(task_id))
    assert answer.status_code == 200
    assert answer.content == picture
    assert answer.headers["content-type"] == "image/png"
    assert answer.headers["content-length"] == str(len(picture))
    assert answer.headers["cache-control"] == IMMUTABLE
    assert answer.headers["etag"] == f'"{digest}"'
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.headers["accept-ranges"] == "bytes"
    assert "last-modified" in answer.headers


def test_until_its_image_is_stored_a_finished_task_is_running(service, upstream):
    task_id = new_task(service)
    upstream.complete_task(task_id)
    hold = upstream.hold(FILES)
    polled = service.http.get(f"/api/images/tasks/{task_id}").json()["data"]
    assert hold.wait()
    assert polled["status"] == "running"
    assert "image" not in polled
    assert service.http.get(f"/api/images/tasks/{task_id}").json()["data"]["status"] == "running"
    assert_envelope(service.http.get(image_url(task_id)), 404, "image_not_ready")
    hold.release()
    assert wait_finished(service, task_id)["status"] == "completed"
    assert service.http.get(image_url(task_id)).content == TINY_PNG


def test_the_upstream_forgetting_an_image_changes_nothing(service, upstream):
    """The original web UI's 7-day history reloads images long after the upstream (15 days or
    less) or OpenAI (60 minutes) forgot them."""
    task_id = new_task(service)
    upstream.complete_task(task_id)
    assert wait_finished(service, task_id)["status"] == "completed"
    upstream.forget_task(task_id)
    for name in list(upstream._files):
        upstream.remove_file(name)
    answer = service.http.get(image_url(task_id))
    assert answer.status_code == 200 and answer.content == TINY_PNG


def test_completion_downloads_each_image_once_whatever_the_pollers(service, upstream):
    task_id = new_task(service)
    upstream.complete_task(task_id)

    def poll_and_fetch(_: int) -> int:
        service.http.get(f"/api/images/tasks/{task_id}")
        return service.http.get(image_url(task_id)).status_code

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(poll_and_fetch, range(64)))
    assert wait_finished(service, task_id)["status"] == "completed"
    for _ in range(5):
        assert service.http.get(image_url(task_id)).status_code == 200
    assert len(upstream.recorded(FILES)) == 1


def test_the_image_request_upstream_carries_the_key(service, upstream):
    upstream.files_require_auth = True
    task_id = new_task(service)
    upstream.complete_task(task_id)
    assert wait_finished(service, task_id)["status"] == "completed"
    (request,) = upstream.recorded(FILES)
    assert request.authorization == f"Bearer {upstream.api_key}"


def test_an_image_on_another_allowed_host_gets_no_key(tmp_path, upstream, logs):
    with FakeUpstream(api_key="other-host-key") as host:
        url = host.add_file("x.png", TINY_PNG)
        settings = make_settings(tmp_path, upstream, image_hosts=[host.base_url])
        with running_service(settings) as service:
            task_id = new_task(service)
            finish_with(upstream, task_id, url)
            assert wait_finished(service, task_id)["status"] == "completed"
            assert service.http.get(image_url(task_id)).content == TINY_PNG
        (sent,) = host.recorded(FILES)
        assert sent.authorization is None


def test_the_served_type_is_what_the_bytes_are(service, upstream):
    task_id = new_task(service)
    finish_with(upstream, task_id, upstream.add_file("img", TINY_PNG, content_type="image/jpeg"))
    assert wait_finished(service, task_id)["status"] == "completed"
    assert service.http.get(image_url(task_id)).headers["content-type"] == "image/png"


def test_an_image_without_a_known_length_is_copied_whole(service, upstream):
    task_id = new_task(service)
    picture = make_png(300, 200)
    url = upstream.add_file("big.png", picture, chunk_size=1000, declare_length=False)
    finish_with(upstream, task_id, url)
    assert wait_finished(service, task_id)["status"] == "completed"
    assert service.http.get(image_url(task_id)).content == picture


def test_two_tasks_with_the_same_bytes_have_objects_of_their_own(service, upstream):
    """So that the sweep of one can never delete the other's (see the race test below)."""
    check_in(service)
    first, second = generate(service), generate(service)
    upstream.complete_task(first)
    upstream.complete_task(second)
    assert wait_finished(service, first)["status"] == "completed"
    assert wait_finished(service, second)["status"] == "completed"
    assert row(service, first).image_key != row(service, second).image_key
    objects = [p for p in (service.settings.data_dir / "images").rglob("*") if p.is_file()]
    assert len(objects) == 2
    tags = {service.http.get(image_url(task)).headers["etag"] for task in (first, second)}
    assert tags == {f'"{hashlib.sha256(TINY_PNG).hexdigest()}"'}  # the same bytes, one ETag


# -- no image: the credit comes back ---------------------------------------------------------------


@pytest.mark.parametrize(
    "url", ["/relative.png", "files/relative.png", "ftp://127.0.0.1/x.png", "file:///etc/passwd"]
)
def test_an_image_url_that_is_not_absolute_http_fails_and_refunds(service, upstream, url):
    """It stayed charged while its image answered 404 `image_not_ready` for ever."""
    task_id = new_task(service)
    upstream.set_task(task_id, status="success", data=[{"url": url}])
    task = wait_finished(service, task_id)
    assert task["status"] == "failed"
    assert balance(service) == 10
    assert upstream.recorded(FILES) == []
    assert_envelope(service.http.get(image_url(task_id)), 404, "image_not_ready")


def test_an_image_on_a_host_not_allowed_fails_at_once_and_refunds(quick, upstream):
    with FakeUpstream() as stranger:
        url = stranger.add_file("x.png", TINY_PNG)
        task_id = new_task(quick)
        finish_with(upstream, task_id, url)
        failed_for_its_image(quick, task_id)
        assert stranger.requests == []


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("text/html", b"<html><script>alert(1)</script></html>"),
        ("image/png", b"<html><script>alert(1)</script></html>"),
        ("image/svg+xml", b"<svg onload='alert(1)'/>"),
        ("image/png", TINY_PNG[: len(TINY_PNG) // 2]),  # cut short
        (None, TINY_PNG),
    ],
)
def test_what_is_not_a_whole_image_is_never_stored(quick, upstream, content_type, body):
    task_id = new_task(quick)
    finish_with(upstream, task_id, upstream.add_file("img", body, content_type=content_type))
    failed_for_its_image(quick, task_id)
    assert not list((quick.settings.data_dir / "images").rglob("*.*"))


def test_a_decompression_bomb_is_refused(quick, upstream):
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buffer, format="PNG")  # 100 M pixels, a few KiB
    task_id = new_task(quick)
    finish_with(upstream, task_id, upstream.add_file("bomb.png", buffer.getvalue()))
    failed_for_its_image(quick, task_id)


def test_a_passing_failure_of_the_download_is_tried_again(service, upstream):
    task_id = new_task(service)
    upstream.complete_task(task_id)
    upstream.fail(FILES, status=500, times=1)
    assert wait_finished(service, task_id)["status"] == "completed"
    assert len(upstream.recorded(FILES)) == 2
    assert service.http.get(image_url(task_id)).content == TINY_PNG
    assert balance(service) == 9


def test_a_download_that_keeps_failing_fails_the_task_at_the_fetch_deadline(quick, upstream):
    task_id = new_task(quick)
    finish_with(upstream, task_id, upstream.url("/files/never-added.png"))
    started = time.monotonic()
    failed_for_its_image(quick, task_id)
    assert 1.4 < time.monotonic() - started < 6
    assert len(upstream.recorded("/files/never-added.png")) >= 2


def test_an_unreachable_image_host_fails_the_task_at_the_fetch_deadline(tmp_path, upstream, logs):
    dead = f"http://127.0.0.1:{free_port()}"
    settings = make_settings(tmp_path, upstream, image_hosts=[dead], image_fetch_deadline=1.0)
    with running_service(settings) as service:
        task_id = new_task(service)
        finish_with(upstream, task_id, dead + "/x.png")
        failed_for_its_image(service, task_id)


@pytest.mark.parametrize("declare_length", [True, False])
def test_an_image_over_the_size_limit_is_never_stored(tmp_path, upstream, logs, declare_length):
    settings = make_settings(tmp_path, upstream, max_image_bytes=1 * MiB, image_fetch_deadline=1)
    with running_service(settings) as service:
        task_id = new_task(service)
        url = upstream.add_file("too-big.png", size=4 * MiB, declare_length=declare_length)
        finish_with(upstream, task_id, url)
        failed_for_its_image(service, task_id)


# -- not available -------------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["queued", "running"])
def test_an_unfinished_task_has_no_image(service, upstream, status):
    task_id = new_task(service)
    upstream.set_task(task_id, status=status)
    assert_envelope(service.http.get(image_url(task_id)), 404, "image_not_ready")
    assert upstream.recorded(FILES) == []


def test_a_failed_task_has_no_image(service, upstream):
    task_id = new_task(service)
    upstream.fail_task(task_id)
    assert_envelope(service.http.get(image_url(task_id)), 404, "image_not_ready")


def test_an_unknown_task_has_no_image(service, upstream):
    assert_envelope(service.http.get(image_url(str(uuid.uuid4()))), 404, "image_not_ready")
    assert upstream.requests == []


@pytest.mark.parametrize("bad_id", ["not-a-uuid", "..", "x" * 36])
def test_a_non_uuid_id_has_no_image(service, upstream, bad_id):
    answer = service.http.get(f"/api/images/tasks/{bad_id}/image")
    assert answer.status_code == 404
    assert answer.json()["code"] == -1
    assert upstream.requests == []


# -- HEAD, conditional requests, ranges ------------------------------------------------------------


@pytest.fixture
def stored(service, upstream) -> tuple[RunningService, str, bytes]:
    task_id = new_task(service)
    picture = make_png(40, 30, rgb=(9, 8, 7))
    upstream.complete_task(task_id, image=picture)
    assert wait_finished(service, task_id)["status"] == "completed"
    return service, task_id, picture


def test_head_answers_the_headers_without_a_body(stored):
    service, task_id, picture = stored
    answer = service.http.head(image_url(task_id))
    assert answer.status_code == 200
    assert answer.content == b""
    assert answer.headers["content-type"] == "image/png"
    assert answer.headers["content-length"] == str(len(picture))
    assert answer.headers["etag"] == f'"{hashlib.sha256(picture).hexdigest()}"'


def test_head_of_an_unfinished_task_is_404(service, upstream):
    answer = service.http.head(image_url(new_task(service)))
    assert answer.status_code == 404 and answer.content == b""
    assert answer.headers["content-type"] == "application/json"


@pytest.mark.parametrize("protocol", ["httptools", "h11"])
@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_an_image_lost_from_the_store_is_a_clean_503(tmp_path, upstream, logs, protocol, damage):
    """Deleted or cut short behind the service's back after it was served (its description
    is reused): the envelope says so before any byte of a body, and the client may try
    again — with our zero-copy sender (httptools) and with the plain one (h11)."""
    options = {"http": GuardedH11Protocol} if protocol == "h11" else {}
    with running_service(make_settings(tmp_path, upstream), **options) as service:
        task_id = new_task(service)
        upstream.complete_task(task_id, image=noisy_png(64, 64))
        assert wait_finished(service, task_id)["status"] == "completed"
        picture = service.http.get(image_url(task_id)).content
        path = service.settings.data_dir / "images" / row(service, task_id).image_key
        if damage == "deleted":
            path.unlink()
        else:
            path.write_bytes(picture[:1000])
        for _ in range(2):
            answer = service.http.get(image_url(task_id), headers={"Accept-Language": "zh-CN"})
            body = assert_envelope(answer, 503, "image_store_unavailable")
            assert answer.headers["retry-after"] == "2" and body["message"]
        tail = service.http.get(image_url(task_id), headers={"Range": "bytes=2000-"})
        assert_envelope(tail, 503, "image_store_unavailable")
        # bytes a cut-short file still has are not served either, nor its size promised
        head = service.http.get(image_url(task_id), headers={"Range": "bytes=0-9"})
        assert_envelope(head, 503, "image_store_unavailable")
        answer = service.http.head(image_url(task_id))
        assert answer.status_code == 503 and "content-range" not in answer.headers


def test_if_none_match_with_the_etag_answers_304(stored):
    service, task_id, _ = stored
    etag = service.http.get(image_url(task_id)).headers["etag"]
    for value in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        again = service.http.get(image_url(task_id), headers={"If-None-Match": value})
        assert again.status_code == 304, value
        assert again.content == b""
        assert again.headers["etag"] == etag


def test_another_etag_gets_the_image(stored):
    service, task_id, picture = stored
    answer = service.http.get(image_url(task_id), headers={"If-None-Match": '"something-else"'})
    assert answer.status_code == 200 and answer.content == picture


def test_if_modified_since_answers_304(stored):
    service, task_id, picture = stored
    modified = service.http.get(image_url(task_id)).headers["last-modified"]
    again = service.http.get(image_url(task_id), headers={"If-Modified-Since": modified})
    assert again.status_code == 304
    older = service.http.get(
        image_url(task_id), headers={"If-Modified-Since": "Mon, 01 Jan 2001 00:00:00 GMT"}
    )
    assert older.status_code == 200 and older.content == picture


@pytest.mark.parametrize(
    "value",
    [
        "Fri, 01 Jan 99999999999999999999 00:00:00 GMT",  # overflows a datetime
        "yesterday",
        "Mon, 32 Foo 2001 99:99:99 GMT",
    ],
)
def test_an_unreadable_if_modified_since_gets_the_image(stored, value):
    service, task_id, picture = stored
    answer = service.http.get(image_url(task_id), headers={"If-Modified-Since": value})
    assert answer.status_code == 200 and answer.content == picture


def test_if_modified_since_without_a_zone_is_gmt(stored, monkeypatch):
    """Read in the server's local zone, a date an hour after the image's was 200 east of GMT."""
    service, task_id, _ = stored
    stored_at = row(service, task_id).image_stored_at
    later = time.strftime("%a, %d %b %Y %H:%M:%S -0000", time.gmtime(stored_at + 3600))
    monkeypatch.setenv("TZ", "Asia/Shanghai")  # the server eight hours east of GMT
    time.tzset()
    try:
        answer = service.http.get(image_url(task_id), headers={"If-Modified-Since": later})
    finally:
        monkeypatch.undo()
        time.tzset()
    assert answer.status_code == 304


def test_if_none_match_for_an_unfinished_task_is_not_304(service, upstream):
    answer = service.http.get(image_url(new_task(service)), headers={"If-None-Match": "*"})
    assert answer.status_code == 404


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [("bytes=0-9", 0, 10), ("bytes=10-", 10, None), ("bytes=-16", -16, None), ("bytes=5-5", 5, 6)],
)
def test_a_single_range_is_206(stored, header, start, end):
    service, task_id, picture = stored
    answer = service.http.get(image_url(task_id), headers={"Range": header})
    assert answer.status_code == 206
    expected = picture[start:end]
    assert answer.content == expected
    first = start % len(picture)
    assert answer.headers["content-range"] == (
        f"bytes {first}-{first + len(expected) - 1}/{len(picture)}"
    )
    assert answer.headers["content-length"] == str(len(expected))


def test_a_range_past_the_end_is_416(stored):
    service, task_id, picture = stored
    answer = service.http.get(image_url(task_id), headers={"Range": f"bytes={len(picture)}-"})
    assert answer.status_code == 416
    assert answer.headers["content-range"] == f"bytes */{len(picture)}"
    assert answer.headers["cache-control"] == "no-store"  # about the request, not the image


@pytest.mark.parametrize("header", ["bytes=999999-", "bytes=0-9", "bytes=-5"])
def test_head_ignores_a_range_and_answers_the_whole_image_headers(stored, header):
    """Ranges are for GET only: HEAD with any Range (past the end too) is 200, never 416."""
    service, task_id, picture = stored
    answer = service.http.head(image_url(task_id), headers={"Range": header})
    assert answer.status_code == 200 and answer.content == b""
    assert answer.headers["content-length"] == str(len(picture))
    assert "content-range" not in answer.headers
    assert answer.headers["cache-control"] == "public, max-age=31536000, immutable"


@pytest.mark.parametrize(
    "header",
    [
        "bytes=0-1,5-9",
        "items=0-9",
        "bytes=abc",
        "bytes=9-2",
        "bytes=--5",
        "bytes=1_0-2_0",
        "bytes=+1-+3",
        "bytes=-",
        "bytes=١-٣".encode(),  # Arabic-Indic digits (UTF-8 on the wire)
        "bytes=0-" + "9" * 5000,
    ],
)
def test_several_or_odd_ranges_get_the_whole_image(stored, header):
    service, task_id, picture = stored
    answer = service.http.get(image_url(task_id), headers={"Range": header})
    assert answer.status_code == 200 and answer.content == picture


def test_if_range_with_another_etag_gets_the_whole_image(stored):
    service, task_id, picture = stored
    answer = service.http.get(
        image_url(task_id), headers={"Range": "bytes=0-9", "If-Range": '"other"'}
    )
    assert answer.status_code == 200 and answer.content == picture


# -- big images: streamed out of the store, never held whole -------------------------------------


def big_png(side: int) -> bytes:
    """A PNG of side x side noisy RGBA pixels: it hardly compresses (about 4 bytes a pixel)."""
    import io
    import os

    from PIL import Image

    buffer = io.BytesIO()
    Image.frombytes("RGBA", (side, side), os.urandom(side * side * 4)).save(
        buffer, format="PNG", compress_level=0
    )
    return buffer.getvalue()


def test_a_64_mib_image_is_served_with_bounded_memory(tmp_path, upstream):
    picture = big_png(4096)
    assert len(picture) > 64 * MiB
    settings = make_settings(tmp_path, upstream, max_image_bytes=100 * MiB, image_deadline=60)
    with running_service(settings) as service:
        task_id = new_task(service)
        upstream.complete_task(task_id, image=picture)
        assert wait_finished(service, task_id, timeout=60)["status"] == "completed"
        digest = hashlib.sha256()
        received = 0
        tracemalloc.start()
        try:
            baseline, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            with service.http.stream("GET", image_url(task_id)) as answer:
                assert answer.status_code == 200
                assert answer.headers["content-length"] == str(len(picture))
                for chunk in answer.iter_raw(256 * 1024):
                    received += len(chunk)
                    digest.update(chunk)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert received == len(picture)
        assert digest.digest() == hashlib.sha256(picture).digest()
        assert peak - baseline < 16 * MiB, f"peak memory grew by {(peak - baseline) / MiB:.1f} MiB"


def test_a_client_leaving_mid_image_is_no_server_error(tmp_path, upstream, logs):
    """A download cut by its client (a reset mid-body) is the client's business: nothing
    is logged as an error of ours, and the next request is served."""
    picture = big_png(2048)  # about 16 MiB: far more than the socket buffers hold
    settings = make_settings(tmp_path, upstream, max_image_bytes=100 * MiB, image_deadline=60)
    with running_service(settings) as service:
        task_id = new_task(service)
        upstream.complete_task(task_id, image=picture)
        assert wait_finished(service, task_id, timeout=60)["status"] == "completed"
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", service.port)) as sock:
                sock.sendall(f"GET {image_url(task_id)} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                assert sock.recv(65536).startswith(b"HTTP/1.1 200")
                # close with a reset while the server is still sending
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        time.sleep(0.5)
        assert (
            service.http.get(image_url(task_id), headers={"Range": "bytes=0-9"}).status_code == 206
        )
    errors = [line for line in logs.lines if line.startswith(("ERROR", "CRITICAL"))]
    assert errors == []


# -- tasks completed before the image store existed ----------------------------------------------


def make_legacy(running: RunningService, task_id: str) -> None:
    """What a task completed before this version looks like: completed, no image key."""
    running.run(
        running.service.store._call(
            running.service.store._write(
                lambda tx: tx.run(
                    "UPDATE tasks SET image_key = NULL, image_type = NULL, image_bytes = NULL,"
                    " image_stored_at = NULL WHERE id = ?",
                    task_id,
                )
            )
        )
    )


def test_a_task_completed_before_the_store_is_copied_on_its_first_request(service, upstream):
    task_id = new_task(service)
    upstream.complete_task(task_id)
    assert wait_finished(service, task_id)["status"] == "completed"
    make_legacy(service, task_id)
    files_before = len(upstream.recorded(FILES))
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: service.http.get(image_url(task_id)), range(8)))
    assert all(a.status_code == 200 and a.content == TINY_PNG for a in answers)
    assert len(upstream.recorded(FILES)) == files_before + 1
    assert row(service, task_id).image_key is not None


def test_a_legacy_image_the_upstream_lost_is_a_clean_502(service, upstream):
    task_id = new_task(service)
    upstream.complete_task(task_id)
    assert wait_finished(service, task_id)["status"] == "completed"
    make_legacy(service, task_id)
    for name in list(upstream._files):
        upstream.remove_file(name)
    assert_envelope(service.http.get(image_url(task_id)), 502, "upstream_failed")


# -- retention -------------------------------------------------------------------------------------


def test_expired_images_are_deleted_and_answer_410(tmp_path, upstream, logs):
    settings = make_settings(tmp_path, upstream, image_retention_days=1.0)
    with running_service(settings) as service:
        check_in(service)
        old, young = generate(service), generate(service)
        upstream.complete_task(old, image=make_png(5, 5))
        upstream.complete_task(young, image=make_png(6, 6))
        assert wait_finished(service, old)["status"] == "completed"
        assert wait_finished(service, young)["status"] == "completed"
        old_key = row(service, old).image_key
        # the old one was stored two days ago
        store = service.service.store
        service.run(
            store._call(
                store._write(
                    lambda tx: tx.run(
                        "UPDATE tasks SET image_stored_at = image_stored_at - 172800 WHERE id = ?",
                        old,
                    )
                )
            )
        )
        assert_envelope(service.http.get(image_url(old)), 410, "image_expired")
        zh = service.http.get(image_url(old), headers={"Accept-Language": "zh-CN"})
        assert zh.status_code == 410 and zh.json()["message"] == "该图片已过期并被删除。"
        deleted = service.run(service.app.state.sweeper.run_once())
        assert deleted == 1
        assert not (service.settings.data_dir / "images" / old_key).exists()
        assert_envelope(service.http.get(image_url(old)), 410, "image_expired")
        assert service.http.get(image_url(young)).status_code == 200
        assert service.run(service.app.state.sweeper.run_once()) == 0
        metrics = service.http.get("/metrics").text
        assert "scenemint_images_expired_total 1.0" in metrics


def _age(service: RunningService, task_id: str, seconds: float = 172800) -> None:
    """Make the task's image look stored `seconds` earlier (two days: past a 1-day rule)."""
    store = service.service.store
    service.run(
        store._call(
            store._write(
                lambda tx: tx.run(
                    "UPDATE tasks SET image_stored_at = image_stored_at - ? WHERE id = ?",
                    seconds,
                    task_id,
                )
            )
        )
    )


def test_an_image_swept_while_described_in_memory_answers_410(tmp_path, upstream, logs):
    """The service keeps what a completed task's image is (key, size, age) in memory. When
    another instance sweeps it (a shorter retention there, a clock ahead: here, the ledger
    row aged behind this instance's back), the next request finds the object gone and asks
    the ledger again: 410 `image_expired`, not 503."""
    settings = make_settings(tmp_path, upstream, image_retention_days=1.0)
    with running_service(settings) as service:
        check_in(service)
        task_id = generate(service)
        upstream.complete_task(task_id)
        assert wait_finished(service, task_id)["status"] == "completed"
        assert service.http.get(image_url(task_id)).content == TINY_PNG  # described, kept
        _age(service, task_id)
        assert service.run(service.app.state.sweeper.run_once()) == 1
        assert service.http.head(image_url(task_id)).status_code == 410
        assert_envelope(service.http.get(image_url(task_id)), 410, "image_expired")
        # and a HEAD first, on a fresh description
        other = generate(service)
        upstream.complete_task(other, image=make_png(7, 7))
        assert wait_finished(service, other)["status"] == "completed"
        assert service.http.head(image_url(other)).status_code == 200
        _age(service, other)
        assert service.run(service.app.state.sweeper.run_once()) == 1
        assert service.http.head(image_url(other)).status_code == 410
        assert_envelope(service.http.get(image_url(other)), 410, "image_expired")


def test_a_legacy_object_shared_with_a_live_task_outlives_the_expired_one(tmp_path, upstream, logs):
    """The first image store named objects by their digest alone, shared by the tasks that
    got the same bytes: such an object stays while one of its tasks is live."""
    settings = make_settings(tmp_path, upstream, image_retention_days=1.0)
    with running_service(settings) as service:
        check_in(service)
        old, young = generate(service), generate(service)
        upstream.complete_task(old)
        upstream.complete_task(young)  # the same bytes
        wait_finished(service, old)
        wait_finished(service, young)
        digest = hashlib.sha256(TINY_PNG).hexdigest()
        legacy = f"{digest[:2]}/{digest}"
        images = service.settings.data_dir / "images"
        for task in (old, young):
            (images / row(service, task).image_key).unlink()
        (images / legacy).write_bytes(TINY_PNG)
        store = service.service.store
        service.run(
            store._call(
                store._write(
                    lambda tx: tx.run(
                        "UPDATE tasks SET image_key = ? WHERE id IN (?, ?)", legacy, old, young
                    )
                )
            )
        )
        service.service.served._stored.clear()
        _age(service, old)
        assert service.run(service.app.state.sweeper.run_once()) == 0
        assert service.http.get(image_url(young)).content == TINY_PNG
        assert_envelope(service.http.get(image_url(old)), 410, "image_expired")
        assert (images / legacy).exists()


def test_a_sweep_racing_a_copy_of_the_same_bytes_never_deletes_the_live_image(
    tmp_path, upstream, logs
):
    """Between the sweep's look at the ledger and its delete, another task stores the same
    bytes: its image must survive (a shared object was deleted under it: charged, 503)."""
    settings = make_settings(tmp_path, upstream, image_retention_days=1.0)
    with running_service(settings) as service:
        check_in(service)
        old, young = generate(service), generate(service)
        upstream.complete_task(old)
        wait_finished(service, old)
        _age(service, old)
        images = service.service.images
        real_delete = images.delete
        deleted: list[str] = []

        async def delete(key: str) -> None:
            upstream.complete_task(young)  # the same bytes as the expired image
            for _ in range(200):
                if (await service.service.get_task(young)).status == "completed":
                    break
                await asyncio.sleep(0.05)
            deleted.append(key)
            await real_delete(key)

        images.delete = delete  # type: ignore[method-assign]
        try:
            assert service.run(service.app.state.sweeper.run_once()) == 1
        finally:
            images.delete = real_delete  # type: ignore[method-assign]
        assert deleted == [row(service, old).image_key]
        assert wait_finished(service, young)["status"] == "completed"
        answer = service.http.get(image_url(young))
        assert answer.status_code == 200 and answer.content == TINY_PNG
        assert_envelope(service.http.get(image_url(old)), 410, "image_expired")


def test_only_one_instance_sweeps_at_a_time(tmp_path, upstream, logs):
    with running_service(make_settings(tmp_path, upstream)) as service:
        store, owner = service.service.store, service.service.owner
        # the start-up sweep took the lease: nobody else gets it while it runs
        assert not service.run(store.claim_named("sweep", owner="someone-else", seconds=60))
        service.run(
            store._call(store._write(lambda tx: tx.run("UPDATE leases SET lease_until = 0")))
        )
        assert service.run(store.claim_named("sweep", owner="someone-else", seconds=60))
        assert service.run(service.app.state.sweeper.run_once()) == 0
        assert not service.run(store.claim_named("sweep", owner=owner, seconds=60))


def test_the_images_audit_checks_every_file_and_its_size(tmp_path, upstream, logs):
    with running_service(make_settings(tmp_path, upstream)) as service:
        task_id = new_task(service)
        upstream.complete_task(task_id, image=noisy_png(64, 64))
        assert wait_finished(service, task_id)["status"] == "completed"
        key = row(service, task_id).image_key
    env = {"SCENEMINT_DATA_DIR": str(tmp_path / "data")}
    runner = CliRunner()

    def audit_images() -> Result:
        return runner.invoke(app, ["audit", "images"], env=env, catch_exceptions=False)

    result = audit_images()
    assert result.exit_code == 0 and "1 live" in result.stdout, result.output
    path = tmp_path / "data" / "images" / key
    whole = path.read_bytes()
    path.write_bytes(whole[:1000])  # cut short behind the service's back
    result = audit_images()
    assert result.exit_code == 1
    assert f"image {key}: 1000 bytes stored, the ledger recorded {len(whole)}" in result.output
    path.unlink()
    result = audit_images()
    assert result.exit_code == 1
    assert f"image {key}: a completed task's image is missing" in result.output


def orphan_objects(tmp_path) -> tuple:
    """Two objects of no task, as a copy killed before its ledger write leaves them: one two
    hours old, one fresh (it could be a copy in flight)."""
    images = tmp_path / "data" / "images"
    digest = hashlib.sha256(b"left behind").hexdigest()
    old = images / digest[:2] / f"{digest}-{uuid.uuid4()}"
    fresh = images / digest[:2] / f"{digest}-{uuid.uuid4()}"
    old.parent.mkdir(parents=True, exist_ok=True)
    old.write_bytes(b"left behind")
    fresh.write_bytes(b"left behind")
    two_hours_ago = time.time() - 2 * 3600
    os.utime(old, (two_hours_ago, two_hours_ago))
    return old, fresh


def test_the_images_audit_counts_objects_of_no_task_without_failing(tmp_path, upstream, logs):
    """An object stored just before its ledger write failed is an expected leftover of a
    fault, not an inconsistency: the audit says so and passes; --delete-orphans removes the
    ones over the grace."""
    with running_service(make_settings(tmp_path, upstream)) as service:
        task_id = new_task(service)
        upstream.complete_task(task_id)
        assert wait_finished(service, task_id)["status"] == "completed"
    old, fresh = orphan_objects(tmp_path)
    env = {"SCENEMINT_DATA_DIR": str(tmp_path / "data")}
    runner = CliRunner()
    result = runner.invoke(app, ["audit", "images"], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "objects of no task 2: expected after a crash" in result.stdout
    assert "1 older: is the sweeper running?" in result.stdout
    assert old.exists() and fresh.exists()  # reported, not touched
    result = runner.invoke(
        app, ["audit", "images", "--delete-orphans"], env=env, catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    assert "objects of no task deleted 1" in result.stdout, result.output
    assert not old.exists() and fresh.exists()


def test_the_sweeper_removes_objects_of_no_task_once_past_the_grace(tmp_path, upstream, logs):
    with running_service(make_settings(tmp_path, upstream)) as service:
        task_id = new_task(service)
        upstream.complete_task(task_id)
        assert wait_finished(service, task_id)["status"] == "completed"
        key = row(service, task_id).image_key
        old, fresh = orphan_objects(tmp_path)
        service.run(service.app.state.sweeper.run_once())
        assert not old.exists() and fresh.exists()
        assert (tmp_path / "data" / "images" / key).exists()  # a task's image stays
        assert "scenemint_image_orphans_removed_total 1.0" in service.http.get("/metrics").text
        assert service.http.get(image_url(task_id)).status_code == 200


# -- metrics ---------------------------------------------------------------------------------------


def test_copies_and_failures_are_counted(quick, upstream):
    task_id = new_task(quick)
    upstream.complete_task(task_id)
    wait_finished(quick, task_id)
    broken = generate(quick)
    finish_with(upstream, broken, upstream.url("/files/never-added.png"))
    wait_finished(quick, broken)
    metrics = quick.http.get("/metrics").text
    assert "scenemint_image_copies_total 1.0" in metrics
    assert 'scenemint_image_copy_failures_total{reason="download"}' in metrics


# -- a copy cut short by a crash -------------------------------------------------------------------


def test_a_copy_interrupted_mid_download_is_redone_by_the_next_holder(tmp_path, upstream, logs):
    """An instance that stops copying (its copy cancelled: what a kill does to it) loses its
    lease; another copies again, and nothing half written is ever visible under a key."""
    settings = make_settings(tmp_path, upstream, lease_seconds=0.6)
    with running_service(settings) as first:
        task_id = new_task(first)
        picture = make_png(50, 50)
        url = upstream.add_file("slow.png", picture, chunk_size=100, chunk_delay=0.05)
        finish_with(upstream, task_id, url)
        first.http.get(f"/api/images/tasks/{task_id}")  # the copy begins
        upstream.wait_for_requests("/files/slow.png", count=1)
        first.run(first.app.state.copier.stop())  # the copy dies mid-download
        images = first.settings.data_dir / "images"
        assert not [p for p in images.rglob("*") if p.is_file()]
        assert row(first, task_id).state == "fetching"
    with running_service(settings) as second:
        assert wait_finished(second, task_id, timeout=20)["status"] == "completed"
        assert second.http.get(image_url(task_id)).content == picture
    assert len(upstream.recorded("/files/slow.png")) == 2


# -- the filesystem store on a disk that fails: a full disk, a read-only one -------------------


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_a_failing_disk_keeps_the_charge_safe_and_recovers(small_disk, upstream, logs, fault):
    images = small_disk / "images"
    images.mkdir()
    settings = make_settings(
        small_disk.parent, upstream, image_store=f"file://{images}", image_fetch_deadline=60
    )
    with running_service(settings) as service:
        task_id = new_task(service)
        filler = fill(small_disk) if fault == "full" else None
        if fault == "read-only":
            remount(small_disk, "ro")
        try:
            assert_envelope(service.http.get("/readyz"), 503, "not_ready")
            upstream.complete_task(task_id, image=noisy_png(60, 60))
            deadline = time.monotonic() + 10
            while row(service, task_id).fetch_attempts < 1:
                assert time.monotonic() < deadline, "no copy attempt ended"
                service.http.get(f"/api/images/tasks/{task_id}")  # learns it finished
                time.sleep(0.05)
            stored = row(service, task_id)
            assert stored.state == "fetching" and not stored.refunded
            assert "image store" in (stored.fetch_error or "") or "files" in stored.fetch_error
            assert not [p for p in images.rglob("*") if p.is_file()]  # nothing half written
            poll = service.http.get(f"/api/images/tasks/{task_id}").json()["data"]
            assert poll["status"] == "running"
        finally:
            if filler is not None:
                filler.unlink()
            if fault == "read-only":
                remount(small_disk, "rw")
        assert wait_finished(service, task_id, timeout=15)["status"] == "completed"
        assert service.http.get(image_url(task_id)).status_code == 200
        service.service.readiness.forget()
        assert service.http.get("/readyz").status_code == 200
        assert balance(service) == 9 and audit(service).ok


# -- zero-copy serving: a slow reader blocks nobody, a reader that leaves frees everything ------


def test_a_slow_or_vanishing_image_reader_never_holds_up_anyone(tmp_path, upstream, logs):
    import socket

    picture = noisy_png(1200, 1200)  # about 4 MiB: more than a socket buffer holds
    settings = make_settings(tmp_path, upstream, max_image_bytes=64 * MiB)
    with running_service(settings) as service:
        task_id = new_task(service)
        upstream.complete_task(task_id, image=picture)
        assert wait_finished(service, task_id)["status"] == "completed"
        readers = []
        for _ in range(4):  # readers that take a little, then stop reading
            sock = socket.create_connection(("127.0.0.1", service.port))
            sock.sendall(f"GET {image_url(task_id)} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            sock.recv(65536)
            readers.append(sock)
        started = time.monotonic()
        for _ in range(20):  # everyone else is answered at once meanwhile
            assert service.http.get(f"/api/images/tasks/{task_id}").status_code == 200
        assert time.monotonic() - started < 2.0
        whole = service.http.get(image_url(task_id))
        assert whole.status_code == 200 and whole.content == picture
        for sock in readers:  # they vanish mid-body
            sock.close()
        time.sleep(0.3)
        again = service.http.get(image_url(task_id), headers={"Range": "bytes=1000-1999"})
        assert again.status_code == 206 and again.content == picture[1000:2000]
    assert "Traceback" not in logs.text()
