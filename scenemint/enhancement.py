"""The SSE frames of one prompt enhancement, relayed from the upstream's chat stream.

Each upstream event's data is checked to be a `chat.completion.chunk` (a JSON object with a
`choices` list) and forwarded re-encoded as one whole SSE event, so that nothing the
upstream sends (a CR inside a frame, a comment, an event name) can split or merge events in
the browser's parser. Every way a stream can end — the upstream's `[DONE]`, its end without
one, a failure, an unexpected frame, the overall deadline, a server shutdown — ends ours
with `data: [DONE]`, after an error frame in the reader's language where something went
wrong.

The upstream key never reaches the reader, not even spelled out across chunks: text at the
end of a chunk's delta (`content`, or any other text field but `role`) that could be the
start of the key is held back and sent with the next chunk of that choice and field, once
the two together are redacted (`Redactor`), or in a chunk of its own before `[DONE]`.
Nothing releases it earlier: not a `finish_reason` (gateways send `""` on every chunk, and
a choice may go on after one).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any, Protocol

from .errors import UpstreamError
from .messages import message_for

log = logging.getLogger("scenemint.enhancement")

_DONE = b"data: [DONE]\n\n"
_END = object()
_SHUTDOWN = object()
_MAX_HELD = 64  # texts held back at once (choices x fields): more is no chat stream


class Redactor(Protocol):
    """What the stream needs to keep the upstream key from the reader (`UpstreamHTTP`)."""

    def hide(self, text: str) -> str:
        """`text` with the key, spelled out in any case, replaced."""
        ...

    def key_start(self, text: str) -> int:
        """How many characters at the end of `text` could begin the key."""
        ...


class _NoSecret:
    def hide(self, text: str) -> str:
        return text

    def key_start(self, text: str) -> int:
        return 0


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
        redactor: Redactor | None = None,
    ) -> None:
        self._stack = stack
        self._events = events
        self._ping_interval = ping_interval
        self._deadline = deadline  # loop time
        self._chinese = chinese
        self._shutting_down = shutting_down or asyncio.Event()
        self._chunks = _Chunks(redactor or _NoSecret())
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
                if item is _END:  # the upstream ended without [DONE]: end the stream properly
                    for held in self._chunks.rest():
                        yield b"data: " + held + b"\n\n"
                    yield _DONE
                    return
                if isinstance(item, UpstreamError):
                    yield self._error("enhance_interrupted")
                    yield _DONE
                    return
                assert isinstance(item, bytes)
                if item.strip() == b"[DONE]":
                    for held in self._chunks.rest():
                        yield b"data: " + held + b"\n\n"
                    yield _DONE
                    return
                frame = self._chunks.relay(item)
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


class _Chunks:
    """Upstream chunks re-encoded as one line each, redacted, with the text that could begin
    the key held back per choice and field until the next chunk of that choice and field (or
    the end of the stream) shows whether it does."""

    def __init__(self, redactor: Redactor) -> None:
        self._redactor = redactor
        self._held: dict[tuple[object, str], str] = {}  # (choice index, field) -> text
        self._last: dict[str, Any] = {}  # the last chunk's id, model ... for a closing chunk

    def relay(self, data: bytes) -> bytes | None:
        """The chunk to send, if `data` is a JSON object with a `choices` list."""
        try:
            frame = json.loads(data)
        except (ValueError, RecursionError):
            return None
        if not isinstance(frame, dict) or not isinstance(frame.get("choices"), list):
            return None
        for position, choice in enumerate(frame["choices"]):
            if not isinstance(choice, dict) or not isinstance(choice.get("delta"), dict):
                continue
            index = choice.get("index", position)
            index = index if isinstance(index, int | str) else position
            delta = choice["delta"]
            for field, text in list(delta.items()):
                if field == "role" or not isinstance(text, str):
                    continue
                text = self._redactor.hide(self._held.pop((index, field), "") + text)
                keep = self._redactor.key_start(text)
                if keep:
                    self._held[(index, field)] = text[-keep:]
                    text = text[:-keep]
                delta[field] = text
        if len(self._held) > _MAX_HELD:
            return None  # not a chat stream: it ends with our error frame
        self._last = {
            key: frame[key] for key in ("id", "object", "created", "model") if key in frame
        }
        return self._encode(frame)

    def rest(self) -> list[bytes]:
        """A closing chunk with the text still held back (it did not become the key)."""
        if not self._held:
            return []
        choices: dict[object, dict[str, str]] = {}
        for (index, field), text in self._held.items():
            choices.setdefault(index, {})[field] = text
        self._held.clear()
        frame = dict(self._last)
        frame["choices"] = [{"index": index, "delta": delta} for index, delta in choices.items()]
        return [self._encode(frame)]

    def _encode(self, frame: dict[str, Any]) -> bytes:
        # json.dumps escapes every control character: the frame can never hold a line break;
        # it spells out every string it decoded, so a key anywhere in it is plain to see
        hide = self._redactor.hide
        try:
            return hide(json.dumps(frame, ensure_ascii=False, separators=(",", ":"))).encode()
        except UnicodeEncodeError:  # a lone surrogate (an escaped "\ud800"): keep it escaped
            return hide(json.dumps(frame, separators=(",", ":"))).encode()
