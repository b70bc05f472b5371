"""GET /api/images/tasks/{id}/events: a task's answers pushed as server-sent events, against
the real service and the fake upstream."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
import uuid
from typing import Any

import httpx
import pytest

from scenemint.settlement import Decision, ErrorCode, Guard, State
from scenemint.store import SQLStore
from tests.conftest import FINGERPRINT, check_in, make_settings
from tests.fake_upstream import make_png
from tests.service_runner import RunningService, running_service

LISTING = "/api/image-tasks"


def generate(running: RunningService, fingerprint: str = FINGERPRINT) -> dict[str, Any]:
    answer = running.http.post(
        "/api/images/generate",
        json={"prompt": "a red fox", "size": "1:1", "fingerprint": fingerprint},
    )
    assert answer.status_code == 200, answer.text
    return answer.json()["data"]


class Stream:
    """An event stream read in a thread: `events` (the data of each, parsed), `pings`,
    `ended` once the server ended it; `times` of each event."""

    def __init__(self, url: str, *, headers: dict[str, str] | None = None) -> None:
        self.events: list[dict[str, Any]] = []
        self.ids: list[str] = []
        self.times: list[float] = []
        self.pings = 0
        self.ended = threading.Event()
        self.error: httpx.HTTPError | None = None  # the stream was cut, not ended
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self._url = url
        self._extra = headers or {}
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            self._follow()
        except httpx.HTTPError as exc:
            self.error = exc
        self.ended.set()

    def _follow(self) -> None:
        with (
            httpx.Client(timeout=httpx.Timeout(30)) as client,
            client.stream("GET", self._url, headers=self._extra) as response,
        ):
            self.status = response.status_code
            self.headers = dict(response.headers)
            for line in response.iter_lines():
                if line.startswith("data:"):
                    self.events.append(json.loads(line[5:]))
                    self.times.append(time.monotonic())
                elif line.startswith("id:"):
                    self.ids.append(line[3:].strip())
                elif line.startswith(": ping"):
                    self.pings += 1

    def ends(self, timeout: float) -> bool:
        """The server ended the stream (a clean end, not a cut) within `timeout`."""
        return self.ended.wait(timeout) and self.error is None

    def wait_for(self, count: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.events) < count:
            assert time.monotonic() < deadline, f"{len(self.events)} events: {self.events}"
            time.sleep(0.01)


def events_url(running: RunningService, task_id: str) -> str:
    return f"{running.url}/api/images/tasks/{task_id}/events"


def test_the_current_answer_comes_at_once_then_each_change_then_the_end(service, upstream):
    check_in(service)
    task = generate(service)
    stream = Stream(events_url(service, task["id"]))
    stream.wait_for(1)
    assert stream.status == 200
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert stream.headers["cache-control"] == "no-store"
    assert stream.events[0]["id"] == task["id"] and stream.events[0]["status"] == "queued"
    upstream.set_task(task["id"], status="running")
    stream.wait_for(2)
    assert stream.events[1]["status"] == "running"
    upstream.complete_task(task["id"], image=make_png(6, 4))
    assert stream.ends(10), stream.events
    assert [e["status"] for e in stream.events][-1] == "completed"
    poll = service.http.get(f"/api/images/tasks/{task['id']}").json()["data"]
    assert stream.events[-1] == poll  # the last event is what a poll then answers
    assert len(set(stream.ids)) == len(stream.ids)  # each event its own id (the version)
    # one event per change a client can see: a new version that answers the same (the
    # copier's lease on the row, say) is no event
    assert all(a != b for a, b in itertools.pairwise(stream.events)), stream.events


def test_the_first_event_does_not_wait_for_a_slow_upstream(service, upstream):
    """What the service knows is sent at once; the upstream's answer follows when it comes."""
    check_in(service)
    task = generate(service)
    upstream.set_task(task["id"], status="running")
    upstream.delay(LISTING, 4)
    started = time.monotonic()
    stream = Stream(events_url(service, task["id"]))
    stream.wait_for(1, timeout=3)
    assert stream.times[0] - started < 1.5
    assert stream.events[0]["status"] == "queued"  # the ledger's, not yet the upstream's
    stream.wait_for(2, timeout=10)
    assert stream.events[1]["status"] == "running"


