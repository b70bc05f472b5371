"""The SSE frames of one prompt enhancement, relayed from the upstream's chat stream.

Each upstream event's data is checked to be a `chat.completion.chunk` (a JSON object with a
`choices` list) and forwarded re-encoded as one whole SSE event, so that nothing the
upstream sends (a CR inside a frame, a comment, an event name) can split or merge events in
the browser's parser. Every way a stream can end — the upstream's `[DONE]`, its end without
one, a failure, an unexpected frame, the overall deadline, a server shutdown — ends ours
with `data: [DONE]`, after an error frame in the reader's language where something went
wrong.

The upstream key never reaches the reader, in whatever field it comes and however it is cut
into chunks (`StreamRedaction`). A reader puts a stream together field by field: every
string anywhere in a chunk (`delta.content`, a tool call's `function.arguments`, a
completions-style `text`, a field nobody has heard of) continues the strings of the same
place in the chunks before it. So each place is redacted as one text across the whole
stream: a chunk whose string at some place ends in what could begin the key waits — and
the chunks after it with it, in order — until that place's next string shows whether the
key follows (then it is redacted in both), or the stream ends. Nothing but that releases it:
not a `finish_reason` (gateways send `""` on every chunk, and a choice may go on after one).
Text is never moved between chunks, with one exception that keeps a stream from stalling:
when more than `_MAX_WAITING` chunks wait, the oldest leaves without its held-back end,
which goes out with that place's next string (or in a closing chunk before `[DONE]`).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections import deque
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any, Protocol

from .config import Settings
from .errors import BadRequest, NotConfigured, UpstreamError
from .messages import message_for
from .prompts import DIRECTIONS, chat_request
from .upstream.router import Router
from .upstream.secrets import REDACTED, KeyRedactor
from .validation import clean_prompt

log = logging.getLogger("scenemint.enhancement")

_DONE = b"data: [DONE]\n\n"
_END = object()
_SHUTDOWN = object()


class Redactor(Protocol):
    """What the stream needs to keep the upstream key from the reader (`KeyRedactor`)."""

    def find(self, text: str) -> list[tuple[int, int]]:
        """Where keys are in `text`."""
        ...

    def hide(self, text: str) -> str:
        """`text` with every key, spelled out in any case, replaced."""
        ...

    def key_start(self, text: str) -> int:
        """How many characters at the end of `text` could begin a key."""
        ...


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
        self._chunks = StreamRedaction(redactor or KeyRedactor([]))
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
                    for held in self._chunks.finish():
                        yield b"data: " + held + b"\n\n"
                    yield _DONE
                    return
                if isinstance(item, UpstreamError):
                    yield self._error("enhance_interrupted")
                    yield _DONE
                    return
                assert isinstance(item, bytes)
                if item.strip() == b"[DONE]":
                    for held in self._chunks.finish():
                        yield b"data: " + held + b"\n\n"
                    yield _DONE
                    return
                frames = self._chunks.relay(item)
                if frames is None:
                    # garbage or an error object: end with our own frame, never forward it
                    # (nor what waits: it was redacted, but the stream is broken anyway)
                    log.warning("enhancement stream: unexpected frame of %d bytes", len(item))
                    yield self._error("enhance_interrupted")
                    yield _DONE
                    return
                for frame in frames:
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


# a place in a chunk: dict keys, list positions, or ("#", n) for a list element that names
# its own place ({"index": n, ...}: choices, tool calls), so that reordered lists still match
Place = tuple[object, ...]
_MAX_WAITING = 16  # chunks held back at once; past it the oldest leaves (see the docstring)
_MAX_OPEN = 64  # places whose end could begin the key at once: more is no chat stream
# whole strings that are words of the protocol, not text (roles, finish reasons, object and
# tool types): a chunk is never held back for one of these. Any other value is text.
_PROTOCOL_WORDS = frozenset(
    {
        "assistant",
        "user",
        "system",
        "developer",
        "tool",
        "function",
        "stop",
        "length",
        "tool_calls",
        "content_filter",
        "function_call",
        "chat.completion.chunk",
        "chat.completion",
        "text_completion",
    }
)


class _Chunk:
    __slots__ = ("frame", "held")

    def __init__(self, frame: dict[str, Any]) -> None:
        self.frame = frame
        self.held = 0  # open ends (of places) in this chunk


class _Piece:
    """The end of one string of a chunk that could begin the key: `container[key][start:]`.
    With `chunk` None it is text taken out of a chunk that had to leave (`text`)."""

    __slots__ = ("chunk", "container", "key", "start", "text", "waits")

    def __init__(
        self, chunk: _Chunk | None, container: Any, key: Any, start: int, text: str = ""
    ) -> None:
        self.chunk, self.container, self.key, self.start, self.text = (
            chunk,
            container,
            key,
            start,
            text,
        )
        self.waits = False  # its chunk waits for it (else it has left: only the rest of the
        # key, should it follow, can still be taken out of the next string)

    def value(self) -> str:
        if self.chunk is None:
            return self.text
        return str(self.container[self.key])[self.start :]

    def set(self, value: str) -> None:
        if self.chunk is None:
            self.text = value
        else:
            self.container[self.key] = str(self.container[self.key])[: self.start] + value


class StreamRedaction:
    """Chunks in, chunks out in the same order, the key redacted in every place's text across
    the whole stream (see the module docstring)."""

    def __init__(self, redactor: Redactor) -> None:
        self._redactor = redactor
        self._waiting: deque[_Chunk] = deque()  # chunks not yet sent, in order
        self._open: dict[Place, list[_Piece]] = {}  # place -> its end that could begin the key
        self._last: dict[str, Any] = {}  # the last chunk's id, model ... for a closing chunk

    def relay(self, data: bytes) -> list[bytes] | None:
        """The chunks that may leave now (oldest first), after `data`; None unless `data` is
        a JSON object with a `choices` list, or when too much would have to wait."""
        try:
            frame = json.loads(data)
        except (ValueError, RecursionError):
            return None
        if not isinstance(frame, dict) or not isinstance(frame.get("choices"), list):
            return None
        chunk = _Chunk(frame)
        for place, container, key in _strings(frame):
            self._continue(place, _Piece(chunk, container, key, 0))
        if len(self._open) > _MAX_OPEN:
            return None
        self._waiting.append(chunk)
        self._last = {
            key: frame[key] for key in ("id", "object", "created", "model") if key in frame
        }
        return self._ready()

    def finish(self) -> list[bytes]:
        """Everything still waiting (what it held back did not become the key), then a
        closing chunk with text that had to be taken out of a chunk that left."""
        out = [self._encode(chunk.frame) for chunk in self._waiting]
        self._waiting.clear()
        carried = {
            place: pieces[0].text
            for place, pieces in self._open.items()
            if pieces and pieces[0].chunk is None and pieces[0].text
        }
        self._open.clear()
        if carried:
            frame: dict[str, Any] = dict(self._last)
            frame["choices"] = []
            for place, text in carried.items():
                _put(frame, place, text)
            out.append(self._encode(frame))
        return out

    def _continue(self, place: Place, piece: _Piece) -> None:
        """A new string at `place`: redact it with the end that place held, hold its own."""
        pieces = self._open.pop(place, [])
        if pieces and pieces[0].chunk is None:  # text taken out of a chunk that left
            carried = pieces.pop(0).text
            piece.set(carried + piece.value())
        for held in pieces:
            if held.waits and held.chunk is not None:
                held.chunk.held -= 1
        pieces.append(piece)
        texts = [held.value() for held in pieces]
        spans = self._redactor.find("".join(texts))
        if spans:
            texts = _redacted(texts, spans)
            for held, text in zip(pieces, texts, strict=True):
                held.set(text)
        # what is left open: the end of the (redacted) text that could begin the key, which
        # may reach back over several chunks. A protocol word (a role, a finish reason, the
        # object type) as the whole new string is no text of anybody's: its chunk does not
        # wait for it; should the key follow it all the same, the rest is taken out then
        waits = texts[-1] not in _PROTOCOL_WORDS
        keep = self._redactor.key_start("".join(texts))
        opened: list[_Piece] = []
        for held, text in zip(reversed(pieces), reversed(texts), strict=True):
            if keep <= 0:
                break
            if not text:
                continue
            if keep >= len(text):
                opened.append(held)
                keep -= len(text)
                continue
            start = held.start + len(text) - keep  # (carried text was merged above)
            opened.append(_Piece(held.chunk, held.container, held.key, start))
            keep = 0
        opened.reverse()
        if opened:
            for held in opened:
                held.waits = waits and held.chunk is not None
                if held.waits and held.chunk is not None:
                    held.chunk.held += 1
            self._open[place] = opened

    def _ready(self) -> list[bytes]:
        out = []
        while self._waiting and (self._waiting[0].held == 0 or len(self._waiting) > _MAX_WAITING):
            chunk = self._waiting.popleft()
            if chunk.held:
                self._take_out(chunk)
            out.append(self._encode(chunk.frame))
        return out

    def _take_out(self, chunk: _Chunk) -> None:
        """`chunk` must leave while it holds open ends: move each into the place's next held
        piece, or keep it as text to go out with the place's next string."""
        for pieces in self._open.values():
            text = ""
            while pieces and pieces[0].chunk is chunk and pieces[0].waits:
                first = pieces.pop(0)
                text += first.value()
                first.set("")
                chunk.held -= 1
            if not text:
                continue
            if pieces:  # the next piece of this place is in a chunk still waiting
                nxt = pieces[0]
                whole = str(nxt.container[nxt.key])
                nxt.container[nxt.key] = whole[: nxt.start] + text + whole[nxt.start :]
            else:
                pieces.append(_Piece(None, None, None, 0, text))

    def _encode(self, frame: dict[str, Any]) -> bytes:
        # json.dumps escapes every control character: the frame can never hold a line break;
        # it spells out every string it decoded, so a key anywhere in it (a dict's key, say)
        # is plain to see for this last look
        hide = self._redactor.hide
        try:
            return hide(json.dumps(frame, ensure_ascii=False, separators=(",", ":"))).encode()
        except UnicodeEncodeError:  # a lone surrogate (an escaped "\ud800"): keep it escaped
            return hide(json.dumps(frame, separators=(",", ":"))).encode()


