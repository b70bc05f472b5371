"""Everything the sync and async clients share and that does no network I/O.

Building requests, the fingerprint store, parsing envelopes into `Task` and `Quota`,
mapping failures to exceptions (`error_for`, `failure`, `transport_errors`), reading
SSE lines into text deltas, the bookkeeping of `wait()` and the file a download goes to.
`Client` and `AsyncClient` only add the sending, the reading and the sleeping.
"""

from __future__ import annotations

import datetime as dt
import json
import mimetypes
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, TypeGuard, cast
from urllib.parse import quote

import httpx
import platformdirs

from ._errors import (
    ClientError,
    ConnectionFailed,
    InvalidInputError,
    NoCreditsError,
    NotFoundError,
    ServerError,
    WaitTimeout,
)

DEFAULT_SERVER = "http://127.0.0.1:3000"
# A generate answers within the server's submit timeout (60 s by default) plus a margin:
# wait longer than that before calling it lost, then ask again with the same key.
GENERATE_TIMEOUT = 90.0
GENERATE_ATTEMPTS = 5
# how long a generate keeps coming back while the server says its key is in progress: past a
# crashed request's lease (SCENEMINT_LEASE_SECONDS, 30 s by default) with room to spare
IN_PROGRESS_RETRY_SECONDS = 90.0
CONFIG_DIR_ENV = "SCENEMINT_CONFIG_DIR"
FINGERPRINT_FILE = "fingerprint"
SIZES = ("1:1", "16:9", "9:16")
USER_AGENT = "scenemint-client/0.1"

TaskStatus = Literal["queued", "running", "completed", "failed"]
# what `generate(reference=...)` takes: a path, the bytes, or a binary file object
Reference = str | os.PathLike[str] | bytes | IO[bytes]
OnUpdate = Callable[["Task"], object]

_STATUSES: frozenset[str] = frozenset({"queued", "running", "completed", "failed"})
_FINGERPRINT = re.compile(r"[A-Za-z0-9_-]{8,256}")
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class Task:
    """A generation task as the server reports it.

    `prompt` and `remaining_credits` are only known from the `generate()` answer;
    `image` is the server path of the image, present once the task is completed.
    """

    id: str
    status: TaskStatus
    mode: str = "text"
    size: str | None = None
    image: str | None = None
    error: str | None = None
    revised_prompt: str | None = None
    created_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None
    prompt: str | None = None
    remaining_credits: int | None = None

    @property
    def finished(self) -> bool:
        return self.status in ("completed", "failed")

    @classmethod
    def from_json(cls, data: Any) -> Task:
        """Read the `data` of a task answer; raises ServerError when it is not a task."""
        if not isinstance(data, dict) or not isinstance(data.get("id"), str):
            raise ServerError("the server answered something that is not a task", code="bad_answer")
        credits = data.get("remainingCredits")
        return cls(
            id=data["id"],
            status=_status(data.get("status")),
            mode=_text(data.get("mode")) or "text",
            size=_text(data.get("size")),
            image=_text(data.get("image")),
            error=_text(data.get("error")),
            revised_prompt=_text(data.get("revisedPrompt")),
            created_at=_moment(data.get("createdAt")),
            updated_at=_moment(data.get("updatedAt")),
            prompt=_text(data.get("prompt")),
            remaining_credits=credits if _is_int(credits) else None,
        )

    def to_json(self) -> dict[str, Any]:
        """The server's JSON shape (camelCase keys, empty fields left out)."""
        out: dict[str, Any] = {
            "id": self.id,
            "mode": self.mode,
            "prompt": self.prompt,
            "size": self.size,
            "image": self.image,
            "status": self.status,
            "error": self.error,
            "revisedPrompt": self.revised_prompt,
            "createdAt": _rfc3339(self.created_at),
            "updatedAt": _rfc3339(self.updated_at),
            "remainingCredits": self.remaining_credits,
        }
        return {key: value for key, value in out.items() if value is not None}


