"""scenemint.client against the real app and the fake upstream: every method, sync and async.

The `client` fixture runs each test twice: with `Client`, and with `AsyncClient` driven
from the test through one private event loop (`Blocking`), so both implementations go
through the same checks. The last tests use `AsyncClient` the asyncio way.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import io
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import scenemint.client as client_module
from scenemint.client import (
    AsyncClient,
    Client,
    ClientError,
    ConnectionFailed,
    InvalidInputError,
    NoCreditsError,
    NotFoundError,
    Quota,
    ServerError,
    Task,
    WaitTimeout,
    stored_fingerprint,
)
from tests.conftest import FINGERPRINT, balance, check_in, wait_finished
from tests.cutting_proxy import CuttingProxy
from tests.fake_upstream import TINY_PNG, make_png
from tests.service_runner import free_port


class Blocking:
    """An AsyncClient used from sync test code: every call runs on one private event loop."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client
        self._runner = asyncio.Runner()

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if inspect.isasyncgenfunction(attribute):
            return lambda *args, **kwargs: self._iterate(attribute(*args, **kwargs))
        if inspect.iscoroutinefunction(attribute):
            return lambda *args, **kwargs: self._runner.run(attribute(*args, **kwargs))
        return attribute

    def _iterate(self, stream: AsyncIterator[str]) -> Iterator[str]:
        async def step() -> str:
            return await anext(stream)

        try:
            while True:
                try:
                    yield self._runner.run(step())
                except StopAsyncIteration:
                    return
        finally:
            self._runner.run(stream.aclose())  # type: ignore[attr-defined]

    def close(self) -> None:
        self._runner.run(self._client.aclose())
        self._runner.close()


@pytest.fixture(autouse=True)
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The client's config directory: a temporary one, never the real home."""
    path = tmp_path / "config"
    monkeypatch.setenv("SCENEMINT_CONFIG_DIR", str(path))
    return path


@pytest.fixture(params=["sync", "async"])
def make_client(request: pytest.FixtureRequest, service: Any) -> Iterator[Callable[..., Any]]:
    """Builds clients of the kind under test (bound to the running service by default)."""
    made: list[Any] = []

    def make(server: str | None = None, **options: Any) -> Any:
        url = server or service.url
        if request.param == "sync":
            built: Any = Client(url, **options)
        else:
            built = Blocking(AsyncClient(url, **options))
        made.append(built)
        return built

    yield make
    for built in made:
        built.close()


@pytest.fixture
def client(make_client: Callable[..., Any]) -> Any:
    return make_client(fingerprint=FINGERPRINT)


# --------------------------------------------------------------------------- quota


def test_quota_and_check_in_report_the_credits(client):
    assert client.quota() == Quota(balance=0, signed_today=False, cap=100, daily_grant=10)
    assert client.check_in() == Quota(balance=10, signed_today=True, cap=100, daily_grant=10)
    assert client.check_in().balance == 10  # once a day
    assert client.quota() == Quota(balance=10, signed_today=True, cap=100, daily_grant=10)


# --------------------------------------------------------------------------- generate, task


def test_generate_charges_one_credit_and_returns_the_task(client, service, upstream):
    check_in(service)
    task = client.generate(" a lighthouse ", size="16:9")
    assert isinstance(task, Task)
    assert task.status == "queued"
    assert (task.mode, task.size, task.prompt) == ("text", "16:9", "a lighthouse")
    assert task.remaining_credits == 9
    assert task.created_at is not None and task.created_at.tzinfo is not None
    assert not task.finished
    [sent] = upstream.recorded("/api/image-tasks/generations")
    assert sent.json["client_task_id"] == task.id
    assert sent.json["prompt"] == "a lighthouse"
    assert balance(service) == 9


def test_generate_sends_an_idempotency_key_of_its_own(client, service, upstream):
    check_in(service)
    first, second = client.generate("one"), client.generate("two")
    keys = [
        service.run(service.service.store.get_task(t.id)).idempotency_key for t in (first, second)
    ]
    assert all(key and key.startswith("scenemint-client-") for key in keys)
    assert keys[0] != keys[1]
    assert (
        client.generate("three", idempotency_key="mine-1").id
        == client.generate("three", idempotency_key="mine-1").id
    )
    assert balance(service) == 7


