"""The SSE frames of one prompt enhancement, relayed from the upstream's chat stream."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

from .errors import UpstreamError

log = logging.getLogger("scenemint.enhancement")

_DONE = b"data: [DONE]\n\n"
_END = object()
_SHUTDOWN = object()


class EnhancementStream:
    """The SSE frames of one enhancement. Iterate once; `aclose()` closes the upstream request.

    A reader task moves upstream lines into a queue so that, while the upstream is silent,
    the stream can send `: ping` comments without cancelling a half-read line.
    """

    def __init__(
        self,
        stack: AsyncExitStack,
        lines: AsyncIterator[bytes],
        *,
        ping_interval: float,
        shutting_down: asyncio.Event | None = None,
    ) -> None:
        self._stack = stack
        self._lines = lines
        self._ping_interval = ping_interval
        self._shutting_down = shutting_down or asyncio.Event()
        self._closed = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._frames()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._stack.aclose()

    async def _pump(self, queue: asyncio.Queue[object]) -> None:
        try:
            async for line in self._lines:
                await queue.put(line)
            await queue.put(_END)
        except UpstreamError as exc:
            await queue.put(exc)

    async def _frames(self) -> AsyncIterator[bytes]:
        queue: asyncio.Queue[object] = asyncio.Queue(maxsize=256)
        reader = asyncio.create_task(self._pump(queue))
        stopper = asyncio.create_task(self._stop_on_shutdown(queue))
        try:
            while True:
                try:
                    async with asyncio.timeout(self._ping_interval):
                        item = await queue.get()
                except TimeoutError:
                    yield b": ping\n\n"
                    continue
                if item is _SHUTDOWN:
                    yield _error_frame("The server is restarting. Please try again.")
                    yield _DONE
                    return
                if item is _END:
                    yield _DONE  # the upstream ended without [DONE]: end the stream properly
                    return
                if isinstance(item, UpstreamError):
                    yield _error_frame("The prompt enhancement stream was interrupted.")
                    yield _DONE
                    return
                assert isinstance(item, bytes)
                line = item.rstrip(b"\r\n")
                if not line.startswith(b"data:"):
                    continue  # comments, event names, blank separators: we write our own
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    yield _DONE
                    return
                if not _is_chunk(payload):
                    # garbage or an error object: end with our own frame, never forward it
                    log.warning("enhancement stream: unexpected frame of %d bytes", len(payload))
                    yield _error_frame("The prompt enhancement stream was interrupted.")
                    yield _DONE
                    return
                yield b"data: " + payload + b"\n\n"
        finally:
            reader.cancel()
            stopper.cancel()
            await asyncio.gather(reader, stopper, return_exceptions=True)
            await self.aclose()

    async def _stop_on_shutdown(self, queue: asyncio.Queue[object]) -> None:
        await self._shutting_down.wait()
        # jump the queue: a client should not wait for the rest of a stream we will cut
        while not queue.empty():
            queue.get_nowait()
        await queue.put(_SHUTDOWN)


def _is_chunk(payload: bytes) -> bool:
    """A JSON object shaped like a chat.completion.chunk (it has a `choices` list)."""
    try:
        frame = json.loads(payload)
    except ValueError:
        return False
    return isinstance(frame, dict) and isinstance(frame.get("choices"), list)


def _error_frame(message: str) -> bytes:
    return b"data: " + json.dumps({"error": {"message": message}}).encode() + b"\n\n"
