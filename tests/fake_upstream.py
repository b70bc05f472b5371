"""A fake chatgpt2api upstream: a real aiohttp server on a loopback thread.

The server runs in its own thread with its own event loop, so synchronous tests
(and code running in other threads) can drive it. Every public method is
synchronous and thread-safe.

What it fakes (see SPEC section 4):

- ``POST /api/image-tasks/generations`` (JSON) and ``POST /api/image-tasks/edits``
  (multipart) create tasks, idempotently by ``client_task_id``;
- ``GET /api/image-tasks?ids=a,b`` lists ``items`` and ``missing_ids``;
- ``GET /v1/models`` and ``POST /v1/chat/completions`` (SSE when ``stream``);
- ``GET /files/<name>`` serves image bytes registered with :meth:`FakeUpstream.add_file`
  or :meth:`FakeUpstream.complete_task`.

Every request is recorded *before* any fault is applied, so a test can assert
what was sent even when the fake then failed it. Faults (``fail``, ``delay``,
``garbage``, ``wrong_shape``, ``truncate``, ``drop``, ``never_end``, ``hold``) match
requests whose path starts with a prefix, for the next ``times`` requests
(``None``: until cleared). By default a fault replaces the request's processing
(no task is created); ``after_processing=True`` processes the request first, which
fakes "the upstream accepted the submission but the answer was lost".
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import gzip
import json
import random
import re
import struct
import threading
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from aiohttp.multipart import MultipartReader
from aiohttp.streams import StreamReader
from multidict import CIMultiDict

__all__ = [
    "DEFAULT_API_KEY",
    "TINY_PNG",
    "FakeUpstream",
    "Hold",
    "RawAnswer",
    "RecordedFile",
    "RecordedRequest",
    "generated_file_bytes",
    "make_png",
]

DEFAULT_API_KEY = "test-upstream-key-SECRET-1234"
DEFAULT_ERROR_BODY = b'{"error":{"message":"upstream exploded"}}'
WRONG_SHAPE_DEFAULT: Any = {"foo": 1}

CHAT_PATH = "/v1/chat/completions"
FILES_PREFIX = "/files/"
_MAX_REQUEST_BODY = 64 * 1024 * 1024
_SHUTDOWN_TIMEOUT = 0.5
_RAW_HOLD_CAP = 60.0


# --------------------------------------------------------------------------- images

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_chunk(tag: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(tag + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", crc)


def make_png(width: int, height: int, *, rgb: tuple[int, int, int] = (200, 80, 40)) -> bytes:
    """A valid solid-colour 8-bit RGB PNG, built with zlib and struct only."""
    if width < 1 or height < 1:
        raise ValueError("width and height must be positive")
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    row = b"\x00" + bytes(rgb) * width  # filter byte 0 ("none") then the pixels
    pixels = zlib.compress(row * height)
    return (
        _PNG_SIGNATURE
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", pixels)
        + _png_chunk(b"IEND", b"")
    )


def noisy_png(width: int, height: int, *, seed: int = 0) -> bytes:
    """A valid PNG of random pixels: it does not compress (about 3 bytes a pixel)."""
    rng = random.Random(seed)
    rows = b"".join(
        b"\x00" + bytes(rng.getrandbits(8) for _ in range(width * 3)) for _ in range(height)
    )
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        _PNG_SIGNATURE
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(rows, 0))
        + _png_chunk(b"IEND", b"")
    )


TINY_PNG: bytes = make_png(1, 1)

# Generated file content: a 4 KiB pattern that starts with the PNG signature, so
# the first bytes look like an image to a magic-byte sniffer.
_PATTERN = _PNG_SIGNATURE + bytes((i * 31 + 7) % 256 for i in range(4096 - len(_PNG_SIGNATURE)))


def _generated_slice(start: int, length: int) -> bytes:
    offset = start % len(_PATTERN)
    repeats = (offset + length) // len(_PATTERN) + 1
    return (_PATTERN * repeats)[offset : offset + length]


def generated_file_bytes(size: int) -> bytes:
    """The exact bytes a file added with ``add_file(name, size=size)`` serves."""
    return _generated_slice(0, size)


_EXTENSIONS = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/webp": ".webp",
    "image/gif": ".gif",
}


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class RecordedFile:
    """A file part of a multipart request."""

    filename: str | None
    content_type: str | None
    data: bytes


@dataclass
class RecordedRequest:
    """One request as the fake received it (headers are case-insensitive)."""

    method: str
    path: str
    query: dict[str, str]
    headers: CIMultiDict[str]
    body: bytes
    json: Any | None = None
    form: dict[str, str] = field(default_factory=dict)
    files: dict[str, RecordedFile] = field(default_factory=dict)
    chunked: bool = False
    content_length: int | None = None
    parse_error: str | None = None
    received_at: float = field(default_factory=time.monotonic)

    @property
    def authorization(self) -> str | None:
        return self.headers.get("Authorization")


@dataclass
class _Fault:
    kind: str
    path_prefix: str
    remaining: int | None
    status: int = 500
    body: bytes = DEFAULT_ERROR_BODY
    content_type: str = "application/json"
    seconds: float = 0.0
    payload: Any = None
    after_processing: bool = False
    contains: str | None = None  # only requests whose query or body contains this
    probability: float = 1.0  # the share of matching requests it applies to (seeded)
    rng: random.Random | None = None

    def matches(self, record: RecordedRequest) -> bool:
        if not record.path.startswith(self.path_prefix):
            return False
        if self.rng is not None and self.rng.random() >= self.probability:
            return False
        if self.contains is None:
            return True
        haystack = "&".join(f"{k}={v}" for k, v in record.query.items())
        return self.contains in haystack or self.contains.encode() in record.body


@dataclass
class _FileSpec:
    data: bytes | None
    size: int
    content_type: str | None
    chunk_size: int
    chunk_delay: float
    declare_length: bool
    content_encoding: str | None = None

    def read(self, start: int, length: int) -> bytes:
        if self.data is not None:
            return self.data[start : start + length]
        return _generated_slice(start, min(length, self.size - start))


class _Keep:
    """Marker for "leave this task field as it is"."""

    def __repr__(self) -> str:
        return "KEEP"


KEEP: Any = _Keep()


class Hold:
    """Holds responses to matching requests until released.

    ``held`` is set as soon as one matching request has been processed and is
    waiting; ``count`` says how many have been held so far.
    """

    def __init__(self, owner: FakeUpstream, path_prefix: str) -> None:
        self.path_prefix = path_prefix
        self.held = threading.Event()
        self.count = 0
        self.released = False
        self._owner = owner
        self._event = asyncio.Event()  # binds to the server loop on first wait

    def wait(self, timeout: float = 5.0) -> bool:
        """Wait until a request is being held; ``True`` if one is."""
        return self.held.wait(timeout)

    def is_set(self) -> bool:
        return self.held.is_set()

    def release(self) -> None:
        self._owner._release_holds([self])

    def _mark_released(self) -> None:
        self.released = True
        self._owner._call_in_loop(self._event.set)


@dataclass(frozen=True)
class RawAnswer:
    """A raw answer for ``raw_answer``: ``pieces`` written ``pause`` seconds apart, then the
    connection closed; with ``hold`` it stays open and silent instead (until the client
    goes, the fake stops, or a cap of a minute)."""

    pieces: tuple[bytes, ...]
    pause: float = 0.0
    hold: bool = False


class _NoFlowControl:
    """Protocol stand-in for a StreamReader fed from bytes already read."""

    # Signatures vary between aiohttp releases (e.g. resume_parser=), so accept anything.
    def pause_reading(self, *args: object, **kwargs: object) -> None:
        return None

    def resume_reading(self, *args: object, **kwargs: object) -> None:
        return None


class _NoContentTypeResponse(web.StreamResponse):
    """aiohttp always adds a Content-Type; this response removes it before sending."""

    async def _write_headers(self) -> None:
        self._headers.popall("Content-Type", None)
        await super()._write_headers()


_Streamer = Callable[[web.Request], Awaitable[web.StreamResponse]]
_Reply = web.StreamResponse | _Streamer


def _json_response(payload: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status, body=json.dumps(payload).encode(), content_type="application/json"
    )


def _error(message: str, status: int) -> web.Response:
    return _json_response({"error": {"message": message}}, status=status)


def _sse(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


# --------------------------------------------------------------------------- the fake


class FakeUpstream:
    """A fake chatgpt2api server; see the module docstring."""

    def __init__(self, api_key: str = DEFAULT_API_KEY) -> None:
        self.api_key = api_key
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._stopping = False
        self._handler_tasks: set[asyncio.Task[Any]] = set()
        self._set_defaults()

    def _set_defaults(self) -> None:
        self._requests: list[RecordedRequest] = []
        self._tasks: dict[str, dict[str, Any]] = {}
        self._files: dict[str, _FileSpec] = {}
        self._faults: list[_Fault] = []
        self._holds: list[Hold] = []
        # Knobs, read by the server thread when a request arrives.
        self.new_task_status = "queued"
        self.auto_complete = False  # new submissions succeed at once with TINY_PNG
        self.naive_timestamps = False  # ISO timestamps without a timezone
        self.files_require_auth = False
        self.models: list[str] = ["gpt-image-2", "gpt-5.5"]
        self.chat_chunks: list[str] = ["A ", "lighthouse ", "at ", "dusk"]
        self.chat_chunk_delay = 0.0
        self.chat_fail_after: int | None = None
        self.chat_content_type = "text/event-stream"
        # when set, the chat stream sends exactly these byte pieces (``chat_raw_delay`` apart)
        # and, with ``chat_raw_forever``, then repeats the last one for ever
        self.chat_raw: list[bytes] | None = None
        self.chat_raw_delay = 0.0
        self.chat_raw_forever = False
        # the fuzzing mode: called with each request after it is recorded and processed (a
        # submission has created its task); bytes it returns are written raw as the whole
        # answer and the connection closed (a `RawAnswer`: in pieces, perhaps held open),
        # None lets the fake answer as usual
        self.raw_answer: Callable[[RecordedRequest], bytes | RawAnswer | None] | None = None
        self.stream_closed = threading.Event()
        self.chunk_sent_times: list[float] = []

    # ------------------------------------------------------------ lifecycle

    def start(self) -> FakeUpstream:
        if self._thread is not None:
            raise RuntimeError("FakeUpstream already started")
        self._stopping = False
        loop = asyncio.new_event_loop()
        thread = threading.Thread(
            target=self._run_loop, args=(loop,), name="fake-upstream", daemon=True
        )
        self._loop, self._thread = loop, thread
        thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._astart(), loop).result(timeout=10)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the server; held and never-ending responses are cut off."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._stopping = True
        try:
            if loop.is_running():
                asyncio.run_coroutine_threadsafe(self._astop(), loop).result(timeout=10)
        finally:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            self._loop = self._thread = self._runner = None
            self._port = None

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = f"http://127.0.0.1:{self._port}" if self._port else "stopped"
        return f"<FakeUpstream {where}>"

    @staticmethod
    def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            try:
                pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
                for task in pending:
                    task.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                asyncio.set_event_loop(None)
                loop.close()

    async def _astart(self) -> None:
        app = web.Application(client_max_size=_MAX_REQUEST_BODY)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        # handler_cancellation: a client that disconnects cancels its handler, which
        # is how a chat stream notices that the reader went away.
        runner = web.AppRunner(
            app, handler_cancellation=True, shutdown_timeout=_SHUTDOWN_TIMEOUT, access_log=None
        )
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self._runner = runner
        self._port = int(runner.addresses[0][1])

    async def _astop(self) -> None:
        tasks = [task for task in self._handler_tasks if not task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2)
        if self._runner is not None:
            await self._runner.cleanup()

    def _call_in_loop(self, callback: Callable[[], object]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # loop closed meanwhile
            loop.call_soon_threadsafe(callback)

    # ------------------------------------------------------------ addresses

    @property
    def base_url(self) -> str:
        if self._port is None:
            raise RuntimeError("FakeUpstream is not started")
        return f"http://127.0.0.1:{self._port}"

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FakeUpstream is not started")
        return self._port

    def url(self, path: str) -> str:
        return self.base_url + path

    # ------------------------------------------------------------ recordings

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of every request received, in order."""
        return self.recorded()

    def recorded(
        self, path_prefix: str | None = None, *, method: str | None = None
    ) -> list[RecordedRequest]:
        with self._lock:
            return [
                rec
                for rec in self._requests
                if (path_prefix is None or rec.path.startswith(path_prefix))
                and (method is None or rec.method == method.upper())
            ]

    def wait_for_requests(
        self, path_prefix: str, count: int = 1, *, timeout: float = 5.0
    ) -> list[RecordedRequest]:
        """Block until ``count`` requests matching the prefix were recorded."""

        def matching() -> list[RecordedRequest]:
            return [rec for rec in self._requests if rec.path.startswith(path_prefix)]

        with self._changed:
            if not self._changed.wait_for(lambda: len(matching()) >= count, timeout=timeout):
                raise TimeoutError(
                    f"{len(matching())} of {count} requests to {path_prefix!r} arrived"
                )
            return matching()

    def reset(self) -> None:
        """Forget tasks, files, recordings and faults; release holds; restore knobs."""
        with self._lock:
            holds = list(self._holds)
            self._set_defaults()
        for hold in holds:
            hold._mark_released()

    # ------------------------------------------------------------ tasks

    @property
    def tasks(self) -> dict[str, dict[str, Any]]:
        """A snapshot of the tasks the fake knows, keyed by id."""
        with self._lock:
            return copy.deepcopy(self._tasks)

    def task(self, task_id: str) -> dict[str, Any] | None:
        with self._lock:
            task = self._tasks.get(task_id)
            return copy.deepcopy(task) if task is not None else None

    def set_task(
        self,
        task_id: str,
        *,
        status: str | None = None,
        mode: str | None = None,
        data: list[dict[str, Any]] | None = None,
        error: str | None = KEEP,
        extra: dict[str, Any] | None = None,
        **fields: Any,
    ) -> None:
        """Create or update a task. ``error`` left out keeps it; ``error=None`` clears it.

        ``extra`` and ``fields`` are merged into the task object as they are, so they
        can also override ``created_at``/``updated_at`` or add ``progress``.
        """
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None:
                task = self._new_task(task_id, mode=mode or "generate", model=None, size=None)
                self._tasks[task_id] = task
            if status is not None:
                task["status"] = status
            if mode is not None:
                task["mode"] = mode
            if data is not None:
                task["data"] = copy.deepcopy(data)
            if error is not KEEP:
                task["error"] = error
            task["updated_at"] = self._now()
            task.update(copy.deepcopy(extra or {}))
            task.update(copy.deepcopy(fields))

    def complete_task(
        self,
        task_id: str,
        *,
        image: bytes = TINY_PNG,
        content_type: str = "image/png",
        revised_prompt: str | None = None,
    ) -> str:
        """Mark the task successful with one image served by the fake; return its URL."""
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", task_id) + _EXTENSIONS.get(content_type, ".bin")
        url = self.add_file(name, image, content_type=content_type)
        self.set_task(
            task_id,
            status="success",
            data=[{"url": url, "revised_prompt": revised_prompt}],
            error=None,
        )
        return url

    def fail_task(self, task_id: str, error: str = "image generation failed") -> None:
        self.set_task(task_id, status="error", error=error, data=[])

    def forget_task(self, task_id: str) -> None:
        """Fake an upstream restart for this task: its id becomes missing."""
        with self._lock:
            self._tasks.pop(task_id, None)

    def _now(self) -> str:
        now = datetime.now(UTC)
        if self.naive_timestamps:
            return now.replace(tzinfo=None).isoformat(timespec="seconds")
        return now.isoformat(timespec="milliseconds")

    def _new_task(
        self, task_id: str, *, mode: str, model: str | None, size: str | None
    ) -> dict[str, Any]:
        now = self._now()
        return {
            "id": task_id,
            "status": self.new_task_status,
            "mode": mode,
            "model": model or "gpt-image-2",
            "size": size or "1:1",
            "created_at": now,
            "updated_at": now,
            "data": [],
            "error": None,
        }

    def _submit(self, task_id: str, *, mode: str, model: Any, size: Any) -> dict[str, Any]:
        with self._lock:
            existing = self._tasks.get(task_id)
            if existing is not None:
                return copy.deepcopy(existing)
            self._tasks[task_id] = self._new_task(
                task_id,
                mode=mode,
                model=model if isinstance(model, str) else None,
                size=size if isinstance(size, str) else None,
            )
        if self.auto_complete:
            self.complete_task(task_id)
        return self.task(task_id) or {}

    # ------------------------------------------------------------ files

    def add_file(
        self,
        name: str,
        data: bytes | None = None,
        *,
        content_type: str | None = "image/png",
        size: int | None = None,
        chunk_size: int = 64 * 1024,
        chunk_delay: float = 0.0,
        declare_length: bool = True,
        gzip_encoded: bool = False,
    ) -> str:
        """Serve a file at ``/files/<name>``; return its absolute URL.

        ``gzip_encoded=True`` sends ``data`` gzip-compressed with ``Content-Encoding: gzip``
        (and the compressed length), whatever the request's Accept-Encoding says.

        With ``size`` instead of ``data`` the fake streams that many generated bytes
        (:func:`generated_file_bytes`) without holding them in memory.
        ``content_type=None`` sends no Content-Type; ``declare_length=False`` sends
        the body chunked, without Content-Length.
        """
        if (data is None) == (size is None):
            raise ValueError("give exactly one of data or size")
        if chunk_size < 1:
            raise ValueError("chunk_size must be positive")
        encoding = None
        if gzip_encoded:
            if data is None:
                raise ValueError("gzip_encoded needs data")
            data, encoding = gzip.compress(data), "gzip"
        total = len(data) if data is not None else int(size or 0)
        spec = _FileSpec(
            data, total, content_type, chunk_size, chunk_delay, declare_length, encoding
        )
        with self._lock:
            self._files[name] = spec
        return self.url(FILES_PREFIX + name)

    def remove_file(self, name: str) -> None:
        with self._lock:
            self._files.pop(name, None)

    # ------------------------------------------------------------ faults

    def _add_fault(self, fault: _Fault) -> None:
        if fault.remaining is not None and fault.remaining < 1:
            raise ValueError("times must be positive or None")
        with self._lock:
            self._faults.append(fault)

    def fail(
        self,
        path_prefix: str,
        *,
        status: int = 500,
        body: bytes | str = DEFAULT_ERROR_BODY,
        content_type: str = "application/json",
        times: int | None = None,
        after_processing: bool = False,
        contains: str | None = None,
        probability: float = 1.0,
        seed: int = 0,
    ) -> None:
        """Answer ``status`` with ``body`` (to a seeded random ``probability`` share of the
        matching requests when it is below 1)."""
        raw = body.encode() if isinstance(body, str) else body
        self._add_fault(
            _Fault(
                "fail",
                path_prefix,
                times,
                status=status,
                body=raw,
                content_type=content_type,
                after_processing=after_processing,
                contains=contains,
                probability=probability,
                rng=random.Random(seed) if probability < 1.0 else None,
            )
        )

    def delay(self, path_prefix: str, seconds: float, *, times: int | None = None) -> None:
        """Sleep before answering (combines with one other fault)."""
        self._add_fault(_Fault("delay", path_prefix, times, seconds=seconds))

    def garbage(
        self,
        path_prefix: str,
        *,
        times: int | None = None,
        after_processing: bool = False,
        contains: str | None = None,
    ) -> None:
        """Answer 200 with a body that is not valid JSON (or SSE frames of garbage)."""
        self._add_fault(
            _Fault(
                "garbage", path_prefix, times, after_processing=after_processing, contains=contains
            )
        )

    def wrong_shape(
        self,
        path_prefix: str,
        *,
        payload: Any = WRONG_SHAPE_DEFAULT,
        times: int | None = None,
        after_processing: bool = False,
    ) -> None:
        """Answer 200 with valid JSON of an unexpected shape (default ``{"foo": 1}``)."""
        self._add_fault(
            _Fault(
                "wrong_shape",
                path_prefix,
                times,
                payload=payload,
                after_processing=after_processing,
            )
        )

    def truncate(
        self, path_prefix: str, *, times: int | None = None, after_processing: bool = False
    ) -> None:
        """Declare a Content-Length larger than what is sent, then close the connection."""
        self._add_fault(_Fault("truncate", path_prefix, times, after_processing=after_processing))

    def drop(
        self, path_prefix: str, *, times: int | None = None, after_processing: bool = False
    ) -> None:
        """Read the request, then close the connection without any response."""
        self._add_fault(_Fault("drop", path_prefix, times, after_processing=after_processing))

    def never_end(
        self,
        path_prefix: str,
        *,
        times: int | None = None,
        after_processing: bool = False,
        contains: str | None = None,
    ) -> None:
        """Send headers and a little body, then keep the response open until stop()."""
        self._add_fault(
            _Fault(
                "never_end",
                path_prefix,
                times,
                after_processing=after_processing,
                contains=contains,
            )
        )

    def hold(self, path_prefix: str) -> Hold:
        """Process matching requests but keep their responses until released."""
        hold = Hold(self, path_prefix)
        with self._lock:
            self._holds.append(hold)
        return hold

    def release(self, path_prefix: str | None = None) -> None:
        """Release holds whose prefix starts with ``path_prefix`` (all when None)."""
        with self._lock:
            holds = [
                hold
                for hold in self._holds
                if path_prefix is None or hold.path_prefix.startswith(path_prefix)
            ]
        self._release_holds(holds)

    def _release_holds(self, holds: list[Hold]) -> None:
        with self._lock:
            self._holds = [hold for hold in self._holds if hold not in holds]
        for hold in holds:
            hold._mark_released()

    def clear_faults(self) -> None:
        """Remove every fault and release every hold."""
        with self._lock:
            self._faults.clear()
            holds = list(self._holds)
        self._release_holds(holds)

    def _take_faults(self, record: RecordedRequest) -> tuple[float, _Fault | None, Hold | None]:
        path = record.path
        delay = 0.0
        chosen: _Fault | None = None
        with self._lock:
            for fault in self._faults:
                if not fault.matches(record):
                    continue
                if fault.kind == "delay":
                    if delay:
                        continue
                    delay = fault.seconds
                elif chosen is None:
                    chosen = fault
                else:
                    continue
                if fault.remaining is not None:
                    fault.remaining -= 1
            self._faults = [f for f in self._faults if f.remaining is None or f.remaining > 0]
            hold = next((h for h in self._holds if path.startswith(h.path_prefix)), None)
        return delay, chosen, hold

    # ------------------------------------------------------------ server side

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()
        if task is not None:
            self._handler_tasks.add(task)
        try:
            return await self._handle(request)
        finally:
            if task is not None:
                self._handler_tasks.discard(task)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        record = await self._record(request)
        if self.raw_answer is not None:
            self._route(request, record)  # a submission creates its task first
            raw = self.raw_answer(record)
            if raw is not None:
                # the fuzzing mode: these exact bytes (status line, headers, body, lies and
                # all), then the connection is closed
                await self._send_raw(
                    request, raw if isinstance(raw, RawAnswer) else RawAnswer((raw,))
                )
                return web.Response()  # never sent: the transport is closed
        delay, fault, hold = self._take_faults(record)
        if delay:
            await asyncio.sleep(delay)
        if fault is not None and not fault.after_processing:
            return await self._apply_fault(request, fault, None)
        reply = self._route(request, record)
        if fault is not None:
            return await self._apply_fault(request, fault, reply)
        if hold is not None and not hold.released:
            hold.count += 1
            hold.held.set()
            await hold._event.wait()
        if isinstance(reply, web.StreamResponse):
            return reply
        return await reply(request)

    async def _record(self, request: web.Request) -> RecordedRequest:
        body = await request.read()
        headers = CIMultiDict(request.headers)
        length = headers.get("Content-Length", "")
        record = RecordedRequest(
            method=request.method,
            path=request.path,
            query=dict(request.query),
            headers=headers,
            body=body,
            chunked="chunked" in headers.get("Transfer-Encoding", "").lower(),
            content_length=int(length) if length.isdigit() else None,
        )
        if request.content_type.startswith("multipart/"):
            try:
                record.form, record.files = await self._parse_multipart(request, body)
            except Exception as exc:
                record.parse_error = f"{type(exc).__name__}: {exc}"
        elif body:
            try:
                record.json = json.loads(body)
            except ValueError as exc:
                record.parse_error = f"invalid JSON: {exc}"
        with self._changed:
            self._requests.append(record)
            self._changed.notify_all()
        return record

    @staticmethod
    async def _parse_multipart(
        request: web.Request, body: bytes
    ) -> tuple[dict[str, str], dict[str, RecordedFile]]:
        # The body was already read (to record it raw), so the multipart reader is
        # fed from those bytes instead of from request.multipart().
        stream = StreamReader(
            _NoFlowControl(),  # type: ignore[arg-type]
            limit=max(len(body), 2**16),
            loop=asyncio.get_running_loop(),
        )
        stream.feed_data(body)
        stream.feed_eof()
        reader = MultipartReader(request.headers, stream)
        form: dict[str, str] = {}
        files: dict[str, RecordedFile] = {}
        while (part := await reader.next()) is not None:
            if isinstance(part, MultipartReader):
                raise ValueError("nested multipart is not supported")
            data = bytes(await part.read(decode=True))
            name = part.name or ""
            if part.filename is not None:
                files[name] = RecordedFile(part.filename, part.headers.get("Content-Type"), data)
            else:
                form[name] = data.decode(part.get_charset("utf-8"))
        return form, files

    def _authorized(self, record: RecordedRequest) -> bool:
        scheme, _, token = (record.authorization or "").partition(" ")
        return scheme.lower() == "bearer" and token == self.api_key

    def _route(self, request: web.Request, record: RecordedRequest) -> _Reply:
        method, path = record.method, record.path
        if path.startswith(FILES_PREFIX) and method in ("GET", "HEAD"):
            if self.files_require_auth and not self._authorized(record):
                return _error("unauthorized", 401)
            return self._file_streamer(path[len(FILES_PREFIX) :])
        if not self._authorized(record):
            return _error("unauthorized", 401)
        if (method, path) == ("POST", "/api/image-tasks/generations"):
            return self._generation(record)
        if (method, path) == ("POST", "/api/image-tasks/edits"):
            return self._edit(record)
        if (method, path) == ("GET", "/api/image-tasks"):
            return self._listing(record)
        if (method, path) == ("GET", "/v1/models"):
            models = [
                {"id": m, "object": "model", "created": 1_700_000_000, "owned_by": "chatgpt2api"}
                for m in self.models
            ]
            return _json_response({"object": "list", "data": models})
        if (method, path) == ("POST", CHAT_PATH):
            return self._chat(record)
        return _error(f"no route for {method} {path}", 404)

    def _generation(self, record: RecordedRequest) -> web.Response:
        payload = record.json
        if not isinstance(payload, dict):
            return _error("body must be a JSON object", 400)
        problem = self._check_submission(payload.get("client_task_id"), payload.get("prompt"))
        if problem:
            return _error(problem, 400)
        task = self._submit(
            payload["client_task_id"],
            mode="generate",
            model=payload.get("model"),
            size=payload.get("size"),
        )
        return _json_response(task)

    def _edit(self, record: RecordedRequest) -> web.Response:
        if record.parse_error or not (record.form or record.files):
            return _error(f"multipart body expected ({record.parse_error})", 400)
        form = record.form
        problem = self._check_submission(form.get("client_task_id"), form.get("prompt"))
        if problem:
            return _error(problem, 400)
        image = record.files.get("image")
        if image is None or not image.data:
            return _error("image file is required", 400)
        task = self._submit(
            form["client_task_id"], mode="edit", model=form.get("model"), size=form.get("size")
        )
        return _json_response(task)

    @staticmethod
    def _check_submission(task_id: Any, prompt: Any) -> str | None:
        if not isinstance(task_id, str) or not task_id.strip():
            return "client_task_id is required"
        if not isinstance(prompt, str) or not prompt.strip():
            return "prompt is required"
        return None

    def _listing(self, record: RecordedRequest) -> web.Response:
        ids = list(dict.fromkeys(i.strip() for i in record.query.get("ids", "").split(",")))
        ids = [i for i in ids if i]
        with self._lock:
            items = [copy.deepcopy(self._tasks[i]) for i in ids if i in self._tasks]
            missing = [i for i in ids if i not in self._tasks]
        return _json_response({"items": items, "missing_ids": missing})

    # ------------------------------------------------------------ chat

    def _chat(self, record: RecordedRequest) -> _Reply:
        payload = record.json
        if not isinstance(payload, dict) or not isinstance(payload.get("messages"), list):
            return _error("body must be a JSON object with messages", 400)
        model = str(payload.get("model") or "gpt-5.5")
        chunks = list(self.chat_chunks)
        if payload.get("stream") is not True:
            return _json_response(self._completion(model, "".join(chunks)))
        return self._chat_streamer(model, chunks)

    @staticmethod
    def _completion(model: str, content: str) -> dict[str, Any]:
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                }
            ],
        }

    @staticmethod
    def _chunk_frame(model: str, delta: dict[str, Any], finish: str | None = None) -> bytes:
        return _sse(
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
        )

    def _chat_streamer(self, model: str, chunks: list[str]) -> _Streamer:
        delay, fail_after = self.chat_chunk_delay, self.chat_fail_after
        content_type = self.chat_content_type
        if self.chat_raw is not None:
            return self._raw_streamer(list(self.chat_raw))

        async def stream(request: web.Request) -> web.StreamResponse:
            if not content_type.startswith("text/event-stream"):
                body = json.dumps(self._completion(model, "".join(chunks))).encode()
                return web.Response(body=body, headers={"Content-Type": content_type})
            response = web.StreamResponse(
                headers={"Content-Type": content_type, "Cache-Control": "no-cache"}
            )
            try:
                await response.prepare(request)
                for index, text in enumerate(chunks):
                    if index == fail_after:
                        self._close_connection(request)
                        return response
                    if index and delay:
                        await asyncio.sleep(delay)
                    delta = (
                        {"role": "assistant", "content": text} if index == 0 else {"content": text}
                    )
                    await response.write(self._chunk_frame(model, delta))
                    self.chunk_sent_times.append(time.monotonic())
                if fail_after == len(chunks):
                    self._close_connection(request)
                    return response
                await response.write(self._chunk_frame(model, {}, "stop"))
                await response.write(b"data: [DONE]\n\n")
                await response.write_eof()
            except ConnectionResetError:
                self._note_stream_closed()
            except asyncio.CancelledError:
                self._note_stream_closed()
                raise
            return response

        return stream

    def _raw_streamer(self, pieces: list[bytes]) -> _Streamer:
        delay, forever = self.chat_raw_delay, self.chat_raw_forever

        async def stream(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            try:
                await response.prepare(request)
                for index, piece in enumerate(pieces):
                    if index and delay:
                        await asyncio.sleep(delay)
                    await response.write(piece)
                while forever and pieces:
                    await asyncio.sleep(delay or 0.01)
                    await response.write(pieces[-1])
                await response.write_eof()
            except ConnectionResetError:
                self._note_stream_closed()
            except asyncio.CancelledError:
                self._note_stream_closed()
                raise
            return response

        return stream

    def _note_stream_closed(self) -> None:
        if not self._stopping:
            self.stream_closed.set()

    @staticmethod
    def _close_connection(request: web.Request) -> None:
        # close() (not abort()) so bytes already written still reach the client.
        if request.transport is not None:
            request.transport.close()

    # ------------------------------------------------------------ files (server side)

    def _file_streamer(self, name: str) -> _Reply:
        with self._lock:
            spec = self._files.get(name)
        if spec is None:
            return _error("file not found", 404)

        async def stream(request: web.Request) -> web.StreamResponse:
            response: web.StreamResponse
            if spec.content_type is None:
                response = _NoContentTypeResponse()
            else:
                response = web.StreamResponse(headers={"Content-Type": spec.content_type})
            if spec.content_encoding:
                response.headers["Content-Encoding"] = spec.content_encoding
            if spec.declare_length:
                response.content_length = spec.size
            else:
                response.enable_chunked_encoding()
            try:
                await response.prepare(request)
                if request.method == "HEAD":
                    return response
                for offset in range(0, spec.size, spec.chunk_size):
                    if offset and spec.chunk_delay:
                        await asyncio.sleep(spec.chunk_delay)
                    await response.write(spec.read(offset, spec.chunk_size))
                await response.write_eof()
            except ConnectionResetError:
                pass  # the client went away; nothing to answer
            return response

        return stream

    async def _send_raw(self, request: web.Request, raw: RawAnswer) -> None:
        transport = request.transport
        try:
            for index, piece in enumerate(raw.pieces):
                if index and raw.pause:
                    await asyncio.sleep(raw.pause)
                if transport is None or transport.is_closing():
                    return
                transport.write(piece)
            if raw.hold:
                # silent until the client goes (which cancels this handler) or the cap
                await asyncio.sleep(_RAW_HOLD_CAP)
        finally:
            self._close_connection(request)

    # ------------------------------------------------------------ fault responses

    async def _apply_fault(
        self, request: web.Request, fault: _Fault, reply: _Reply | None
    ) -> web.StreamResponse:
        is_chat = request.path.startswith(CHAT_PATH)
        if fault.kind == "fail":
            return web.Response(
                status=fault.status, body=fault.body, headers={"Content-Type": fault.content_type}
            )
        if fault.kind == "garbage":
            if is_chat:
                body = b"data: {this is not json\n\ndata: [DONE]\n\n"
                return web.Response(body=body, headers={"Content-Type": "text/event-stream"})
            return web.Response(
                body=b'{"items": [<html>oops', headers={"Content-Type": "application/json"}
            )
        if fault.kind == "wrong_shape":
            if is_chat:
                body = _sse(fault.payload) + b"data: [DONE]\n\n"
                return web.Response(body=body, headers={"Content-Type": "text/event-stream"})
            return _json_response(fault.payload)
        if fault.kind == "drop":
            self._close_connection(request)
            return web.Response()  # never sent: the transport is closed
        if fault.kind == "truncate":
            return await self._send_truncated(request, reply)
        if fault.kind == "never_end":
            return await self._send_never_ending(request, is_chat)
        raise AssertionError(f"unknown fault {fault.kind}")

    async def _send_truncated(
        self, request: web.Request, reply: _Reply | None
    ) -> web.StreamResponse:
        content_type = "application/json"
        full = b'{"id": "truncated-task", "status": "queued", "data": []}'
        declared: int | None = None
        if isinstance(reply, web.Response) and isinstance(reply.body, bytes):
            full = reply.body
        if request.path.startswith(FILES_PREFIX):
            with self._lock:
                spec = self._files.get(request.path[len(FILES_PREFIX) :])
            if spec is not None:
                declared = spec.size
                full = spec.read(0, min(spec.size, 2 * 64 * 1024))
                content_type = spec.content_type or "application/octet-stream"
        partial = full[: max(1, len(full) // 2)]
        response = web.StreamResponse(headers={"Content-Type": content_type})
        response.content_length = max(declared or len(full), len(partial) + 1)
        try:
            await response.prepare(request)
            await response.write(partial)
        except ConnectionResetError:
            return response
        self._close_connection(request)
        return response

    async def _send_never_ending(self, request: web.Request, is_chat: bool) -> web.StreamResponse:
        content_type = "text/event-stream" if is_chat else "application/json"
        first = self._chunk_frame("gpt-5.5", {"role": "assistant", "content": "A "})
        response = web.StreamResponse(headers={"Content-Type": content_type})
        response.enable_chunked_encoding()
        try:
            await response.prepare(request)
            await response.write(first if is_chat else b'{"items": [')
            await asyncio.Event().wait()  # until stop() or the client cancels us
        except ConnectionResetError:
            if is_chat:
                self._note_stream_closed()
        except asyncio.CancelledError:
            if is_chat:
                self._note_stream_closed()
            raise
        return response
