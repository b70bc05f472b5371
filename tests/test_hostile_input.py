"""Hostile input: oversized and malformed bodies, long prompts, odd task ids, and image URLs
that try to make the service fetch (or serve) what it should not. Each is refused with an
envelope error, changes no credit, and never reaches the upstream when it need not."""

from __future__ import annotations

import json
import select
import socket
import threading
import time
import tracemalloc
import uuid
from collections.abc import Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.conftest import (
    FINGERPRINT,
    assert_envelope,
    balance,
    check_in,
    make_settings,
    wait_finished,
)
from tests.fake_upstream import TINY_PNG, FakeUpstream
from tests.service_runner import RunningService, running_service

MiB = 1024 * 1024
GENERATE = "/api/images/generate"
ENHANCE = "/api/prompts/enhance"
GENERATIONS = "/api/image-tasks/generations"
JSON_ROUTES = [GENERATE, ENHANCE, "/api/quota/status", "/api/quota/check-in"]


def audit(running: RunningService):
    return running.run(running.service.store.audit())


@pytest.fixture(scope="module")
def shared_upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture(scope="module")
def shared_service(tmp_path_factory, shared_upstream) -> Iterator[RunningService]:
    """One service for every test of refused input (they must change nothing anyway)."""
    settings = make_settings(tmp_path_factory.mktemp("hostile"), shared_upstream)
    with running_service(settings) as running:
        check_in(running)
        yield running


@pytest.fixture
def funded(shared_service, shared_upstream, logs) -> Iterator[RunningService]:
    """The shared service, 10 credits on FINGERPRINT; after the test, none of them moved."""
    shared_upstream.reset()
    yield shared_service
    assert balance(shared_service) == 10
    report = audit(shared_service)
    assert (report.grants, report.charges, report.refunds, report.tasks) == (10, 0, 0, 0)


def form(fields: dict[str, str], files: list[tuple[str, str, bytes, str]] = (), *, boundary="B0"):
    """A multipart/form-data body built by hand (so that it can be as odd as a test needs)."""
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    for name, filename, data, kind in files:
        parts.append(
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                f'filename="{filename}"\r\nContent-Type: {kind}\r\n\r\n'
            ).encode()
            + data
            + b"\r\n"
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


VALID_FIELDS = {"prompt": "a red fox", "fingerprint": FINGERPRINT}


# -- raw HTTP: bodies without a length, and lengths without a body -----------------------------


def raw_request(
    running: RunningService,
    head: str,
    chunks: Iterable[bytes] = (),
    *,
    chunked: bool = True,
) -> tuple[int, bytes, int]:
    """Send a request by hand and stop sending as soon as the server answers.

    Returns the status, the answer's body and how many body bytes were sent.
    """
    with socket.create_connection(("127.0.0.1", running.port), timeout=10) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n")
        sent = 0
        finished = True
        for chunk in chunks:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:  # the server has answered (or closed): stop sending
                finished = False
                break
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            except OSError:
                finished = False
                break
            sent += len(chunk)
        if finished and chunked:
            sock.sendall(b"0\r\n\r\n")
        received = b""
        while b"\r\n\r\n" not in received:
            data = sock.recv(65536)
            assert data, f"connection closed without an answer: {received!r}"
            received += data
        header, _, body = received.partition(b"\r\n\r\n")
        lines = header.decode("latin-1").split("\r\n")
        length = next(
            int(line.split(":", 1)[1])
            for line in lines
            if line.lower().startswith("content-length")
        )
        while len(body) < length:
            data = sock.recv(65536)
            assert data, "connection closed mid-answer"
            body += data
        return int(lines[0].split()[1]), body, sent


def request_head(path: str, content_type: str, *, length: int | None = None) -> str:
    framing = "Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}"
    return f"POST {path} HTTP/1.1\nHost: test\nContent-Type: {content_type}\n{framing}\n"