def _strings(frame: dict[str, Any]) -> list[tuple[Place, Any, Any]]:
    """Every string value of `frame`, in document order: (place, container, key)."""
    found: list[tuple[Place, Any, Any]] = []
    stack: list[tuple[Place, Any]] = [((), frame)]
    while stack:
        place, node = stack.pop()
        if isinstance(node, dict):
            items = [(key, key, value) for key, value in node.items()]
        else:
            items = [
                (_element(position, value), position, value) for position, value in enumerate(node)
            ]
        children = []
        for name, key, value in items:
            if isinstance(value, str):
                found.append(((*place, name), node, key))
            elif isinstance(value, dict | list):
                children.append(((*place, name), value))
        stack.extend(reversed(children))
    return found


def _element(position: int, value: object) -> object:
    if isinstance(value, dict):
        index = value.get("index")
        if isinstance(index, int) and not isinstance(index, bool):
            return ("#", index)
    return position


def _redacted(texts: list[str], spans: list[tuple[int, int]]) -> list[str]:
    """`texts` (consecutive pieces of one text) with the characters in `spans` removed and
    the marker put where each span begins."""
    out = []
    offset = 0
    for text in texts:
        kept = []
        for position, char in enumerate(text, offset):
            inside = next(((a, b) for a, b in spans if a <= position < b), None)
            if inside is None:
                kept.append(char)
            elif position == inside[0]:
                kept.append(REDACTED)
        out.append("".join(kept))
        offset += len(text)
    return out