def test_a_shutdown_while_the_upstream_stalls_still_sends_the_current_answer(
    tmp_path, upstream, logs
):
    task: dict[str, Any] = {}
    with running_service(make_settings(tmp_path, upstream)) as running:
        check_in(running)
        task.update(generate(running))
        upstream.delay(LISTING, 30)
        stream = Stream(events_url(running, task["id"]))
        stream.wait_for(1, timeout=3)
        running.service.shutting_down.set()
        assert stream.ends(5)
    assert [e["status"] for e in stream.events] == ["queued", "queued"]


def test_a_finished_task_sends_its_answer_and_ends(service, upstream):
    check_in(service)
    task = generate(service)
    upstream.fail_task(task["id"], "no")
    service.http.get(f"/api/images/tasks/{task['id']}")
    stream = Stream(events_url(service, task["id"]))
    assert stream.ends(5)
    assert [e["status"] for e in stream.events] == ["failed"]


@pytest.mark.parametrize("task_id", [str(uuid.uuid4()), "not-a-task"])
def test_an_unknown_id_ends_at_once_with_the_missing_shape(service, upstream, task_id):
    stream = Stream(events_url(service, task_id))
    assert stream.ends(5)
    poll = service.http.get(f"/api/images/tasks/{task_id}").json()["data"]
    assert stream.events == [poll] and poll["status"] == "failed"
    assert upstream.recorded(LISTING) == []


def test_many_watchers_cost_the_upstream_what_one_poller_does(tmp_path, upstream, logs):
    """Fifty watchers of one task for three seconds: the upstream is asked about once a
    second, as one poller would ask it, not fifty times."""
    with running_service(make_settings(tmp_path, upstream, poll_min_interval=0.5)) as running:
        check_in(running)
        task = generate(running)
        before = len(upstream.recorded(LISTING))
        streams = [Stream(events_url(running, task["id"])) for _ in range(50)]
        for stream in streams:
            stream.wait_for(1)
        time.sleep(3)
        asked = len(upstream.recorded(LISTING)) - before
        assert asked <= 6, asked
        upstream.complete_task(task["id"])
        for stream in streams:
            assert stream.ends(10)
            assert stream.events[-1]["status"] == "completed"


def test_watchers_of_many_tasks_share_the_upstream_listings(tmp_path, upstream, logs):
    """Twenty tasks watched from different moments are looked at together, once a second:
    the upstream gets a listing a second for all of them, not one per task."""
    with running_service(make_settings(tmp_path, upstream)) as running:
        ids = []
        for owner in ("fingerprint-a", "fingerprint-b"):
            check_in(running, owner)
            ids += [generate(running, owner)["id"] for _ in range(10)]
        streams = []
        for task_id in ids:
            streams.append(Stream(events_url(running, task_id)))
            time.sleep(0.05)  # each watch begins at its own moment
        for stream in streams:
            stream.wait_for(1)
        before = len(upstream.recorded(LISTING))
        time.sleep(3)
        asked = len(upstream.recorded(LISTING)) - before
        assert asked <= 8, asked  # one a second (and a straggler); one a task would be ~60
        running.service.shutting_down.set()


def test_a_silent_task_gets_pings(tmp_path, upstream, logs):
    with running_service(make_settings(tmp_path, upstream, stream_ping_interval=0.2)) as running:
        check_in(running)
        stream = Stream(events_url(running, generate(running)["id"]))
        time.sleep(1.0)
        assert stream.pings >= 3 and len(stream.events) == 1


def test_a_shutdown_ends_the_stream_with_a_last_event(tmp_path, upstream, logs):
    with running_service(make_settings(tmp_path, upstream)) as running:
        check_in(running)
        stream = Stream(events_url(running, generate(running)["id"]))
        stream.wait_for(1)
        running.service.shutting_down.set()
        assert stream.ends(5)
        assert len(stream.events) == 2 and stream.events[1] == stream.events[0]


def test_a_change_made_by_another_process_reaches_a_watcher_within_a_second(
    tmp_path, upstream, logs, database_url
):
    """A refund written by another instance (here: another store connection, as another
    process writes) reaches this instance's watchers: by NOTIFY on PostgreSQL, by reading
    the watched rows' versions on SQLite."""
    settings = make_settings(tmp_path, upstream, database_url=database_url)
    with running_service(settings) as running:
        check_in(running)
        task = generate(running)
        stream = Stream(events_url(running, task["id"]))
        stream.wait_for(1)

        async def refund_elsewhere() -> float:
            other = await SQLStore.open(database_url)
            try:
                row = await other.get_task(task["id"])
                assert row is not None
                decision = Decision(State.FAILED, Guard.FREE, error_code=ErrorCode.TIMED_OUT)
                assert await other.apply(row, decision) is not None
                return time.monotonic()
            finally:
                await other.close()

        changed_at = asyncio.run(refund_elsewhere())
        assert stream.ends(5)
        assert stream.events[-1]["status"] == "failed"
        assert stream.times[-1] - changed_at < 1.0, stream.times[-1] - changed_at