def zeros(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    block = b"\0" * size
    for _ in range(total // size):
        yield block


# -- JSON bodies ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", JSON_ROUTES)
def test_a_json_body_over_64_kib_is_413(funded, shared_upstream, path):
    body = {"prompt": "x" * (64 * 1024), "fingerprint": FINGERPRINT, "direction": "details"}
    answer = funded.http.post(path, content=json.dumps(body).encode())
    assert_envelope(answer, 413, "payload_too_large")
    assert shared_upstream.requests == []


def test_a_json_body_of_exactly_64_kib_is_read(funded, shared_upstream):
    body = {"fingerprint": FINGERPRINT, "pad": ""}
    body["pad"] = "x" * (64 * 1024 - len(json.dumps(body)))
    raw = json.dumps(body).encode()
    assert len(raw) == 64 * 1024
    assert funded.http.post("/api/quota/status", content=raw).status_code == 200


def test_a_json_length_over_the_limit_is_refused_before_the_body_is_read(funded):
    """Only the headers are sent: the answer comes anyway, so nothing waited for the body."""
    head = request_head("/api/quota/status", "application/json", length=2**40)
    status, body, _ = raw_request(funded, head, chunked=False)
    assert status == 413
    assert json.loads(body)["error"] == "payload_too_large"


def test_a_length_that_lies_low_ends_the_body_where_it_says(funded, shared_upstream):
    """Content-Length 20, then far more: the body is those 20 bytes (invalid JSON) and what
    follows is not a request either. Whichever layer answers first (our envelope or the HTTP
    parser's own refusal of the trailing bytes), it is a 400 and nothing happens."""
    head = request_head("/api/quota/check-in", "application/json", length=20)
    more = b'{"fingerprint": "' + b"x" * 1000 + b'"}'
    status, _, _ = raw_request(funded, head, [more], chunked=False)
    assert status == 400
    assert shared_upstream.requests == []


@pytest.mark.parametrize("path", [GENERATE, "/api/quota/check-in"])
def test_a_json_body_without_a_length_is_counted_while_read(funded, shared_upstream, path):
    head = request_head(path, "application/json")
    status, body, sent = raw_request(funded, head, zeros(64 * MiB))
    assert status == 413
    assert json.loads(body)["error"] == "payload_too_large"
    assert sent < 64 * MiB  # the answer came long before the end of the body
    assert shared_upstream.requests == []


@pytest.mark.parametrize(
    "raw",
    [
        b"{",
        b'{"prompt": "a fox", "fingerprint": ',
        b"\xff\xfe not utf-8",
        b"",
        b"NaN-ish nonsense",
        b'["prompt", "a fox"]',
        b'"a string"',
        b"null",
    ],
    ids=["open-brace", "cut-off", "not-utf8", "empty", "nonsense", "array", "string", "null"],
)
@pytest.mark.parametrize("path", JSON_ROUTES)
def test_malformed_json_is_400(funded, shared_upstream, path, raw):
    answer = funded.http.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert_envelope(answer, 400, "invalid_json")
    assert shared_upstream.requests == []


@pytest.mark.parametrize("kind", ["text/plain", "application/x-www-form-urlencoded", "image/png"])
def test_a_generate_body_of_another_type_is_400(funded, shared_upstream, kind):
    body = json.dumps(VALID_FIELDS).encode()
    answer = funded.http.post(GENERATE, content=body, headers={"Content-Type": kind})
    assert_envelope(answer, 400, "unsupported_media_type")


# -- multipart bodies ------------------------------------------------------------------------------


def test_a_valid_form_generates(service, upstream):
    """The control case: the hand-built form of these tests is accepted when it is sound."""
    check_in(service)
    body, headers = form(VALID_FIELDS, [("image", "a.png", TINY_PNG, "image/png")])
    answer = service.http.post(GENERATE, content=body, headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.json()["data"]["mode"] == "image"


@pytest.mark.parametrize(
    ("body", "headers", "code"),
    [
        pytest.param(
            b"--B0\r\nnot a part at all",
            {"Content-Type": "multipart/form-data"},
            "invalid_form",
            id="no-boundary",
        ),
        pytest.param(
            *form({**VALID_FIELDS, **{f"extra{i}": "x" for i in range(10)}}),
            "invalid_form",
            id="many-fields",
        ),
        pytest.param(
            *form({**VALID_FIELDS, "size": "1:1" + "x" * (40 * 1024)}),
            "invalid_form",
            id="huge-text-field",
        ),
        pytest.param(
            *form(VALID_FIELDS, [("image", f"{i}.png", TINY_PNG, "image/png") for i in range(3)]),
            "too_many_files",
            id="several-files",
        ),
        pytest.param(
            *form(VALID_FIELDS, [("avatar", "a.png", TINY_PNG, "image/png")]),
            "invalid_form",
            id="file-under-another-name",
        ),
        pytest.param(
            form(VALID_FIELDS)[0].replace(b"--B0--", b"--B0\r\n" + form(VALID_FIELDS)[0][:60]),
            form(VALID_FIELDS)[1],
            "invalid_form",
            id="duplicated-field",
        ),
        pytest.param(
            *form(VALID_FIELDS, [("image", "a.png", b"<svg onload=alert(1)>", "image/png")]),
            "invalid_image",
            id="not-an-image",
        ),
        pytest.param(
            *form(VALID_FIELDS, [("image", "a.png", b"", "image/png")]),
            "empty_image",
            id="empty-file",
        ),
    ],
)
def test_a_hostile_form_is_400(funded, shared_upstream, body, headers, code):
    answer = funded.http.post(GENERATE, content=body, headers=headers)
    assert_envelope(answer, 400, code)
    assert shared_upstream.requests == []


@pytest.fixture
def small_uploads(tmp_path, upstream, logs):
    """A 64 KiB reference image limit: the multipart limit is then 128 KiB."""
    settings = make_settings(tmp_path, upstream, max_reference_bytes=64 * 1024)
    with running_service(settings) as running:
        check_in(running)
        yield running
        assert balance(running) == 10
        assert audit(running).charges == 0


def test_a_reference_image_over_the_limit_is_413(small_uploads, upstream):
    image = TINY_PNG + b"\0" * (64 * 1024)
    body, headers = form(VALID_FIELDS, [("image", "big.png", image, "image/png")])
    assert len(body) < 128 * 1024  # under the body limit: the file itself is counted
    answer = small_uploads.http.post(GENERATE, content=body, headers=headers)
    assert_envelope(answer, 413, "image_too_large")
    assert upstream.requests == []


def test_an_upload_length_over_the_limit_is_refused_before_the_body_is_read(small_uploads):
    head = request_head(GENERATE, "multipart/form-data; boundary=B0", length=2**40)
    status, body, _ = raw_request(small_uploads, head, chunked=False)
    assert status == 413
    assert json.loads(body)["error"] == "image_too_large"


def test_an_upload_without_a_length_is_counted_while_read(small_uploads, upstream):
    head = request_head(GENERATE, "multipart/form-data; boundary=B0")
    start = form(VALID_FIELDS, [("image", "a.png", TINY_PNG, "image/png")])[0].split(b"--B0--")[0]
    status, body, sent = raw_request(small_uploads, head, [start, *zeros(64 * MiB)])
    assert status == 413
    assert json.loads(body)["error"] == "image_too_large"
    assert sent < 64 * MiB
    assert upstream.requests == []


def test_a_one_gib_upload_is_refused_without_being_buffered(tmp_path, upstream):
    """The default limits; the body is streamed without a length. No log capture here: it
    would only add to the memory being measured."""
    with running_service(make_settings(tmp_path, upstream)) as running:
        check_in(running)
        head = request_head(GENERATE, "multipart/form-data; boundary=B0")
        start = form(VALID_FIELDS)[0].split(b"--B0--")[0] + (
            b'--B0\r\nContent-Disposition: form-data; name="image"; filename="huge.png"\r\n'
            b"Content-Type: image/png\r\n\r\n" + TINY_PNG
        )
        tracemalloc.start()
        try:
            baseline, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            started = time.monotonic()
            status, body, sent = raw_request(running, head, [start, *zeros(1024 * MiB)])
            took = time.monotonic() - started
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert status == 413
        assert json.loads(body)["error"] == "image_too_large"
        assert sent < 100 * MiB  # refused after the 10 MiB limit, not after a gigabyte
        assert took < 10
        growth = peak - baseline
        assert growth < 30 * MiB, f"peak memory grew by {growth / MiB:.1f} MiB"
        assert balance(running) == 10
        assert upstream.requests == []


# -- prompts --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [GENERATE, ENHANCE])
def test_a_prompt_over_4000_characters_is_400(funded, shared_upstream, path):
    body = {"prompt": "x" * 4001, "fingerprint": FINGERPRINT, "direction": "details"}
    assert_envelope(funded.http.post(path, json=body), 400, "prompt_too_long")
    assert shared_upstream.requests == []


def test_a_prompt_of_4000_characters_is_accepted(service, upstream):
    check_in(service)
    answer = service.http.post(GENERATE, json={"prompt": "é" * 4000, "fingerprint": FINGERPRINT})
    assert answer.status_code == 200, answer.text
    assert upstream.recorded(GENERATIONS)[0].json["prompt"] == "é" * 4000


def test_surrounding_whitespace_does_not_count_towards_the_limit(service, upstream):
    check_in(service)
    prompt = "  \n" + "x" * 4000 + "\t "
    answer = service.http.post(GENERATE, json={"prompt": prompt, "fingerprint": FINGERPRINT})
    assert answer.status_code == 200, answer.text


def test_the_prompt_limit_is_configurable(tmp_path, upstream, logs):
    with running_service(make_settings(tmp_path, upstream, max_prompt_chars=10)) as running:
        check_in(running)
        long = {"prompt": "x" * 11, "fingerprint": FINGERPRINT, "direction": "details"}
        assert_envelope(running.http.post(GENERATE, json=long), 400, "prompt_too_long")
        assert_envelope(running.http.post(ENHANCE, json=long), 400, "prompt_too_long")
        fits = {"prompt": "x" * 10, "fingerprint": FINGERPRINT}
        assert running.http.post(GENERATE, json=fits).status_code == 200
        assert balance(running) == 9


@pytest.mark.parametrize("prompt", [None, 42, ["a fox"], {"text": "a fox"}, True, "   "])
def test_a_prompt_that_is_not_text_is_400(funded, shared_upstream, prompt):
    answer = funded.http.post(GENERATE, json={"prompt": prompt, "fingerprint": FINGERPRINT})
    assert_envelope(answer, 400, "empty_prompt")
    assert shared_upstream.requests == []


@pytest.mark.parametrize(
    "fingerprint", ["short", "x" * 257, "has space", "semi;colon", "ünïcode-fp", None, 12345678]
)
def test_a_hostile_fingerprint_is_400(funded, shared_upstream, fingerprint):
    answer = funded.http.post(GENERATE, json={"prompt": "a fox", "fingerprint": fingerprint})
    assert_envelope(answer, 400, "invalid_fingerprint")
    assert shared_upstream.requests == []


# -- task ids --------------------------------------------------------------------------------------

BAD_IDS = [
    "not-a-uuid",
    "..",
    "%2e%2e%2fadmin",
    "x" * 36,
    "x" * 5000,
    "1" * 32,  # a UUID without dashes
    "{" + str(uuid.UUID(int=1)) + "}",
    "ids=a,b",
    "a%2Cb",
    "%00",
]
# ".." is resolved by the client and "%2f" decodes to a "/": neither path names a task route
NOT_A_TASK_PATH = {"..", "%2e%2e%2fadmin"}
TOO_LONG = {"x" * 5000}  # refused before any work: 414


@pytest.mark.parametrize("bad_id", BAD_IDS)
def test_a_task_id_that_is_not_a_uuid_answers_missing_without_an_upstream_call(
    funded, shared_upstream, bad_id
):
    answer = funded.http.get(f"/api/images/tasks/{bad_id}")
    if bad_id in NOT_A_TASK_PATH:
        assert_envelope(answer, 404, "not_found")
    elif bad_id in TOO_LONG:
        assert_envelope(answer, 414, "path_too_long")
    else:
        assert answer.status_code == 200, answer.text
        task = answer.json()["data"]
        assert (task["status"], task["error"]) == ("failed", "task not found or expired")
    assert shared_upstream.requests == []


@pytest.mark.parametrize("bad_id", BAD_IDS)
def test_the_image_of_a_task_id_that_is_not_a_uuid_is_404_without_an_upstream_call(
    funded, shared_upstream, bad_id
):
    answer = funded.http.get(f"/api/images/tasks/{bad_id}/image")
    assert answer.status_code == (414 if bad_id in TOO_LONG else 404)
    assert answer.json()["code"] == -1
    assert shared_upstream.requests == []


# -- the image proxy: where it fetches from, and what it passes on ---------------------------------


class TinyHost:
    """A plain HTTP server answering from a table: path → (status, headers, body)."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, dict[str, str], bytes]] = {}
        self.seen: list[tuple[str, dict[str, str]]] = []
        host = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                host.seen.append((self.path, dict(self.headers)))
                status, headers, body = host.routes.get(self.path, (404, {}, b"no"))
                self.send_response(status)
                for name, value in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.origin = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> TinyHost:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def shared_hosts(tmp_path_factory, shared_upstream):
    with TinyHost() as allowed, TinyHost() as stranger:
        settings = make_settings(
            tmp_path_factory.mktemp("hosts"),
            shared_upstream,
            image_hosts=[allowed.origin + "/"],
            image_fetch_deadline=1.0,  # a refused image fails its task quickly
        )
        with running_service(settings) as running:
            yield running, allowed, stranger


@pytest.fixture
def hosts(shared_hosts, shared_upstream, logs):
    """The service, an allowed image host (listed in SCENEMINT_IMAGE_HOSTS) and a stranger."""
    shared_upstream.reset()
    for host in shared_hosts[1:]:
        host.routes.clear()
        host.seen.clear()
    return shared_hosts


def image_of(running: RunningService, upstream: FakeUpstream, url: str) -> httpx.Response:
    """Generate a task, let the upstream complete it with `url`, wait until its image is
    ours (or the copy gave up), fetch its image."""
    fingerprint = f"fp-{uuid.uuid4().hex[:16]}"
    check_in(running, fingerprint)
    answer = running.http.post(GENERATE, json={"prompt": "a fox", "fingerprint": fingerprint})
    task_id = answer.json()["data"]["id"]
    upstream.set_task(task_id, status="success", data=[{"url": url}], error=None)
    task = wait_finished(running, task_id)
    image = running.http.get(f"/api/images/tasks/{task_id}/image")
    if task["status"] == "failed":  # the image was never ours: the credit came back
        assert balance(running, fingerprint) == 10
    return image


def refused(answer: httpx.Response) -> None:
    """The image was not copied: its task failed (refunded) and has no image."""
    assert_envelope(answer, 404, "image_not_ready")


def test_an_image_on_the_listed_host_is_served_without_the_key(hosts, shared_upstream):
    running, allowed, _ = hosts
    allowed.routes["/a.png"] = (200, {"Content-Type": "image/png"}, TINY_PNG)
    answer = image_of(running, shared_upstream, allowed.origin + "/a.png")
    assert answer.status_code == 200 and answer.content == TINY_PNG
    (_path, headers), *_ = allowed.seen
    assert "authorization" not in {name.lower() for name in headers}


@pytest.mark.parametrize(
    "make_url",
    [
        pytest.param(lambda up, stranger: stranger + "/a.png", id="other-origin"),
        pytest.param(
            lambda up, stranger: stranger.replace("127.0.0.1", "localhost") + "/a.png",
            id="other-name-for-the-stranger",
        ),
        pytest.param(
            lambda up, stranger: f"http://{up.base_url[7:]}@{stranger[7:]}/a.png",
            id="upstream-as-userinfo",
        ),
        pytest.param(
            lambda up, stranger: up.base_url.replace("http://", "https://") + "/files/a.png",
            id="other-scheme",
        ),
    ],
)
def test_an_image_on_an_origin_not_allowed_is_never_fetched(hosts, shared_upstream, make_url):
    running, _, stranger = hosts
    stranger.routes["/a.png"] = (200, {"Content-Type": "image/png"}, TINY_PNG)
    answer = image_of(running, shared_upstream, make_url(shared_upstream, stranger.origin))
    refused(answer)
    assert stranger.seen == []
    assert shared_upstream.recorded("/files/") == []


def test_a_redirect_to_another_origin_is_not_followed(hosts, shared_upstream):
    running, allowed, stranger = hosts
    stranger.routes["/inner.png"] = (200, {"Content-Type": "image/png"}, TINY_PNG)
    allowed.routes["/a.png"] = (302, {"Location": stranger.origin + "/inner.png"}, b"")
    answer = image_of(running, shared_upstream, allowed.origin + "/a.png")
    refused(answer)
    assert [path for path, _ in allowed.seen] == ["/a.png"]
    assert stranger.seen == []


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_within_the_allowed_origins_is_followed(hosts, shared_upstream, status):
    running, allowed, _ = hosts
    allowed.routes["/b.png"] = (200, {"Content-Type": "image/png"}, TINY_PNG)
    allowed.routes["/a.png"] = (status, {"Location": "/b.png"}, b"")
    answer = image_of(running, shared_upstream, allowed.origin + "/a.png")
    assert answer.status_code == 200 and answer.content == TINY_PNG
    assert [path for path, _ in allowed.seen] == ["/a.png", "/b.png"]


def test_no_redirect_is_followed_with_the_key(hosts, shared_upstream):
    """A redirect to the upstream's own origin is followed like any other: without the key
    (an upstream path reached by a redirect is not what the key was sent for)."""
    running, allowed, _ = hosts
    target = shared_upstream.add_file("b.png", TINY_PNG)
    allowed.routes["/a.png"] = (302, {"Location": target}, b"")
    answer = image_of(running, shared_upstream, allowed.origin + "/a.png")
    assert answer.status_code == 200 and answer.content == TINY_PNG
    assert shared_upstream.recorded("/files/b.png")[0].authorization is None
    assert "authorization" not in {name.lower() for name in allowed.seen[0][1]}


def test_a_redirect_to_an_upstream_admin_path_serves_nothing(hosts, shared_upstream):
    """Found by an outside read: a redirect to one of the upstream's admin paths was followed
    with the key, and its JSON served to an anonymous client."""
    running, allowed, _ = hosts
    target = shared_upstream.add_file("admin", b'{"accounts": ["secret"]}', content_type=None)
    allowed.routes["/a.png"] = (302, {"Location": target}, b"")
    answer = image_of(running, shared_upstream, allowed.origin + "/a.png")
    refused(answer)
    assert "secret" not in answer.text
    assert shared_upstream.recorded("/files/admin")[0].authorization is None


def test_a_redirect_loop_is_given_up(hosts, shared_upstream):
    running, allowed, _ = hosts
    allowed.routes["/a.png"] = (302, {"Location": "/a.png"}, b"")
    answer = image_of(running, shared_upstream, allowed.origin + "/a.png")
    refused(answer)
    # each copy attempt follows at most 3 redirects (4 requests); a few attempts at most
    assert len(allowed.seen) % 4 == 0 and 4 <= len(allowed.seen) <= 12


def test_only_safe_headers_of_an_image_host_are_passed_on(hosts, shared_upstream):
    running, allowed, _ = hosts
    allowed.routes["/a.png"] = (
        200,
        {
            "Content-Type": "image/png",
            "Set-Cookie": "session=stolen",
            "Content-Disposition": "attachment; filename=evil.html",
            "Access-Control-Allow-Origin": "*",
            "Location": "http://evil.example/",
            "X-Upstream-Secret": "internal",
            "Cache-Control": "no-store",
            "Refresh": "0; url=http://evil.example/",
        },
        TINY_PNG,
    )
    answer = image_of(running, shared_upstream, allowed.origin + "/a.png")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "image/png"
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.headers["cache-control"] == "public, max-age=31536000, immutable"
    for name in (
        "set-cookie",
        "content-disposition",
        "access-control-allow-origin",
        "location",
        "x-upstream-secret",
        "refresh",
    ):
        assert name not in answer.headers


@pytest.mark.parametrize(
    ("declared", "body", "status"),
    [
        ("image/png", TINY_PNG, 200),
        ("IMAGE/PNG; charset=binary", TINY_PNG, 200),
        ("image/jpeg", TINY_PNG, 200),  # the bytes decide the type we serve
        ("application/octet-stream", TINY_PNG, 502),
        ("image/svg+xml", b"<svg onload='alert(1)'/>", 502),
        ("image/png", b"<script>alert(1)</script>", 502),
        ("text/html", b"<script>alert(1)</script>", 502),
        ("application/json", b'{"admin": true}', 502),
        (None, TINY_PNG, 502),
    ],
)
def test_only_an_image_of_an_allowed_type_is_served(hosts, shared_upstream, declared, body, status):
    """Found by an outside read: a non-image answer was served as application/octet-stream."""
    running, allowed, _ = hosts
    headers = {"Content-Type": declared} if declared else {}
    allowed.routes["/a.png"] = (200, headers, body)
    answer = image_of(running, shared_upstream, allowed.origin + "/a.png")
    if status == 200:
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "image/png"
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.content == body
    else:
        refused(answer)


def test_the_image_size_cap_applies_to_every_host(tmp_path, upstream, logs):
    with TinyHost() as allowed:
        settings = make_settings(
            tmp_path,
            upstream,
            image_hosts=[allowed.origin],
            max_image_bytes=1000,
            image_fetch_deadline=1.0,
        )
        with running_service(settings) as running:
            check_in(running)
            big, fits = (TINY_PNG.ljust(size, b"\0") for size in (1001, 1000))
            allowed.routes["/big.png"] = (200, {"Content-Type": "image/png"}, big)
            allowed.routes["/fits.png"] = (200, {"Content-Type": "image/png"}, fits)
            too_big = image_of(running, upstream, allowed.origin + "/big.png")
            refused(too_big)
            fits = image_of(running, upstream, allowed.origin + "/fits.png")
            assert fits.status_code == 200 and len(fits.content) == 1000


def test_refused_image_origins_do_not_open_the_circuit_breaker(tmp_path, upstream, logs):
    """A task pointing at a forbidden host is our refusal, not an upstream failure."""
    settings = make_settings(
        tmp_path, upstream, breaker_min_calls=2, breaker_cooldown=60, image_fetch_deadline=1.0
    )
    with TinyHost() as stranger, running_service(settings) as running:
        check_in(running)
        ids = []
        for _ in range(3):
            answer = running.http.post(GENERATE, json={"prompt": "a", "fingerprint": FINGERPRINT})
            ids.append(answer.json()["data"]["id"])
            upstream.set_task(ids[-1], status="success", data=[{"url": stranger.origin + "/a"}])
            assert wait_finished(running, ids[-1])["status"] == "failed"
        for task_id in ids:  # three refusals in a row, nothing in between
            answer = running.http.get(f"/api/images/tasks/{task_id}/image")
            refused(answer)
        assert stranger.seen == []
        assert running.service.router.client("default").http.breakers["image"].is_open is False