def test_an_answer_lost_to_a_timeout_is_asked_again_with_the_same_key(
    make_client, service, upstream
):
    """The client gives up waiting, the server goes on: asking again with the key gets the
    same task, and the credit is taken once (issue 9, defect 6)."""
    check_in(service)
    upstream.delay("/api/image-tasks/generations", 1.2, times=1)
    client = make_client(fingerprint=FINGERPRINT, generate_timeout=0.4)
    task = client.generate("a slow one")
    assert task.remaining_credits == 9
    assert {
        r.json["client_task_id"] for r in upstream.recorded("/api/image-tasks/generations")
    } == {task.id}
    assert balance(service) == 9


def test_a_connection_dropped_mid_generate_is_retried_until_the_task_is_taken_over(
    make_client, service, upstream
):
    """The network drops the connection while the server still submits: the server cannot
    answer (the task is not the client's yet), the client library comes back with its key,
    is told `idempotency_in_progress` while the first request finishes, and then takes the
    task over — one task, one credit, never refunded under it (issue 18: the row was
    refunded within ~50 ms, before any retry could arrive)."""
    check_in(service)
    hold = upstream.hold("/api/image-tasks/generations")
    with CuttingProxy(service.port) as proxy:
        client = make_client(proxy.url, fingerprint=FINGERPRINT)
        result: list[Any] = []
        worker = threading.Thread(target=lambda: result.append(client.generate("a dropped one")))
        worker.start()
        assert hold.wait(5)
        proxy.cut()  # the client's connection is gone; the server is still submitting
        time.sleep(1.2)  # the client is back (409 in progress) while the upstream is slow;
        # it is released between two of its retries (they come every second)
        hold.release()
        worker.join(30)
    assert result, "generate did not return"
    (task,) = result
    assert task.status != "failed" and task.remaining_credits == 9
    row = service.run(service.service.store.get_task(task.id))
    assert row.handed and not row.refunded
    assert proxy.accepted >= 2  # it did come back on a new connection
    assert {
        r.json["client_task_id"] for r in upstream.recorded("/api/image-tasks/generations")
    } == {task.id}
    service.run(service.app.state.reconciler.run_once())
    assert balance(service) == 9


def test_the_client_waits_longer_for_a_generate_than_the_server_may_take():
    from scenemint.config import Settings

    client = Client("http://127.0.0.1:1")
    try:
        assert client.generate_timeout > Settings(_env_file=None).submit_timeout + 10
    finally:
        client.close()


@pytest.mark.parametrize("kind", ["path", "bytes", "file"])
def test_generate_with_a_reference_submits_an_edit(client, service, upstream, tmp_path, kind):
    """The reference image can be a path, the bytes, or a binary file object."""
    check_in(service)
    picture = make_png(3, 2)
    path = tmp_path / "ref.png"
    path.write_bytes(picture)
    reference: Any = {"path": path, "bytes": picture, "file": io.BytesIO(picture)}[kind]
    task = client.generate("make it blue", reference=reference)
    assert task.mode == "image"
    [sent] = upstream.recorded("/api/image-tasks/edits")
    assert sent.form["client_task_id"] == task.id
    assert sent.files["image"].data == picture
    assert sent.files["image"].content_type == "image/png"


def test_bad_input_is_refused_before_anything_is_sent(client, service, upstream):
    """An unknown size or an unreadable reference never reaches the server: no credit spent."""
    check_in(service)
    with pytest.raises(InvalidInputError) as caught:
        client.generate("x", size="4:3")
    assert (caught.value.code, caught.value.status) == ("invalid_size", None)
    assert "16:9" in caught.value.message
    with pytest.raises(InvalidInputError) as caught:
        client.generate("x", reference="/no/such/reference.png")
    assert (caught.value.code, caught.value.status) == ("reference_unreadable", None)
    assert "/no/such/reference.png" in caught.value.message
    assert upstream.recorded("/api/image-tasks") == []
    assert balance(service) == 10


