"""Client connections have deadlines: black-box tests against the real server on a loopback port.

Hostile clients (slowloris heads, idle sockets, bodies that stall or dribble) are closed
within about `SCENEMINT_HEADER_TIMEOUT` (the body gets that as grace, then must keep up
`SCENEMINT_BODY_MIN_RATE`); an idle keep-alive connection is closed after
`SCENEMINT_KEEP_ALIVE_TIMEOUT`; past `SCENEMINT_MAX_CONNECTIONS` a connection gets 503 and
is closed. Honest clients, slow ones included, are served as before. The timeouts are
small here (well under a second) so that the file runs in a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import select
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import uvicorn

from scenemint.messages import MESSAGES, message_for
from scenemint.web.server import (
    GuardedH11Protocol,
    GuardedHttpToolsProtocol,
    uvicorn_config,
)
from tests.conftest import FINGERPRINT, assert_envelope, make_settings
from tests.service_runner import RunningService, ServiceProcess, free_port, running_service

HEADER_TIMEOUT = 0.6  # also the body's grace
KEEP_ALIVE_TIMEOUT = 1.2  # longer than the header timeout, to tell the two apart
MIN_RATE = 1024  # bytes per second
SLACK = 1.5  # a loaded machine's scheduling delay on top of a deadline

PROTOCOLS = {"httptools": GuardedHttpToolsProtocol, "h11": GuardedH11Protocol}


def deadline_settings(tmp_path: Any, **overrides: object) -> Any:
    values: dict[str, object] = {
        "header_timeout": HEADER_TIMEOUT,
        "keep_alive_timeout": KEEP_ALIVE_TIMEOUT,
        "body_min_rate": MIN_RATE,
    }
    values.update(overrides)
    return make_settings(tmp_path, None, **values)


@pytest.fixture(scope="module")
def guarded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """The service without an upstream (the quota routes work) and small deadlines, on the
    httptools protocol (what `scenemint serve` runs) or, for tests marked `both_protocols`,
    on the h11 fallback too."""
    protocol = getattr(request, "param", "httptools")
    settings = deadline_settings(tmp_path_factory.mktemp(f"deadlines-{protocol}"))
    with running_service(settings, http=PROTOCOLS[protocol]) as running:
        yield running


both_protocols = pytest.mark.parametrize("guarded", sorted(PROTOCOLS), indirect=True)


# -- a raw client -----------------------------------------------------------------------


def connect(target: RunningService | int) -> socket.socket:
    port = target.port if isinstance(target, RunningService) else target
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_until_closed(sock: socket.socket, limit: float) -> tuple[float, bytes]:
    """Read until the server closes (end of file or reset): (seconds it took, bytes read)."""
    started = time.monotonic()
    data = b""
    sock.settimeout(limit)
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError as exc:
            raise AssertionError(f"still open after {limit} s; read {data!r}") from exc
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return time.monotonic() - started, data


def drip_until_closed(
    sock: socket.socket, chunks: Iterator[bytes], interval: float, limit: float
) -> tuple[float, bytes]:
    """Send `chunks` one per `interval` until the server closes: (seconds, bytes read)."""
    started = time.monotonic()
    data = b""
    for chunk in chunks:
        elapsed = time.monotonic() - started
        if elapsed > limit:
            raise AssertionError(f"still open after {limit} s; read {data!r}")
        try:
            sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            break
        readable, _, _ = select.select([sock], [], [], interval)
        if readable:
            more = time.monotonic() - started
            _, rest = read_until_closed(sock, max(0.1, limit - more))
            return time.monotonic() - started, data + rest
    return time.monotonic() - started, data + read_until_closed(sock, limit)[1]


def forever(unit: bytes) -> Iterator[bytes]:
    while True:
        yield unit


def status_and_body(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def assert_408(raw: bytes) -> None:
    status, headers, body = status_and_body(raw)
    assert status == 408, raw
    assert headers["connection"] == "close"
    assert headers["content-type"] == "application/json"
    envelope = json.loads(body)
    assert envelope["code"] == -1 and envelope["error"] == "request_timeout", envelope
    assert envelope["message"]


def status_request(body: bytes, *, content_length: int | None = None, extra: str = "") -> bytes:
    length = len(body) if content_length is None else content_length
    return (
        "POST /api/quota/status HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n{extra}\r\n"
    ).encode()


def padded_status_body(size: int) -> bytes:
    body = json.dumps({"fingerprint": FINGERPRINT}).encode()
    return body[:-1] + b" " * (size - len(body)) + b"}"


# bytes read past the end of a response (pipelined answers can share one read)
_LEFTOVER: weakref.WeakKeyDictionary[socket.socket, bytes] = weakref.WeakKeyDictionary()


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response with a Content-Length, leaving the connection open; what was read of
    the next response is kept for the next call."""
    data = _LEFTOVER.pop(sock, b"")
    sock.settimeout(10)
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a response: {data!r}"
        data += chunk
    status, headers, body = status_and_body(data)
    length = int(headers["content-length"])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, f"closed in a response body: {body!r}"
        body += chunk
    if len(body) > length:
        _LEFTOVER[sock] = body[length:]
    return status, headers, body[:length]