@dataclass(frozen=True, slots=True)
class Quota:
    """A fingerprint's credits: `signed_today` says whether today's grant was taken."""

    balance: int
    signed_today: bool
    cap: int
    daily_grant: int

    @classmethod
    def from_json(cls, data: Any) -> Quota:
        if not isinstance(data, dict):
            raise ServerError(
                "the server answered something that is not a quota", code="bad_answer"
            )
        balance, cap, grant = data.get("balance"), data.get("cap"), data.get("dailyGrant")
        signed = data.get("signedToday")
        if not (_is_int(balance) and _is_int(cap) and _is_int(grant) and isinstance(signed, bool)):
            raise ServerError(
                "the server answered something that is not a quota", code="bad_answer"
            )
        return cls(balance=balance, signed_today=signed, cap=cap, daily_grant=grant)


def _status(value: object) -> TaskStatus:
    # the server's own rule: a status it does not know means "keep polling"
    return cast(TaskStatus, value) if isinstance(value, str) and value in _STATUSES else "queued"


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _moment(value: object) -> dt.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return dt.datetime.fromisoformat(value)
    except ValueError:
        return None


def _rfc3339(moment: dt.datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.isoformat().replace("+00:00", "Z")


# --------------------------------------------------------------------------- fingerprint


def config_dir() -> Path:
    """Where the client keeps its state: `$SCENEMINT_CONFIG_DIR`, else the user config dir."""
    override = os.environ.get(CONFIG_DIR_ENV, "").strip()
    return Path(override) if override else Path(platformdirs.user_config_dir("scenemint"))


def stored_fingerprint(directory: str | os.PathLike[str] | None = None) -> str:
    """This user's fingerprint: read from `<config dir>/fingerprint`, created on first use.

    The fingerprint is what the server keeps credits under, so it must stay the same
    from one run to the next; it is made once, at random, and never changed.
    """
    path = (Path(directory) if directory is not None else config_dir()) / FINGERPRINT_FILE
    found = _read_fingerprint(path)
    if found is not None:
        return found
    fresh = "cli-" + secrets.token_hex(16)
    try:
        _store_fingerprint(path, fresh, replace=path.exists())
    except OSError as exc:
        raise ClientError(
            f"cannot store the fingerprint in {path}: {exc.strerror or exc}",
            code="config_not_writable",
        ) from exc
    return _read_fingerprint(path) or fresh


def _read_fingerprint(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text if _FINGERPRINT.fullmatch(text) else None


def _store_fingerprint(path: Path, value: str, *, replace: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    # written whole before it appears under its name, readable by the user only
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(value + "\n")
        if replace:  # an unreadable file: nothing can be lost by replacing it
            os.replace(temporary, path)
        else:
            # fails when another process stored one first: keep theirs, one per user
            with suppress(FileExistsError):
                os.link(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True)
class Call:
    """One request to make: what `Client` and `AsyncClient` send, each in its own way."""

    method: str
    path: str
    json: dict[str, Any] | None = None
    data: dict[str, str] | None = None
    files: dict[str, tuple[str, bytes, str]] | None = None
    headers: dict[str, str] | None = None
    timeout: float | None = None  # this call's own, else the client's


@dataclass(frozen=True, slots=True)
class ReferencePart:
    """A reference image read into memory, ready to be a multipart file part."""

    filename: str
    data: bytes
    content_type: str


def normalize_server(server: str) -> str:
    """The server URL without a trailing `/`; InvalidInputError unless it is http(s)."""
    text = server.strip().rstrip("/")
    try:
        url = httpx.URL(text)
    except httpx.InvalidURL as exc:
        raise InvalidInputError(f"not a server URL: {server!r}", code="invalid_server") from exc
    if url.scheme not in ("http", "https") or not url.host:
        raise InvalidInputError(
            f"not a server URL: {server!r} (expected http://host:port)", code="invalid_server"
        )
    return text


def read_reference(reference: Reference) -> ReferencePart:
    """Read a reference image given as a path, bytes or a binary file object."""
    name: object = None
    if isinstance(reference, bytes | bytearray | memoryview):
        data = bytes(reference)
    elif isinstance(reference, str | os.PathLike):
        path = Path(reference)
        name = path.name
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise InvalidInputError(
                f"cannot read the reference image {str(path)!r}: {exc.strerror or exc}",
                code="reference_unreadable",
            ) from exc
    else:
        name = getattr(reference, "name", None)
        content = reference.read()
        if not isinstance(content, bytes):
            raise InvalidInputError(
                "the reference image file must be opened in binary mode ('rb')",
                code="reference_unreadable",
            )
        data = content
    filename = os.path.basename(name) if isinstance(name, str) else ""
    content_type = _sniff(data) or mimetypes.guess_type(filename)[0] or "application/octet-stream"
    if not filename:
        filename = "reference." + (content_type.split("/")[-1] if "/" in content_type else "bin")
    return ReferencePart(filename=filename, data=data, content_type=content_type)


def _sniff(data: bytes) -> str | None:
    for signature, mime in _SIGNATURES:
        if data.startswith(signature):
            return mime
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def check_size(size: str) -> str:
    if size not in SIZES:
        raise InvalidInputError(
            f"size must be one of {', '.join(SIZES)} (got {size!r})", code="invalid_size"
        )
    return size


class BaseClient:
    """The state and the request building shared by `Client` and `AsyncClient`."""

    def __init__(
        self,
        server: str = DEFAULT_SERVER,
        *,
        fingerprint: str | None = None,
        config_dir: str | os.PathLike[str] | None = None,
        timeout: float = 30.0,
        generate_timeout: float = GENERATE_TIMEOUT,
    ) -> None:
        self.server = normalize_server(server)
        self.timeout = timeout
        self.generate_timeout = generate_timeout
        self._fingerprint = fingerprint
        self._config_dir = config_dir

    @property
    def fingerprint(self) -> str:
        """The fingerprint given, or the one stored for this user (created on first use)."""
        if self._fingerprint is None:
            self._fingerprint = stored_fingerprint(self._config_dir)
        return self._fingerprint

    def _http_options(self) -> dict[str, Any]:
        return {
            "base_url": self.server,
            "timeout": httpx.Timeout(self.timeout),
            "headers": {"User-Agent": USER_AGENT, "Accept": "application/json"},
        }

    def _quota_call(self) -> Call:
        return Call("POST", "/api/quota/status", json={"fingerprint": self.fingerprint})

    def _check_in_call(self) -> Call:
        return Call("POST", "/api/quota/check-in", json={"fingerprint": self.fingerprint})

    def _generate_call(
        self, prompt: str, *, size: str, reference: ReferencePart | None, key: str
    ) -> Call:
        fields = {"prompt": prompt, "size": check_size(size), "fingerprint": self.fingerprint}
        headers = {"Idempotency-Key": key}
        timeout = max(self.timeout, self.generate_timeout)
        path = "/api/images/generate"
        if reference is None:
            return Call("POST", path, json=fields, headers=headers, timeout=timeout)
        part = (reference.filename, reference.data, reference.content_type)
        return Call(
            "POST", path, data=fields, files={"image": part}, headers=headers, timeout=timeout
        )

    def _task_call(self, task_id: str, *, timeout: float | None = None) -> Call:
        return Call("GET", f"/api/images/tasks/{_segment(task_id)}", timeout=timeout)

    def _wait_poll_call(self, task_id: str, polling: Polling) -> Call:
        """A poll of `wait()`: it may not outlive the wait's deadline."""
        return self._task_call(task_id, timeout=max(0.01, min(self.timeout, polling.left())))

    def _events_call(self, task_id: str) -> Call:
        return Call(
            "GET",
            f"/api/images/tasks/{_segment(task_id)}/events",
            headers={"Accept": "text/event-stream"},
        )

    def _events_read(self, polling: Polling) -> float:
        """How long one read of a task's event stream may wait: through no silence longer
        than a proxy holding the stream back makes, and never past the wait's deadline."""
        return max(0.01, min(EVENTS_SILENCE, polling.left()))

    def _events_reopen(self, polling: Polling, read: float) -> bool:
        """The stream reads with the silence bound and the deadline is now nearer than that:
        open it again, bounded by what is left."""
        return read >= EVENTS_SILENCE and polling.left() < read

    def _events_timeout(self, read: float) -> httpx.Timeout:
        return httpx.Timeout(self.timeout, read=read)

    def _image_call(self, task_id: str) -> Call:
        return Call("GET", f"/api/images/tasks/{_segment(task_id)}/image")

    def _enhance_call(self, prompt: str, direction: str) -> Call:
        return Call("POST", "/api/prompts/enhance", json={"prompt": prompt, "direction": direction})

    def _request_options(self, call: Call) -> dict[str, Any]:
        """Keyword arguments for httpx's `request()` / `stream()`."""
        options: dict[str, Any] = {"method": call.method, "url": call.path}
        if call.headers is not None:
            options["headers"] = call.headers
        if call.timeout is not None:
            options["timeout"] = httpx.Timeout(call.timeout)
        if call.json is not None:
            options["json"] = call.json
        if call.data is not None:
            options["data"] = call.data
        if call.files is not None:
            options["files"] = call.files
        return options

    def _data(self, response: httpx.Response) -> Any:
        return parse_envelope(response.status_code, response.content, server=self.server)

    def _failure(self, response: httpx.Response) -> ClientError:
        return failure(response.status_code, response.content, server=self.server)


def _segment(task_id: str) -> str:
    # an id is one path segment, whatever it contains
    return quote(task_id, safe="")


# --------------------------------------------------------------------------- answers


def error_for(
    status: int | None, code: str, message: str, *, retry_after: float | None = None
) -> ClientError:
    """The exception for an error answer: the class by HTTP status (and the no-credits code)."""
    kind: type[ClientError]
    if code == "no_credits" or status == 402:
        kind = NoCreditsError
    elif status in (400, 413, 422):
        kind = InvalidInputError
    elif status == 404:
        kind = NotFoundError
    elif status is not None and status >= 500:
        kind = ServerError
    else:
        kind = ClientError
    return kind(message, code=code, status=status, retry_after=retry_after)


def failure(status: int, content: bytes, *, server: str) -> ClientError:
    """The exception for an answer that is not a success envelope."""
    envelope = _json_object(content)
    if envelope is not None and isinstance(envelope.get("error"), str):
        message = envelope.get("message")
        text = message if isinstance(message, str) and message else envelope["error"]
        wait = envelope.get("retryAfter")
        retry_after = float(wait) if _is_int(wait) and 0 < wait <= 3600 else None
        return error_for(status, envelope["error"], " ".join(text.split()), retry_after=retry_after)
    if 200 <= status < 300:
        return ServerError(
            f"{server} did not answer like a SceneMint server", code="bad_answer", status=status
        )
    return error_for(
        status,
        f"http_{status}",
        f"{server} answered HTTP {status} without a SceneMint error (is it a SceneMint server?)",
    )


def parse_envelope(status: int, content: bytes, *, server: str) -> Any:
    """The `data` of a success envelope; raises the mapped ClientError otherwise."""
    envelope = _json_object(content)
    if 200 <= status < 300 and envelope is not None and envelope.get("code") == 0:
        return envelope.get("data")
    raise failure(status, content, server=server)


def _json_object(content: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


@contextmanager
def transport_errors(server: str) -> Iterator[None]:
    """Turn httpx's transport failures into ConnectionFailed: the one place that does it."""
    try:
        yield
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.UnsupportedProtocol) as exc:
        raise ConnectionFailed(
            f"cannot reach the SceneMint server at {server} (is `scenemint serve` running?)",
            code="unreachable",
        ) from exc
    except httpx.TimeoutException as exc:
        raise ConnectionFailed(
            f"the SceneMint server at {server} did not answer in time", code="timeout"
        ) from exc
    except httpx.TransportError as exc:
        raise ConnectionFailed(
            f"lost the connection to the SceneMint server at {server} ({type(exc).__name__})",
            code="connection_lost",
        ) from exc


# --------------------------------------------------------------------------- generate retries


def new_idempotency_key() -> str:
    """A fresh Idempotency-Key: one per generate, reused by its retries."""
    return "scenemint-client-" + secrets.token_urlsafe(18)


# what a retry with the same Idempotency-Key can fix: the answer was lost (a timeout, a
# broken connection), the first request is still being worked on, the database hiccupped
_RETRIED_CODES = frozenset({"timeout", "connection_lost"})
_RETRIED_SERVER_CODES = frozenset({"store_unavailable", "http_502", "http_503", "http_504"})


class GenerateRetries:
    """The bookkeeping of a generate retried with its Idempotency-Key: safe, because the
    server answers a repeated key with the first request's task and never charges twice.

    A lost answer (a timeout, a dropped connection) or a passing server failure is tried
    again `attempts` times in all, with a growing pause (at most 30 s). `409
    idempotency_in_progress` — the first request is still being worked on, or it crashed
    and its lease (30 s on the server by default) has not lapsed — is tried again as the
    server's `Retry-After` says for `in_progress_for` seconds after the first such answer:
    then the task is taken over and answered (the server keeps an unanswered task for its
    client for `SCENEMINT_HANDOFF_GRACE`, 60 s, longer than any pause here)."""

    def __init__(
        self,
        *,
        attempts: int = GENERATE_ATTEMPTS,
        in_progress_for: float = IN_PROGRESS_RETRY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.attempts = attempts
        self.attempt = 1
        self._in_progress_for = in_progress_for
        self._in_progress_until: float | None = None
        self._clock = clock

    def pause(self, error: ClientError) -> float:
        """Seconds to wait before the next attempt; re-raises `error` when it is not worth it."""
        if error.code == "idempotency_in_progress":
            now = self._clock()
            if self._in_progress_until is None:
                self._in_progress_until = now + self._in_progress_for
            wait = min(error.retry_after or 1.0, 30.0)
            if now + wait > self._in_progress_until:
                raise error
            return wait
        retried = error.code in _RETRIED_CODES or (
            isinstance(error, ServerError) and error.code in _RETRIED_SERVER_CODES
        )
        if not retried or self.attempt >= self.attempts:
            raise error
        self.attempt += 1
        backoff = 0.5 * 2 ** (self.attempt - 2)
        return min(error.retry_after or backoff, 30.0)


# --------------------------------------------------------------------------- enhance stream


class DeltaReader:
    """Reads the lines of the enhance SSE stream into text deltas.

    `feed()` gives the text of a line (None for comments, pings and empty deltas);
    an error frame raises ServerError. `end()` raises unless `[DONE]` was seen.
    """

    def __init__(self) -> None:
        self.done = False

    def feed(self, line: str) -> str | None:
        if not line.startswith("data:"):
            return None
        payload = line[5:].strip()
        if payload == "[DONE]":
            self.done = True
            return None
        frame = _json_object(payload.encode())
        if frame is None:
            raise ServerError("the enhancement stream sent a broken frame", code="bad_stream")
        if "error" in frame:
            error = frame["error"]
            message = error.get("message") if isinstance(error, dict) else None
            raise ServerError(
                message if isinstance(message, str) and message else "the enhancement failed",
                code="stream_failed",
                status=200,
            )
        choices = frame.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return None
        delta = choices[0].get("delta")
        content = delta.get("content") if isinstance(delta, dict) else None
        return content if isinstance(content, str) and content else None

    def end(self) -> None:
        if not self.done:
            raise ServerError("the enhancement stream ended early", code="stream_incomplete")


# --------------------------------------------------------------------------- task events

# a server sends a task's answer at once and a comment every 15 s (by default) while nothing
# changes: silence this long means a proxy holds the stream back (or the server is gone), and
# `wait()` polls instead
EVENTS_SILENCE = 20.0


class BrokenStream(Exception):
    """An event that is not a task's JSON (a proxy rewrote the stream?): `wait()` polls."""


class EventReader:
    """Reads the lines of a task's event stream (`/api/images/tasks/{id}/events`) into tasks:
    `feed()` gives the task of a `data:` line, None for anything else (comments, ids)."""

    def feed(self, line: str) -> Task | None:
        if not line.startswith("data:"):
            return None
        try:
            return Task.from_json(json.loads(line[5:].strip()))
        except (ValueError, ServerError):
            raise BrokenStream("an event that is not a task") from None


def is_event_stream(response: httpx.Response) -> bool:
    """A server that knows task events answers them as a stream; an older one (or a proxy
    that does not pass them) answers something else, and `wait()` polls."""
    content_type = response.headers.get("content-type", "")
    return response.status_code == 200 and content_type.startswith("text/event-stream")


# --------------------------------------------------------------------------- wait


class Polling:
    """The bookkeeping of `wait()`: status changes, the deadline and the next pause."""

    def __init__(
        self,
        task_id: str,
        *,
        timeout: float,
        poll_interval: float,
        on_update: OnUpdate | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if timeout <= 0 or poll_interval <= 0:
            raise ValueError("timeout and poll_interval must be positive")
        self.task_id = task_id
        self.timeout = timeout
        self.poll_interval = poll_interval
        self._on_update = on_update
        self._clock = clock
        self._deadline = clock() + timeout
        self._status: str | None = None

    def seen(self, task: Task) -> bool:
        """Note a polled task (calling on_update when its status changed); True when finished."""
        if task.status != self._status:
            self._status = task.status
            if self._on_update is not None:
                self._on_update(task)
        return task.finished

    def check(self) -> None:
        """Raise WaitTimeout once time is up."""
        self.pause()

    def rides_out(self, error: ClientError) -> bool:
        """A failure the wait polls through until its deadline: the server slow, cut off or
        restarting (refusing connections only once it has answered about the task: a server
        that is not there at all is said at once), or unable to ask the upstream for a while
        (502, 504, a 503 that is not a missing configuration). The task is the server's: it
        goes on without us."""
        if isinstance(error, ConnectionFailed):
            return error.code != "unreachable" or self._status is not None
        if isinstance(error, ServerError):
            if error.status in (502, 504):
                return True
            return error.status == 503 and not error.code.endswith("_not_configured")
        return False

    def left(self) -> float:
        """Seconds before the wait's deadline."""
        return self._deadline - self._clock()

    def pause(self) -> float:
        """Seconds to sleep before the next poll; raises WaitTimeout once time is up."""
        left = self._deadline - self._clock()
        if left <= 0:
            raise WaitTimeout(
                f"task {self.task_id} did not finish within {self.timeout:g}s "
                f"(last seen {self._status})",
                code="wait_timeout",
            )
        return min(self.poll_interval, left)


# --------------------------------------------------------------------------- download


@dataclass
class ImageFile:
    """The file a download is written to: a temporary file beside it, renamed at the end,
    so that a failed download never leaves a partial image under the name asked for."""

    path: Path
    _temporary: Path | None = field(default=None, init=False)
    _handle: IO[bytes] | None = field(default=None, init=False)

    def __enter__(self) -> ImageFile:
        self._temporary = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}.part")
        try:
            self._handle = open(self._temporary, "xb")  # closed in __exit__
        except OSError as exc:
            raise self._unwritable(exc) from exc
        return self

    def write(self, chunk: bytes) -> None:
        assert self._handle is not None
        try:
            self._handle.write(chunk)
        except OSError as exc:
            raise self._unwritable(exc) from exc

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._handle is not None and self._temporary is not None
        try:
            self._handle.close()
            if kind is None:
                os.replace(self._temporary, self.path)
        except OSError as error:
            raise self._unwritable(error) from error
        finally:
            self._temporary.unlink(missing_ok=True)

    def _unwritable(self, exc: OSError) -> InvalidInputError:
        return InvalidInputError(
            f"cannot write {str(self.path)!r}: {exc.strerror or exc}", code="output_not_writable"
        )