def test_task_reports_the_current_state(client, service, upstream):
    check_in(service)
    task = client.generate("a lighthouse")
    assert client.task(task.id).status == "queued"
    upstream.set_task(task.id, status="running")
    assert client.task(task.id).status == "running"
    upstream.complete_task(task.id, revised_prompt="a tall lighthouse")
    done = wait_finished(service, task.id) and client.task(task.id)
    assert done.status == "completed"
    assert done.image == f"/api/images/tasks/{task.id}/image"
    assert done.revised_prompt == "a tall lighthouse"
    assert done.prompt is None and done.remaining_credits is None  # generate answer only


def test_task_of_an_unknown_id_is_failed_not_raised(client):
    for unknown in ("no-such-task", "1b4e28ba-2fa1-41d2-883f-0016d3cca427"):
        task = client.task(unknown)
        assert (task.id, task.status) == (unknown, "failed")
        assert task.error == "task not found or expired"


# --------------------------------------------------------------------------- wait


def test_wait_sees_queued_running_and_completed(client, service, upstream):
    """Each status change reaches on_update once; the fake moves on when told of one."""
    check_in(service)
    task = client.generate("a lighthouse")
    seen: list[str] = []

    def on_update(current: Task) -> None:
        seen.append(current.status)
        if current.status == "queued":
            upstream.set_task(task.id, status="running")
        elif current.status == "running":
            upstream.complete_task(task.id)

    final = client.wait(task.id, timeout=10, poll_interval=0.02, on_update=on_update)
    assert seen == ["queued", "running", "completed"]
    assert final.status == "completed"
    assert final.image == f"/api/images/tasks/{task.id}/image"


def test_wait_sees_changes_made_while_it_sleeps(client, service, upstream):
    """A timer thread moves the task on while wait() is polling."""
    import threading

    check_in(service)
    task = client.generate("a lighthouse")
    steps = [
        threading.Timer(0.15, upstream.set_task, args=(task.id,), kwargs={"status": "running"}),
        threading.Timer(0.35, upstream.complete_task, args=(task.id,)),
    ]
    seen: list[str] = []
    for timer in steps:
        timer.start()
    try:
        final = client.wait(task.id, timeout=10, poll_interval=0.02, on_update=seen.append)
    finally:
        for timer in steps:
            timer.cancel()
    assert [t.status for t in seen] == ["queued", "running", "completed"]
    assert final == seen[-1]


def test_wait_returns_a_failed_task(client, service, upstream):
    check_in(service)
    task = client.generate("a lighthouse")
    upstream.fail_task(task.id, "content policy")
    final = client.wait(task.id, timeout=10, poll_interval=0.02)
    assert final.status == "failed"
    assert final.error == "content policy"
    assert balance(service) == 10  # refunded


def test_wait_gives_up_after_its_timeout(client, service):
    check_in(service)
    task = client.generate("a lighthouse")
    started = time.monotonic()
    with pytest.raises(WaitTimeout) as caught:
        client.wait(task.id, timeout=0.3, poll_interval=0.05)
    assert 0.3 <= time.monotonic() - started < 5
    assert isinstance(caught.value, TimeoutError)
    assert isinstance(caught.value, ClientError)
    assert caught.value.code == "wait_timeout"
    assert task.id in caught.value.message


# --------------------------------------------------------------------------- download


def test_download_gives_the_exact_bytes_of_the_upstream_image(client, service, upstream, tmp_path):
    check_in(service)
    task = client.generate("a lighthouse")
    picture = make_png(7, 5, rgb=(1, 2, 3))
    upstream.complete_task(task.id, image=picture)
    assert client.wait(task.id, timeout=10, poll_interval=0.02).status == "completed"

    assert client.download(task.id) == picture
    written = client.download(task.id, tmp_path / "out.png")
    assert written == tmp_path / "out.png"
    assert written.read_bytes() == picture
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".part")) == []