def test_the_python_client_waits_on_events(service, upstream):
    """`wait()` follows the events (no polls of the task while it waits)."""
    from scenemint.client import Client

    check_in(service)
    task = generate(service)
    seen: list[str] = []
    with Client(service.url, fingerprint=FINGERPRINT) as client:
        waiting = threading.Thread(
            target=lambda: seen.append(client.wait(task["id"], poll_interval=0.05).status)
        )
        waiting.start()
        time.sleep(0.3)
        upstream.complete_task(task["id"])
        waiting.join(10)
    assert seen == ["completed"]

    def requests() -> list[str]:
        rendered = service.service.metrics.render().decode().splitlines()
        return [line for line in rendered if line.startswith("scenemint_http_requests_total{")]

    def followed() -> list[str]:
        return [line for line in requests() if 'route="/api/images/tasks/{id}/events"' in line]

    # a stream is counted when the server has ended it, which may be just after the client
    # has its last event
    deadline = time.monotonic() + 5
    while not followed() and time.monotonic() < deadline:
        time.sleep(0.02)
    polls = [line for line in requests() if 'route="/api/images/tasks/{id}"' in line]
    assert polls == [] and len(followed()) == 1 and followed()[0].endswith(" 1.0"), requests()


# the answers of the "flaky" front's polls 2 to 6 (None: the connection closed, no answer)
FLAKY: list[tuple[int, str] | None] = [
    (502, "upstream_failed"),
    None,
    (504, "upstream_timeout"),
    (503, "store_unavailable"),
    None,
]


class Front:
    """A server in front of the service that passes polls on and answers the events route
    as something between the client and an older server can: `"old"` a 404 (a server from
    before task events), `"garbage"` a stream of events that are not tasks (a proxy that
    rewrites), `"held"` a stream's head and then nothing (a proxy that buffers it)."""

    def __init__(self, target: str, mode: str) -> None:
        from aiohttp import web

        self.target = target
        self.mode = mode
        self.polls = 0
        app = web.Application()
        app.router.add_get("/api/images/tasks/{id}", self._poll)
        app.router.add_get("/api/images/tasks/{id}/events", self._events)
        app.router.add_get("/api/images/tasks/{id}/image", self._image)
        self._loop = asyncio.new_event_loop()
        self._closing = asyncio.Event()
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._closing.set)
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    async def _poll(self, request: Any) -> Any:
        from aiohttp import web

        self.polls += 1
        if self.mode == "slow":  # a poll that hangs (an upstream that does not answer)
            await self._closing.wait()
        if self.mode == "down-first" and self.polls <= 3:  # the upstream down at first
            body = {"code": -1, "message": "upstream down", "error": "upstream_failed"}
            return web.json_response(body, status=502)
        if self.mode == "flaky" and 2 <= self.polls <= 6:  # a restart, an upstream outage
            failure = FLAKY[self.polls - 2]
            if failure is None:  # the server went away mid-answer
                request.transport.close()
                return web.Response()
            status, code = failure
            body = {"code": -1, "message": "not now", "error": code}
            return web.json_response(body, status=status)
        async with httpx.AsyncClient() as client:
            answer = await client.get(f"{self.target}/api/images/tasks/{request.match_info['id']}")
        return web.Response(body=answer.content, content_type="application/json")

    async def _image(self, request: Any) -> Any:
        from aiohttp import web

        async with httpx.AsyncClient() as client:
            path = f"/api/images/tasks/{request.match_info['id']}/image"
            answer = await client.get(self.target + path)
        return web.Response(
            body=answer.content,
            status=answer.status_code,
            content_type=answer.headers["content-type"].split(";")[0],
        )

    async def _events(self, request: Any) -> Any:
        from aiohttp import web

        if self.mode in ("old", "flaky", "slow", "down-first"):
            body = {"code": -1, "message": "Not found.", "error": "not_found"}
            return web.json_response(body, status=404)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if self.mode == "garbage":
            await response.write(b"data: <html>hello</html>\n\n")
        await self._closing.wait()
        return response