# -- honest clients -----------------------------------------------------------------------


@both_protocols
def test_normal_requests_still_work(guarded):
    assert guarded.http.get("/healthz").status_code == 200
    answer = guarded.http.post("/api/quota/status", json={"fingerprint": FINGERPRINT})
    assert answer.status_code == 200, answer.text
    assert answer.json()["data"]["balance"] == 0
    assert_envelope(guarded.http.post("/api/quota/status", json={}), 400, "invalid_fingerprint")


def test_a_kept_alive_connection_serves_request_after_request(guarded):
    with contextlib.closing(connect(guarded)) as sock:
        for _ in range(3):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
            assert read_response(sock)[0] == 200
            time.sleep(HEADER_TIMEOUT / 2)  # pauses between requests are the keep-alive's
        body = json.dumps({"fingerprint": FINGERPRINT}).encode()
        sock.sendall(status_request(body) + body)
        status, _, answer = read_response(sock)
        assert status == 200, answer


def test_pipelined_requests_are_answered_in_order(guarded):
    body = json.dumps({"fingerprint": FINGERPRINT}).encode()
    with contextlib.closing(connect(guarded)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n" + status_request(body) + body)
        assert read_response(sock)[0] == 200
        status, _, answer = read_response(sock)
        assert status == 200 and json.loads(answer)["data"]["balance"] == 0


@both_protocols
def test_a_slow_body_above_the_minimum_rate_is_accepted(guarded):
    # 4,000 bytes at about 2,000 bytes/s: twice the grace, at twice the minimum rate
    body = padded_status_body(4000)
    with contextlib.closing(connect(guarded)) as sock:
        sock.sendall(status_request(body))
        for start in range(0, len(body), 200):
            sock.sendall(body[start : start + 200])
            time.sleep(0.1)
        status, _, answer = read_response(sock)
    assert status == 200, answer
    assert json.loads(answer)["data"]["balance"] == 0


def test_a_head_that_arrives_in_pieces_within_the_timeout_is_served(guarded):
    head = b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n"
    with contextlib.closing(connect(guarded)) as sock:
        for start in range(0, len(head), 10):
            sock.sendall(head[start : start + 10])
            time.sleep(HEADER_TIMEOUT / 10)
        assert read_response(sock)[0] == 200


# -- hostile clients ----------------------------------------------------------------------


@both_protocols
def test_an_idle_connection_is_closed_after_the_header_timeout(guarded):
    with contextlib.closing(connect(guarded)) as sock:
        took, data = read_until_closed(sock, HEADER_TIMEOUT + SLACK)
    assert data == b""  # nothing was asked, nothing is answered
    assert took >= HEADER_TIMEOUT * 0.8


@both_protocols
def test_a_slowloris_head_is_answered_408_and_closed(guarded):
    with contextlib.closing(connect(guarded)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n")
        took, data = drip_until_closed(sock, forever(b"X"), 0.05, HEADER_TIMEOUT + SLACK)
    assert took >= HEADER_TIMEOUT * 0.8
    assert_408(data)


def test_a_slowloris_head_after_a_first_request_is_closed_too(guarded):
    with contextlib.closing(connect(guarded)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        assert read_response(sock)[0] == 200
        # each byte stops uvicorn's keep-alive timer; the header timer must catch it
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        took, data = drip_until_closed(sock, forever(b"X"), 0.05, HEADER_TIMEOUT + SLACK)
    assert took >= HEADER_TIMEOUT * 0.8
    assert_408(data)


def test_blank_lines_after_a_response_do_not_keep_a_connection_open(guarded):
    with contextlib.closing(connect(guarded)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        assert read_response(sock)[0] == 200
        _, data = drip_until_closed(sock, forever(b"\r\n"), 0.1, HEADER_TIMEOUT + SLACK)
    assert b"200" not in data


def test_an_idle_keep_alive_connection_is_closed_after_the_keep_alive_timeout(guarded):
    with contextlib.closing(connect(guarded)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        assert read_response(sock)[0] == 200
        took, data = read_until_closed(sock, KEEP_ALIVE_TIMEOUT + SLACK)
    assert data == b""
    assert took >= KEEP_ALIVE_TIMEOUT * 0.8  # the keep-alive timeout, not the header timeout


@both_protocols
def test_a_stalled_body_is_answered_408_and_closed_after_the_grace(guarded):
    with contextlib.closing(connect(guarded)) as sock:
        sock.sendall(status_request(b"", content_length=1000) + b'{"fingerpr')
        took, data = read_until_closed(sock, HEADER_TIMEOUT + SLACK)
    assert took >= HEADER_TIMEOUT * 0.8
    assert_408(data)
    assert guarded.http.get("/healthz").status_code == 200  # the app is unharmed


@both_protocols
def test_a_body_below_the_minimum_rate_is_closed_although_bytes_keep_coming(guarded):
    # 100 bytes every 0.2 s is 500 bytes/s: half the minimum rate, and never a stall
    with contextlib.closing(connect(guarded)) as sock:
        sock.sendall(status_request(b"", content_length=60_000))
        took, data = drip_until_closed(sock, forever(b" " * 100), 0.2, 4 * HEADER_TIMEOUT + SLACK)
    assert took >= HEADER_TIMEOUT  # the grace, plus what the bytes earned
    assert_408(data)


def test_a_408_is_in_the_language_the_request_asked_for(guarded):
    with contextlib.closing(connect(guarded)) as sock:
        request = status_request(b"", content_length=100, extra="Accept-Language: zh-CN\r\n")
        sock.sendall(request)
        _, data = read_until_closed(sock, HEADER_TIMEOUT + SLACK)
    assert_408(data)
    message = json.loads(status_and_body(data)[2])["message"]
    if "request_timeout" in MESSAGES:
        assert message == message_for("request_timeout", chinese=True)
    else:  # no message of its own yet: the connection layer's English one
        assert message == "The request did not arrive in time."


# -- `scenemint serve` ---------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_applies_the_deadlines_of_its_environment(tmp_path, workers):
    # one process gets them from its settings; each of several workers reads them itself
    env = {
        "SCENEMINT_DATA_DIR": str(tmp_path / "data"),
        "SCENEMINT_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
        "SCENEMINT_KEEP_ALIVE_TIMEOUT": str(KEEP_ALIVE_TIMEOUT),
        "SCENEMINT_RECONCILE_INTERVAL": "3600",
    }
    args = ("--workers", str(workers)) if workers > 1 else ()
    process = ServiceProcess(env, cwd=str(tmp_path), args=args).wait_ready()
    count = 3 * workers  # the kernel spreads connections over the workers: reach them all
    idle: list[socket.socket] = []
    stalled: list[socket.socket] = []
    kept: list[socket.socket] = []
    try:
        idle += [connect(process.port) for _ in range(count)]
        stalled += [connect(process.port) for _ in range(count)]
        kept += [connect(process.port) for _ in range(count)]
        for sock in stalled:
            sock.sendall(status_request(b"", content_length=1000) + b"{")
        for sock in kept:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
            assert read_response(sock)[0] == 200
        for sock in idle:  # (their timing is the business of the tests above)
            assert read_until_closed(sock, HEADER_TIMEOUT + SLACK)[1] == b""
        for sock in stalled:
            assert_408(read_until_closed(sock, HEADER_TIMEOUT + SLACK)[1])
        for sock in kept:
            assert read_until_closed(sock, KEEP_ALIVE_TIMEOUT + SLACK)[1] == b""
    finally:
        for sock in idle + stalled + kept:
            sock.close()
        process.stop()


# -- the connection cap -------------------------------------------------------------------


def test_past_max_connections_a_connection_gets_503_and_later_ones_are_served(tmp_path):
    settings = deadline_settings(
        tmp_path, max_connections=3, header_timeout=10.0, keep_alive_timeout=10.0
    )
    with running_service(settings) as running:
        held = [connect(running) for _ in range(3)]
        try:
            # a raw client that sends nothing gets the 503 at once, then the end of file
            with contextlib.closing(connect(running)) as extra:
                took, data = read_until_closed(extra, 5)
            assert took < 1.0
            status, headers, body = status_and_body(data)
            assert status == 503 and headers["connection"] == "close", data
            assert headers["retry-after"] == "1"
            envelope = json.loads(body)
            assert envelope["code"] == -1 and envelope["error"] == "too_many_connections"
            assert envelope["message"]

            # an ordinary client sending its request at once reads the 503, not a reset
            for _ in range(5):
                answer = httpx.get(running.url + "/healthz", timeout=5)
                assert_envelope(answer, 503, "too_many_connections")

            # the held connections still work
            held[0].sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
            assert read_response(held[0])[0] == 200

            # one closes: a new connection is served again
            held.pop().close()
            deadline = time.monotonic() + 5
            while True:
                answer = httpx.get(running.url + "/healthz", timeout=5)
                if answer.status_code == 200 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert answer.status_code == 200, answer.text
        finally:
            for sock in held:
                sock.close()


# -- we are the slow ones: the body's clock stops ---------------------------------------


@contextlib.contextmanager
def serve_asgi(app: Callable[..., Any], settings: Any, protocol: str) -> Iterator[int]:
    """A bare ASGI app on the service's server configuration, in a thread."""
    port = free_port()
    config = uvicorn_config(
        app, settings, host="127.0.0.1", port=port, lifespan="off", http=PROTOCOLS[protocol]
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


def late_reader(delay: float) -> Callable[..., Any]:
    """An app that reads the body only after `delay` seconds, then answers its size."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await asyncio.sleep(delay)
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            size += len(message["body"])
            more = message.get("more_body", False)
        body = str(size).encode()
        headers = [(b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


def test_a_body_the_app_does_not_read_yet_is_not_timed_out(tmp_path):
    # 1 MiB sent at once: uvicorn stops reading past 64 KiB until the app asks for it,
    # which it does only after four times the grace
    size = 1024 * 1024
    settings = deadline_settings(tmp_path)
    app = late_reader(4 * HEADER_TIMEOUT)
    with serve_asgi(app, settings, "httptools") as port, contextlib.closing(connect(port)) as sock:
        head = f"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: {size}\r\n\r\n"
        sender = threading.Thread(target=sock.sendall, args=(head.encode() + b"x" * size,))
        sender.start()
        status, _, body = read_response(sock)
        sender.join(10)
    assert status == 200 and int(body) == size


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_a_client_waiting_for_100_continue_is_not_timed_out(tmp_path, protocol):
    settings = deadline_settings(tmp_path)
    app = late_reader(3 * HEADER_TIMEOUT)
    with serve_asgi(app, settings, protocol) as port, contextlib.closing(connect(port)) as sock:
        sock.sendall(
            b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        sock.settimeout(10)
        interim = sock.recv(1024)
        assert interim.startswith(b"HTTP/1.1 100"), interim
        sock.sendall(b"hello")
        status, _, body = read_response(sock)
    assert status == 200 and body == b"5"


# -- the size of a request head -------------------------------------------------------------


def assert_refused(raw: bytes, status: int, code: str) -> None:
    got, headers, body = status_and_body(raw)
    assert got == status, raw[:300]
    assert headers["connection"] == "close"
    assert headers["cache-control"] == "no-store"
    envelope = json.loads(body)
    assert envelope["code"] == -1 and envelope["error"] == code, envelope


def refused_after(sock: socket.socket, head: bytes) -> bytes:
    """Send `head` (which never ends), stop, and read the answer until the server closes."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(head)
    return read_until_closed(sock, 5)[1]


@both_protocols
def test_a_head_of_many_header_lines_is_answered_431_past_64_kib(guarded):
    """The header deadline limits time, not bytes: a head past 64 KiB is refused at once,
    long before the deadline (what endless lines do to memory: bench/hostile_clients.py)."""
    line = b"X-Filler: " + b"a" * 8000 + b"\r\n"
    with contextlib.closing(connect(guarded)) as sock:
        started = time.monotonic()
        answer = refused_after(sock, b"GET /healthz HTTP/1.1\r\nHost: test\r\n" + line * 16)
        assert time.monotonic() - started < HEADER_TIMEOUT
    assert_refused(answer, 431, "headers_too_large")


@both_protocols
def test_one_endless_header_line_is_answered_431(guarded):
    """A line never ends, so it is never parsed: its raw bytes count (at most twice the
    limit, which also allows for requests pipelined in the same read)."""
    with contextlib.closing(connect(guarded)) as sock:
        answer = refused_after(
            sock, b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Endless: " + b"b" * 200 * 1024
        )
    assert_refused(answer, 431, "headers_too_large")


@both_protocols
def test_a_url_past_8_kib_is_answered_414(guarded):
    with contextlib.closing(connect(guarded)) as sock:
        answer = refused_after(sock, b"GET /" + b"a" * 70_000)
    assert_refused(answer, 414, "path_too_long")


@both_protocols
def test_a_large_head_under_the_limit_is_served(guarded):
    cookies = "".join(f"Cookie: c{i}={'v' * 4000}\r\n" for i in range(14))  # ~56 KiB
    with contextlib.closing(connect(guarded)) as sock:
        sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: test\r\n{cookies}\r\n".encode())
        assert read_response(sock)[0] == 200


def test_refused_heads_are_counted(guarded):
    with contextlib.closing(connect(guarded)) as sock:
        refused_after(sock, b"GET /healthz HTTP/1.1\r\n" + (b"X-A: " + b"a" * 9000 + b"\r\n") * 9)
    metrics = guarded.http.get("/metrics").text
    assert 'scenemint_connections_closed_total{reason="head_too_large"}' in metrics


# -- writing: a client that does not read -------------------------------------------------------

SEND_TIMEOUT = 1.0
SEND_MIN_RATE = 256 * 1024  # bytes per second


def random_png(width: int, height: int) -> bytes:
    """A valid PNG of random (incompressible) pixels, quickly."""
    import os
    import struct
    import zlib

    def chunk(tag: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(tag + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", crc)

    row = width * 3
    raw = b"".join(b"\x00" + os.urandom(row) for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 0))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def big_image(tmp_path_factory: pytest.TempPathFactory):
    """A service with a 24 MiB stored image and a short send deadline (both protocols)."""
    from tests.fake_upstream import FakeUpstream

    picture = random_png(2900, 2900)
    with FakeUpstream() as upstream:
        served = {}
        for protocol in sorted(PROTOCOLS):
            settings = make_settings(
                tmp_path_factory.mktemp(f"send-{protocol}"),
                upstream,
                send_timeout=SEND_TIMEOUT,
                send_min_rate=SEND_MIN_RATE,
            )
            served[protocol] = settings
        with contextlib.ExitStack() as stack:
            result = {}
            for protocol, settings in served.items():
                running = stack.enter_context(running_service(settings, http=PROTOCOLS[protocol]))
                running.http.post("/api/quota/check-in", json={"fingerprint": FINGERPRINT})
                task = running.http.post(
                    "/api/images/generate",
                    json={"prompt": "big", "size": "1:1", "fingerprint": FINGERPRINT},
                ).json()["data"]
                upstream.complete_task(task["id"], image=picture)
                deadline = time.monotonic() + 30
                while running.http.get(f"/api/images/tasks/{task['id']}").json()["data"][
                    "status"
                ] not in ("completed", "failed"):
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
                result[protocol] = (running, f"/api/images/tasks/{task['id']}/image")
            yield result, len(picture)


def small_buffer_connection(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


def read_paced(sock: socket.socket, *, rate: float | None, limit: float) -> tuple[int, bool]:
    """Read at about `rate` bytes a second (None: as fast as it comes) until the server ends
    the connection or `limit` passes: (bytes read, whether the server ended it)."""
    received = 0
    started = time.monotonic()
    sock.settimeout(limit)
    while time.monotonic() - started < limit:
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:
            return received, True
        if not chunk:
            return received, True
        received += len(chunk)
        if rate is not None:
            behind = received / rate - (time.monotonic() - started)
            if behind > 0:
                time.sleep(behind)
    return received, False


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_a_client_that_stops_reading_an_image_is_cut_off(big_image, protocol):
    served, size = big_image
    running, path = served[protocol]
    with contextlib.closing(small_buffer_connection(running.port)) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        time.sleep(SEND_TIMEOUT + 2.0)  # not reading: the server's buffer stays full
        received, ended = read_paced(sock, rate=None, limit=10)
    assert ended and received < size, (received, size)
    metrics = running.http.get("/metrics").text
    assert 'scenemint_connections_closed_total{reason="send_timeout"}' in metrics


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_a_client_reading_slower_than_the_minimum_rate_is_cut_off(big_image, protocol):
    """Progress, not any byte: a client taking a trickle (an eighth of the rate) is cut."""
    served, size = big_image
    running, path = served[protocol]
    with contextlib.closing(small_buffer_connection(running.port)) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        started = time.monotonic()
        received, ended = read_paced(sock, rate=SEND_MIN_RATE / 8, limit=30)
    assert ended and received < size, (received, size)
    assert time.monotonic() - started < 20


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_a_client_reading_faster_than_the_minimum_rate_gets_the_whole_image(big_image, protocol):
    served, size = big_image
    running, path = served[protocol]
    answer = running.http.get(path)
    assert answer.status_code == 200 and len(answer.content) == size