def test_download_of_an_unfinished_task_is_not_found_and_writes_nothing(client, service, tmp_path):
    check_in(service)
    task = client.generate("a lighthouse")
    target = tmp_path / "out.png"
    with pytest.raises(NotFoundError) as caught:
        client.download(task.id, target)
    assert (caught.value.code, caught.value.status) == ("image_not_ready", 404)
    assert caught.value.message == "The image is not available."
    assert list(tmp_path.glob("*out.png*")) == []


def test_download_into_a_missing_directory_is_invalid_input(client, service, upstream, tmp_path):
    check_in(service)
    task = client.generate("a lighthouse")
    upstream.complete_task(task.id)
    client.wait(task.id, timeout=10, poll_interval=0.02)
    with pytest.raises(InvalidInputError) as caught:
        client.download(task.id, tmp_path / "missing" / "out.png")
    assert caught.value.code == "output_not_writable"


# --------------------------------------------------------------------------- enhance


def test_enhance_yields_deltas_before_the_stream_ends(client, upstream):
    upstream.chat_chunk_delay = 0.3
    deltas: list[str] = []
    sent_at_first: int | None = None
    for delta in client.enhance("a lighthouse", "creative"):
        if sent_at_first is None:
            sent_at_first = len(upstream.chunk_sent_times)
        deltas.append(delta)
    assert sent_at_first is not None and sent_at_first < len(upstream.chat_chunks)
    assert deltas == ["A ", "lighthouse ", "at ", "dusk"]
    [sent] = upstream.recorded("/v1/chat/completions")
    assert sent.json["temperature"] == 0.7


def test_enhance_that_breaks_off_raises_after_the_deltas_it_got(client, upstream):
    upstream.chat_fail_after = 2
    upstream.chat_chunk_delay = 0.2  # the first chunk arrives on its own, before the break
    deltas: list[str] = []
    with pytest.raises(ServerError) as caught:
        for delta in client.enhance("a lighthouse"):
            deltas.append(delta)
    # a chunk arriving together with the break may be lost on the server side
    assert deltas in (["A "], ["A ", "lighthouse "])
    assert caught.value.code == "stream_failed"
    assert "interrupted" in caught.value.message


def test_enhance_with_an_unknown_direction_is_invalid_input(client, upstream):
    with pytest.raises(InvalidInputError) as caught:
        list(client.enhance("a lighthouse", "sideways"))
    assert (caught.value.code, caught.value.status) == ("invalid_direction", 400)
    assert upstream.recorded("/v1/chat/completions") == []


# --------------------------------------------------------------------------- errors


def test_generate_without_credits_raises_no_credits(client, upstream):
    with pytest.raises(NoCreditsError) as caught:
        client.generate("a lighthouse")
    assert (caught.value.code, caught.value.status) == ("no_credits", 402)
    assert "Check in" in caught.value.message
    assert upstream.recorded("/api/image-tasks") == []


def test_server_refusals_carry_code_message_and_status(make_client, service):
    check_in(service)
    client = make_client(fingerprint=FINGERPRINT)
    with pytest.raises(InvalidInputError) as caught:
        client.generate("   ")
    assert (caught.value.code, caught.value.status) == ("empty_prompt", 400)
    assert caught.value.message == "The prompt must not be empty."
    assert str(caught.value) == caught.value.message

    stranger = make_client(fingerprint="bad fingerprint!")
    with pytest.raises(InvalidInputError) as caught:
        stranger.quota()
    assert (caught.value.code, caught.value.status) == ("invalid_fingerprint", 400)


def test_an_upstream_failure_is_a_server_error_and_refunded(client, service, upstream):
    check_in(service)
    upstream.fail("/api/image-tasks/generations", status=400)
    with pytest.raises(ServerError) as caught:
        client.generate("a lighthouse")
    assert (caught.value.code, caught.value.status) == ("upstream_failed", 502)
    assert balance(service) == 10


