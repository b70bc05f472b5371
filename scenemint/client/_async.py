"""`AsyncClient`: the asyncio client. It mirrors `Client` line for line; what they share
(requests, parsing, errors) lives in `_base`."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
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


class AsyncClient(BaseClient):
    """A SceneMint server, seen from asyncio. `aclose()` it, or use `async with`.

        async with AsyncClient("http://127.0.0.1:3000") as client:
            async for delta in client.enhance("a lighthouse", "creative"):
                print(delta, end="")

    Leaving `enhance()` early: wrap it in `contextlib.aclosing` so the stream closes at once.
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
        self._http = httpx.AsyncClient(**self._http_options())

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _send(self, call: Call) -> Any:
        with transport_errors(self.server):
            response = await self._http.request(**self._request_options(call))
        return self._data(response)

    async def quota(self) -> Quota:
        """The balance, the cap and whether today's grant was taken."""
        return Quota.from_json(await self._send(self._quota_call()))

    async def check_in(self) -> Quota:
        """Take today's grant (once per calendar day, up to the cap); the quota after it."""
        return Quota.from_json(await self._send(self._check_in_call()))

    async def generate(
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
        # reading a file may block: off the event loop
        part = await asyncio.to_thread(read_reference, reference) if reference is not None else None
        key = idempotency_key or new_idempotency_key()
        call = self._generate_call(prompt, size=size, reference=part, key=key)
        retries = GenerateRetries()
        while True:
            try:
                return Task.from_json(await self._send(call))
            except ClientError as error:
                await asyncio.sleep(retries.pause(error))

    async def task(self, task_id: str) -> Task:
        """The task's current state (a failed "task not found or expired" for unknown ids)."""
        return Task.from_json(await self._send(self._task_call(task_id)))

    async def wait(
        self,
        task_id: str,
        *,
        timeout: float = 600.0,  # noqa: ASYNC109 - the same signature as Client.wait
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
        final = await self._follow_events(task_id, polling)
        if final is not None:
            return final
        while True:
            try:
                task = Task.from_json(await self._send(self._wait_poll_call(task_id, polling)))
            except ClientError as error:
                if not polling.rides_out(error):
                    raise
                polling.check()
                await asyncio.sleep(polling.pause())
                continue
            if polling.seen(task):
                return task
            await asyncio.sleep(polling.pause())

    async def _follow_events(self, task_id: str, polling: Polling) -> Task | None:
        """The final task from its event stream; None when it must be polled instead (see
        `Client._follow_events`)."""
        call = self._events_call(task_id)
        reader = EventReader()
        while True:
            read = self._events_read(polling)
            options = {**self._request_options(call), "timeout": self._events_timeout(read)}
            try:
                with transport_errors(self.server):
                    async with self._http.stream(**options) as response:
                        if not is_event_stream(response):
                            return None
                        async for line in response.aiter_lines():
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
    async def download(self, task_id: str) -> bytes: ...
    @overload
    async def download(self, task_id: str, path: str | os.PathLike[str]) -> Path: ...
    async def download(
        self, task_id: str, path: str | os.PathLike[str] | None = None
    ) -> bytes | Path:
        """The finished image: its bytes, or written to `path` (returned) when given."""
        call = self._image_call(task_id)
        with transport_errors(self.server):
            async with self._http.stream(**self._request_options(call)) as r:
                if not r.is_success:
                    await r.aread()
                    raise self._failure(r)
                if path is None:
                    return await r.aread()
                with ImageFile(Path(path)) as target:
                    async for chunk in r.aiter_bytes():
                        target.write(chunk)
                return target.path

    async def enhance(self, prompt: str, direction: str = "details") -> AsyncIterator[str]:
        """A rewrite of the prompt (`details` or `creative`), as text deltas when they arrive."""
        call = self._enhance_call(prompt, direction)
        reader = DeltaReader()
        with transport_errors(self.server):
            async with self._http.stream(**self._request_options(call)) as r:
                if not r.is_success:
                    await r.aread()
                    raise self._failure(r)
                async for line in r.aiter_lines():
                    delta = reader.feed(line)
                    if delta is not None:
                        yield delta
                    if reader.done:
                        return
        reader.end()
