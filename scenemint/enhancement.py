"""The SSE frames of one prompt enhancement, relayed from the upstream's chat stream.

Each upstream event's data is checked to be a `chat.completion.chunk` (a JSON object with a
`choices` list) and forwarded re-encoded as one whole SSE event, so that nothing the
upstream sends (a CR inside a frame, a comment, an event name) can split or merge events in
the browser's parser. Every way a stream can end — the upstream's `[DONE]`, its end without
one, a failure, an unexpected frame, the overall deadline, a server shutdown — ends ours
with `data: [DONE]`, after an error frame in the reader's language where something went
wrong.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack

from .errors import UpstreamError
from .messages import message_for

log = logging.getLogger("scenemint.enhancement")

_DONE = b"data: [DONE]\n\n"
_END = object()
_SHUTDOWN = object()


class EnhancementStream:
    """The SSE frames of one enhancement. Iterate once; `aclose()` closes the upstream request.

    A reader task moves upstream events into a queue so that, while the upstream is silent,
    the stream can send `: ping` comments without cancelling a half-read event.
    """

    def __init__(
        self,
        stack: AsyncExitStack,
        events: AsyncIterator[bytes],
        *,
        ping_interval: float,
        deadline: float,
        chinese: bool = False,
        shutting_down: asyncio.Event | None = None,
        redact: Callable[[str], str] = str,
    ) -> None:
        self._stack = stack
        self._events = events
        self._ping_interval = ping_interval
        self._deadline = deadline  # loop time
        self._chinese = chinese
        self._shutting_down = shutting_down or asyncio.Event()
        self._redact = redact  # the upstream key, in any spelling, never reaches a client
        self._closed = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._frames()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._stack.aclose()

    async def _pump(self, queue: asyncio.Queue[object]) -> None:
        try:
            async for data in self._events:
                await queue.put(data)
            await queue.put(_END)
        except UpstreamError as exc:
            await queue.put(exc)
        except Exception as exc:  # never a silent hang: the reader sees an error item
            log.exception("enhancement stream reader failed")
            await queue.put(UpstreamError(detail=f"reader failed: {exc!r}"))

    async def _frames(self) -> AsyncIterator[bytes]:
        queue: asyncio.Queue[object] = asyncio.Queue(maxsize=256)
        reader = asyncio.create_task(self._pump(queue))
        stopper = asyncio.create_task(self._stop_on_shutdown(queue))
        loop = asyncio.get_running_loop()
        try:
            while True:
                if loop.time() >= self._deadline:
                    log.warning("enhancement stream stopped at its deadline")
                    yield self._error("enhance_too_long")
                    yield _DONE
                    return
                try:
                    async with asyncio.timeout_at(
                        min(loop.time() + self._ping_interval, self._deadline)
                    ):
                        item = await queue.get()
                except TimeoutError:
                    if loop.time() < self._deadline:
                        yield b": ping\n\n"
                    continue
                if item is _SHUTDOWN:
                    yield self._error("server_restarting")
                    yield _DONE
                    return
                if item is _END:
                    yield _DONE  # the upstream ended without [DONE]: end the stream properly
                    return
                if isinstance(item, UpstreamError):
                    yield self._error("enhance_interrupted")
                    yield _DONE
                    return
                assert isinstance(item, bytes)
                if item.strip() == b"[DONE]":
                    yield _DONE
                    return
                frame = _chunk(item, self._redact)
                if frame is None:
                    # garbage or an error object: end with our own frame, never forward it
                    log.warning("enhancement stream: unexpected frame of %d bytes", len(item))
                    yield self._error("enhance_interrupted")
                    yield _DONE
                    return
                yield b"data: " + frame + b"\n\n"
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

    def _error(self, code: str) -> bytes:
        message = message_for(code, chinese=self._chinese)
        body = {"error": {"message": message, "code": code}}
        return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"


def _chunk(data: bytes, redact: Callable[[str], str]) -> bytes | None:
    """The frame re-encoded on one line (and redacted: decoding spelled out any escaped
    text), if it is a JSON object with a `choices` list."""
    try:
        frame = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if not isinstance(frame, dict) or not isinstance(frame.get("choices"), list):
        return None
    # json.dumps escapes every control character: the frame can never hold a line break
    text = redact(json.dumps(frame, ensure_ascii=False, separators=(",", ":")))
    try:
        return text.encode()
    except UnicodeEncodeError:  # a lone surrogate (an escaped "\ud800"): keep it escaped
        return redact(json.dumps(frame, separators=(",", ":"))).encode()