@pytest.mark.parametrize("mode", ["old", "garbage", "held"])
def test_the_python_client_polls_when_the_events_do_not_come_through(
    service, upstream, mode, monkeypatch
):
    from scenemint.client import Client

    monkeypatch.setattr("scenemint.client._base.EVENTS_SILENCE", 0.5)
    check_in(service)
    task = generate(service)
    front = Front(service.url, mode)
    try:
        upstream.complete_task(task["id"])
        with Client(front.url, fingerprint=FINGERPRINT) as client:
            started = time.monotonic()
            final = client.wait(task["id"], poll_interval=0.05, timeout=10)
        assert final.status == "completed" and front.polls >= 1
        assert time.monotonic() - started < 5
    finally:
        front.close()


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_the_python_client_wait_polls_through_a_restart_and_an_upstream_outage(
    service, upstream, kind
):
    """Once the server has answered about the task, a wait rides out its going away and
    its failing to reach the upstream (502, 503, 504) until the task finishes."""
    from scenemint.client import AsyncClient, Client

    check_in(service)
    task = generate(service)
    front = Front(service.url, "flaky")
    try:
        seen: list[str] = []
        threading.Timer(0.5, lambda: upstream.complete_task(task["id"])).start()
        if kind == "sync":
            with Client(front.url, fingerprint=FINGERPRINT) as client:
                final = client.wait(task["id"], poll_interval=0.1, timeout=20)
        else:

            async def wait() -> Any:
                async with AsyncClient(front.url, fingerprint=FINGERPRINT) as client:
                    return await client.wait(task["id"], poll_interval=0.1, timeout=20)

            final = asyncio.run(wait())
        seen.append(final.status)
        assert seen == ["completed"] and front.polls >= 7
    finally:
        front.close()


def test_the_python_client_wait_keeps_its_deadline_when_a_poll_hangs(service, upstream):
    from scenemint.client import Client, WaitTimeout

    check_in(service)
    task = generate(service)
    front = Front(service.url, "slow")
    try:
        with Client(front.url, fingerprint=FINGERPRINT) as client:
            started = time.monotonic()
            with pytest.raises(WaitTimeout):
                client.wait(task["id"], poll_interval=0.1, timeout=1.5)
            assert time.monotonic() - started < 3
    finally:
        front.close()


def test_the_python_client_wait_says_at_once_that_no_server_is_there():
    from scenemint.client import Client, ConnectionFailed
    from tests.service_runner import free_port

    with Client(f"http://127.0.0.1:{free_port()}", fingerprint=FINGERPRINT) as client:
        started = time.monotonic()
        with pytest.raises(ConnectionFailed):
            client.wait(str(uuid.uuid4()), timeout=30)
        assert time.monotonic() - started < 5


def test_the_python_client_wait_keeps_its_deadline_between_two_pings(
    tmp_path, upstream, logs, monkeypatch
):
    """A wait whose deadline falls between two pings ends at the deadline, not at the next
    ping: the stream is opened again with a read bound of what is left."""
    from scenemint.client import Client, WaitTimeout

    monkeypatch.setattr("scenemint.client._base.EVENTS_SILENCE", 3.0)
    with running_service(make_settings(tmp_path, upstream, stream_ping_interval=2.5)) as running:
        check_in(running)
        task = generate(running)
        with Client(running.url, fingerprint=FINGERPRINT) as client:
            started = time.monotonic()
            with pytest.raises(WaitTimeout):
                client.wait(task["id"], poll_interval=0.05, timeout=4.0)
            waited = time.monotonic() - started
        assert 3.9 < waited < 4.6, waited  # the next ping would come at 5 s


def test_the_async_client_waits_on_events(service, upstream):
    from scenemint.client import AsyncClient

    check_in(service)
    task = generate(service)

    async def wait() -> str:
        async with AsyncClient(service.url, fingerprint=FINGERPRINT) as client:
            waiting = asyncio.ensure_future(client.wait(task["id"], poll_interval=5))
            await asyncio.sleep(0.3)
            upstream.complete_task(task["id"])
            return (await asyncio.wait_for(waiting, 10)).status

    started = time.monotonic()
    assert asyncio.run(wait()) == "completed"
    assert time.monotonic() - started < 4  # pushed, not the 5 s poll
