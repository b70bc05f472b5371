"""`Client`: the blocking client. It mirrors `AsyncClient` line for line; what they share
(requests, parsing, errors) lives in `_base`."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, overload

import httpx

from ._base import (
    DEFAULT_SERVER,
    GENERATE_TIMEOUT,
    BaseClient,
    BrokenStream,
    Call,
    DeltaReader,
    EventReader,
    GenerateRetries,
    ImageFile,
    OnUpdate,
    Polling,
    Quota,
    Reference,
    Task,
    is_event_stream,
    new_idempotency_key,
    read_reference,
    transport_errors,
)
from ._errors import ClientError, ConnectionFailed


class Client(BaseClient):
    """A SceneMint server, seen from Python. Close it, or use it as a context manager.

    with Client("http://127.0.0.1:3000") as client:
        client.check_in()
        task = client.wait(client.generate("a lighthouse at dusk").id)
        client.download(task.id, "lighthouse.png")
    """

    def __init__(
        self,
        server: str = DEFAULT_SERVER,
        *,
        fingerprint: str | None = None,
        config_dir: str | os.PathLike[str] | None = None,
        timeout: float = 30.0,
        generate_timeout: float = GENERATE_TIMEOUT,
    ) -> None:
        super().__init__(
            server,
            fingerprint=fingerprint,
            config_dir=config_dir,
            timeout=timeout,
            generate_timeout=generate_timeout,
        )
        self._http = httpx.Client(**self._http_options())

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _send(self, call: Call) -> Any:
        with transport_errors(self.server):
            response = self._http.request(**self._request_options(call))
        return self._data(response)

    def quota(self) -> Quota:
        """The balance, the cap and whether today's grant was taken."""
        return Quota.from_json(self._send(self._quota_call()))

    def check_in(self) -> Quota:
        """Take today's grant (once per calendar day, up to the cap); the quota after it."""
        return Quota.from_json(self._send(self._check_in_call()))

    def generate(
        self,
        prompt: str,
        *,
        size: str = "1:1",
        reference: Reference | None = None,
        idempotency_key: str | None = None,
    ) -> Task:
        """Spend one credit and submit a generation (an edit when `reference` is given).

        Sent with an Idempotency-Key (a fresh one unless given) and retried with it when the
        answer is lost: however often it is sent, it is one task and one credit.
        """
        part = read_reference(reference) if reference is not None else None
        key = idempotency_key or new_idempotency_key()
        call = self._generate_call(prompt, size=size, reference=part, key=key)
        retries = GenerateRetries()
        while True:
            try:
                return Task.from_json(self._send(call))
            except ClientError as error:
                time.sleep(retries.pause(error))

    def task(self, task_id: str) -> Task:
        """The task's current state (a failed "task not found or expired" for unknown ids)."""
        return Task.from_json(self._send(self._task_call(task_id)))

    def wait(
        self,
        task_id: str,
        *,
        timeout: float = 600.0,
        poll_interval: float = 1.0,
        on_update: OnUpdate | None = None,
    ) -> Task:
        """Wait until the task is completed or failed; `on_update(task)` on each new status.

        Follows the task's events (pushed by the server as they happen); polls every
        `poll_interval` seconds instead when the server is older, a proxy holds the stream
        back, or the stream ends before the task does; a server restarting or briefly unable
        to reach the upstream is polled through until the deadline. Returns the final task
        (a failed task is returned, not raised); raises WaitTimeout.
        """
        polling = Polling(
            task_id, timeout=timeout, poll_interval=poll_interval, on_update=on_update
        )
        final = self._follow_events(task_id, polling)
        if final is not None:
            return final
        while True:
            try:
                task = Task.from_json(self._send(self._wait_poll_call(task_id, polling)))
            except ClientError as error:
                if not polling.rides_out(error):
                    raise
                polling.check()
                time.sleep(polling.pause())
                continue
            if polling.seen(task):
                return task
            time.sleep(polling.pause())

    def _follow_events(self, task_id: str, polling: Polling) -> Task | None:
        """The final task from its event stream; None when it must be polled instead.

        A stream opened long before the wait's deadline reads with the silence bound; once
        the deadline is nearer than that, it is opened again with what is left (the first
        event is the current answer: nothing is lost), so no read outlives the deadline."""
        call = self._events_call(task_id)
        reader = EventReader()
        while True:
            read = self._events_read(polling)
            options = {**self._request_options(call), "timeout": self._events_timeout(read)}
            try:
                with transport_errors(self.server), self._http.stream(**options) as response:
                    if not is_event_stream(response):
                        return None
                    for line in response.iter_lines():
                        task = reader.feed(line)
                        if task is not None and polling.seen(task):
                            return task
                        polling.check()
                        if self._events_reopen(polling, read):
                            break  # open it again with a read bound the deadline allows
                    else:
                        return None  # it ended before the task did: poll
            except (ConnectionFailed, BrokenStream):
                return None  # silence, a cut or broken stream: polling picks up from here

    @overload
    def download(self, task_id: str) -> bytes: ...
    @overload
    def download(self, task_id: str, path: str | os.PathLike[str]) -> Path: ...
    def download(self, task_id: str, path: str | os.PathLike[str] | None = None) -> bytes | Path:
        """The finished image: its bytes, or written to `path` (returned) when given."""
        call = self._image_call(task_id)
        with transport_errors(self.server), self._http.stream(**self._request_options(call)) as r:
            if not r.is_success:
                r.read()
                raise self._failure(r)
            if path is None:
                return r.read()
            with ImageFile(Path(path)) as target:
                for chunk in r.iter_bytes():
                    target.write(chunk)
            return target.path

    def enhance(self, prompt: str, direction: str = "details") -> Iterator[str]:
        """A rewrite of the prompt (`details` or `creative`), as text deltas when they arrive."""
        call = self._enhance_call(prompt, direction)
        reader = DeltaReader()
        with transport_errors(self.server), self._http.stream(**self._request_options(call)) as r:
            if not r.is_success:
                r.read()
                raise self._failure(r)
            for line in r.iter_lines():
                delta = reader.feed(line)
                if delta is not None:
                    yield delta
                if reader.done:
                    return
        reader.end()