def _put(frame: dict[str, Any], place: Place, text: str) -> None:
    """Set `text` at `place` in `frame`, making the dicts and lists on the way (a closing
    chunk: list positions become the next element; ("#", n) an element with that index)."""
    node: Any = frame
    for step, following in itertools.pairwise(place):
        node = _child(node, step, [] if _is_list_step(following) else {})
    last = place[-1]
    if isinstance(node, list):
        node.append(text)
    else:
        node[str(last)] = text


def _is_list_step(step: object) -> bool:
    return isinstance(step, int) or (isinstance(step, tuple) and step[:1] == ("#",))


def _child(node: Any, step: object, fresh: Any) -> Any:
    if isinstance(node, list):
        if isinstance(step, tuple):
            for element in node:
                if isinstance(element, dict) and element.get("index") == step[1]:
                    return element
            fresh = {"index": step[1]}
        node.append(fresh)
        return fresh
    key = str(step)
    existing = node.get(key)
    if isinstance(existing, dict | list):
        return existing
    node[key] = fresh
    return fresh


# -- opening a stream: the first healthy upstream with a prompt model ---------------------

_ENHANCEMENT_CODES = {502: "enhance_failed", 503: "enhance_unavailable", 504: "enhance_timeout"}


async def open_enhancement(
    router: Router,
    settings: Settings,
    *,
    prompt: object,
    direction: object,
    chinese: bool = False,
    shutting_down: asyncio.Event | None = None,
) -> EnhancementStream:
    """Open a chat stream at the first upstream (by priority, those whose chat breaker is
    closed first) that has a prompt model; before its first byte, one that refuses or
    cannot be reached is skipped for the next. Errors raise here, before anything is
    streamed, with codes of their own (`enhance_failed`, `enhance_timeout`,
    `enhance_unavailable`, `enhance_not_configured`): an enhancement that fails never says
    the image service did."""
    clean = clean_prompt(prompt, max_chars=settings.max_prompt_chars)
    if not isinstance(direction, str) or direction.strip() not in DIRECTIONS:
        raise BadRequest("invalid_direction")
    if not router:
        log.error(
            "enhancement: no upstream is configured (SCENEMINT_UPSTREAMS_FILE, or"
            " CHATGPT2API_BASE_URL and CHATGPT2API_API_KEY)"
        )
        raise NotConfigured("enhance_not_configured")
    routes = router.for_chat()
    if not routes:
        log.error("enhancement: no upstream has a prompt model (prompt_model)")
        raise NotConfigured("enhance_not_configured")
    last: UpstreamError | None = None
    for route in routes:
        client = route.client
        assert client is not None and route.chat_model is not None
        body = chat_request(
            model=route.chat_model,
            prompt=clean,
            direction=direction.strip(),
            # OpenAI's reasoning models refuse any temperature but their default
            temperature=route.kind != "openai",
        )
        stack = AsyncExitStack()
        try:
            events = await stack.enter_async_context(client.open_chat_stream(body))
        except UpstreamError as exc:
            await stack.aclose()
            if not _skippable(exc):
                raise _as_enhancement_error(exc) from exc
            log.warning("enhancement: %s refused or unreachable, trying the next", route.name)
            last = exc
            continue
        except BaseException:
            await stack.aclose()
            raise
        return EnhancementStream(
            stack,
            events,
            ping_interval=settings.stream_ping_interval,
            deadline=asyncio.get_running_loop().time() + settings.stream_deadline,
            chinese=chinese,
            shutting_down=shutting_down,
            redactor=router.secrets,  # every upstream's key: none may reach a reader
        )
    assert last is not None
    raise _as_enhancement_error(last) from last


def _skippable(exc: UpstreamError) -> bool:
    """Refused (it answered with an error status, or our breaker is open) or unreachable:
    nothing was streamed, the next upstream may serve it. A timeout waiting for the first
    byte is not skipped: the client has waited long enough."""
    return exc.reason in ("connect", "breaker") or exc.upstream_status is not None


def _as_enhancement_error(exc: UpstreamError) -> UpstreamError:
    """The same failure, with a code that says the enhancement failed."""
    return type(exc)(
        _ENHANCEMENT_CODES.get(exc.status, "enhance_failed"),
        detail=exc.detail,
        upstream_status=exc.upstream_status,
        reason=exc.reason,
    )