def test_an_unreachable_server_raises_connection_failed(make_client):
    client = make_client(f"http://127.0.0.1:{free_port()}", fingerprint=FINGERPRINT)
    for call in (client.quota, lambda: list(client.enhance("x")), lambda: client.download("x")):
        with pytest.raises(ConnectionFailed) as caught:
            call()
        assert (caught.value.code, caught.value.status) == ("unreachable", None)
        assert "cannot reach" in caught.value.message


def test_a_server_that_is_not_scenemint_is_reported_as_such(make_client, upstream):
    client = make_client(upstream.base_url, fingerprint=FINGERPRINT)
    with pytest.raises(ClientError) as caught:
        client.quota()
    assert caught.value.status is not None and caught.value.status >= 400
    assert caught.value.code == f"http_{caught.value.status}"
    assert "SceneMint" in caught.value.message


def test_a_server_url_that_is_not_http_is_invalid_input():
    for bad in ("foo", "ftp://127.0.0.1", "http://"):
        with pytest.raises(InvalidInputError) as caught:
            Client(bad)
        assert caught.value.code == "invalid_server"


# --------------------------------------------------------------------------- fingerprint


def test_the_fingerprint_is_created_once_and_kept(make_client, config_dir, service):
    first = make_client()
    assert first.check_in().balance == 10
    stored = (config_dir / "fingerprint").read_text().strip()
    assert stored == first.fingerprint
    assert 8 <= len(stored) <= 256
    again = make_client()
    assert again.fingerprint == stored
    assert again.quota() == Quota(balance=10, signed_today=True, cap=100, daily_grant=10)
    assert balance(service, stored) == 10


def test_a_given_fingerprint_is_used_and_nothing_is_stored(client, config_dir, service):
    client.check_in()
    assert balance(service, FINGERPRINT) == 10
    assert not config_dir.exists()


def test_a_config_dir_argument_wins_over_the_environment(make_client, config_dir, tmp_path):
    other = tmp_path / "elsewhere"
    client = make_client(config_dir=other)
    fingerprint = client.fingerprint
    assert (other / "fingerprint").read_text().strip() == fingerprint
    assert not config_dir.exists()


def test_a_corrupt_fingerprint_file_is_replaced(config_dir):
    config_dir.mkdir()
    (config_dir / "fingerprint").write_text("no!\n")
    fresh = stored_fingerprint()
    assert fresh != "no!"
    assert (config_dir / "fingerprint").read_text().strip() == fresh
    assert stored_fingerprint() == fresh
    assert [p.name for p in config_dir.iterdir()] == ["fingerprint"]


# --------------------------------------------------------------------------- the asyncio way


def test_async_client_in_async_with_and_async_for(service, upstream):
    check_in(service)

    async def scenario() -> tuple[Task, list[str], bytes]:
        async with AsyncClient(service.url, fingerprint=FINGERPRINT) as client:
            task = await client.generate("a lighthouse")
            upstream.complete_task(task.id)
            final = await client.wait(task.id, timeout=10, poll_interval=0.02)
            data = await client.download(final.id)
            async with contextlib.aclosing(client.enhance("a lighthouse")) as stream:
                deltas = [delta async for delta in stream]
        return final, deltas, data

    final, deltas, data = asyncio.run(scenario())
    assert final.status == "completed"
    assert data == TINY_PNG
    assert "".join(deltas) == "A lighthouse at dusk"


def test_leaving_an_async_enhance_early_closes_the_upstream_stream(service, upstream):
    upstream.chat_chunk_delay = 0.3

    async def scenario() -> str:
        async with (
            AsyncClient(service.url) as client,
            contextlib.aclosing(client.enhance("a lighthouse")) as stream,
        ):
            async for delta in stream:
                return delta
        raise AssertionError("no delta")

    assert asyncio.run(scenario()) == "A "
    assert upstream.stream_closed.wait(5)


# --------------------------------------------------------------------------- the package


def test_all_public_names_are_exported_in_sorted_order():
    public = [name for name in vars(client_module) if not name.startswith("_")]
    assert sorted(client_module.__all__) == sorted(public)
    assert client_module.__all__ == sorted(client_module.__all__)
