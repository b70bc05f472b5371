"""All HTTP to chatgpt2api lives here: one pooled aiohttp session, one place that translates
aiohttp's errors into ours, one place that logs upstream calls.

Every request to the upstream's own origin carries `Authorization: Bearer <key>`. The key
never goes to any other origin (an image host), and never into a log line or an error:
`_redact` scrubs it from anything we log.

Failure policy: submissions are retried on connection errors and 502/503/504 with jittered
backoff (safe: `client_task_id` makes them idempotent), polls once, nothing on other 4xx.
A circuit breaker fails calls fast for a cool-down after repeated failures, instead of
letting requests pile up behind a dead upstream.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
from yarl import URL

from .config import Settings
from .errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from .metrics import Metrics
from .models import TaskListing, UpstreamTask

log = logging.getLogger("scenemint.upstream")

_LOGGED_BODY_CHARS = 300
_MAX_JSON_BYTES = 8 * 1024 * 1024  # an upstream answer larger than this is not a task listing
_MAX_REDIRECTS = 3
_BACKOFF = 0.2  # seconds before the first retry; doubled each time, with jitter


@dataclass(frozen=True, slots=True)
class ImageResponse:
    """An open upstream image download; the caller iterates `chunks` and the context closes it."""

    content_type: str | None
    content_length: int | None
    chunks: AsyncIterator[bytes]


def origin_of(url: str) -> str | None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.scheme}://{parts.hostname.lower()}:{port}"


class CircuitBreaker:
    """Open after `threshold` consecutive failures; while open, calls fail at once.

    After `cooldown` seconds calls go through again; the first failure re-opens it, the
    first success closes it.
    """

    def __init__(
        self, *, threshold: int, cooldown: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._threshold = threshold
        self._cooldown = cooldown
        self._clock = clock
        self._failures = 0
        self._open_until = 0.0

    @property
    def is_open(self) -> bool:
        return self._clock() < self._open_until

    def check(self) -> None:
        if self.is_open:
            raise UpstreamUnavailable(
                detail="circuit open: upstream failed repeatedly", reason="breaker"
            )

    def record(self, *, ok: bool) -> None:
        if ok:
            self._failures = 0
            return
        self._failures += 1
        if self._failures >= self._threshold:
            if not self.is_open:
                log.error(
                    "upstream failed %d times in a row: failing fast for %.0f s",
                    self._failures,
                    self._cooldown,
                )
            self._open_until = self._clock() + self._cooldown


class UpstreamClient:
    """The chatgpt2api client: submit, list, download, stream. `open()` it, `close()` it."""

    def __init__(
        self,
        *,
        settings: Settings,
        session: aiohttp.ClientSession,
        metrics: Metrics | None = None,
    ) -> None:
        root, key = settings.upstream_root, settings.api_key
        if root is None or key is None:
            raise ValueError("the upstream base URL and key are both required")
        self._settings = settings
        self._session = session
        self.root = root
        self._key = key
        self._origin = origin_of(root)
        self._image_origins = {self._origin} | {origin_of(h) for h in settings.image_hosts}
        self._image_origins.discard(None)
        self._metrics = metrics or Metrics()
        self.breaker = CircuitBreaker(
            threshold=settings.breaker_threshold, cooldown=settings.breaker_cooldown
        )

    @classmethod
    def open(cls, settings: Settings, *, metrics: Metrics | None = None) -> UpstreamClient:
        """One pooled keep-alive session for the whole process (create inside a running loop)."""
        connector = aiohttp.TCPConnector(
            limit=settings.upstream_pool_size,
            keepalive_timeout=30,
            ttl_dns_cache=300,
        )
        session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            auto_decompress=True,
        )
        return cls(settings=settings, session=session, metrics=metrics)

    async def close(self) -> None:
        await self._session.close()

    # -- the task API ------------------------------------------------------------

    async def submit_generation(
        self, *, task_id: str, prompt: str, size: str, time_limit: float | None = None
    ) -> UpstreamTask:
        """One submission attempt (the caller retries: `client_task_id` makes that safe)."""
        body = {
            "client_task_id": task_id,
            "prompt": prompt,
            "model": self._settings.image_model,
            "size": size,
        }
        answer = await self._call_json(
            "submit",
            "POST",
            "/api/image-tasks/generations",
            data=json.dumps(body, ensure_ascii=False).encode(),
            content_type="application/json",
            limits=self._timeout(time_limit or self._settings.submit_timeout),
        )
        return self._task(answer, expected_id=task_id)

    async def submit_edit(
        self,
        *,
        task_id: str,
        prompt: str,
        size: str,
        image: bytes,
        filename: str,
        content_type: str,
        time_limit: float | None = None,
    ) -> UpstreamTask:
        """One edit submission attempt, multipart with a known Content-Length."""
        fields = {
            "client_task_id": task_id,
            "prompt": prompt,
            "model": self._settings.image_model,
            "size": size,
        }
        body, multipart_type = encode_multipart(
            fields, file_field="image", filename=filename, content_type=content_type, data=image
        )
        answer = await self._call_json(
            "submit",
            "POST",
            "/api/image-tasks/edits",
            data=body,
            content_type=multipart_type,
            limits=self._timeout(time_limit or self._settings.submit_timeout),
        )
        return self._task(answer, expected_id=task_id)

    async def list_tasks(self, ids: list[str]) -> TaskListing:
        path = "/api/image-tasks?ids=" + ",".join(quote(i, safe="") for i in ids)
        answer = await self._call_json(
            "list", "GET", path, limits=self._timeout(self._settings.poll_timeout), attempts=2
        )
        try:
            listing = TaskListing.from_json(answer)
        except ValueError as exc:
            raise self._fail("list", "invalid", f"unexpected listing: {exc}") from exc
        items = {task_id: self._scrub(task) for task_id, task in listing.items.items()}
        return TaskListing(items=items, missing=listing.missing)

    async def check(self) -> None:
        """A cheap authenticated call, for readiness: raises when the upstream cannot serve us."""
        await self._call_json(
            "models", "GET", "/v1/models", limits=self._timeout(self._settings.poll_timeout)
        )

    # -- streams -------------------------------------------------------------------

    @asynccontextmanager
    async def open_image(self, url: str) -> AsyncIterator[ImageResponse]:
        """Download an image by URL, following redirects only within allowed origins."""
        self.breaker.check()
        # the first byte and the gaps between chunks have their own limits (asyncio timeouts
        # below): aiohttp's sock_read cannot tell the two apart
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self._settings.connect_timeout)
        started = time.perf_counter()
        response: aiohttp.ClientResponse | None = None
        with self._translate("image", started, ambiguous_after_send=False):
            for _ in range(_MAX_REDIRECTS + 1):
                origin = origin_of(url)
                if origin is None or origin not in self._image_origins:
                    # our refusal, not an upstream failure: it must not open the breaker
                    raise self._fail(
                        "image", "forbidden", f"image origin not allowed: {origin}", count=False
                    )
                headers = self._auth_headers() if origin == self._origin else {}
                async with asyncio.timeout(self._settings.image_first_byte_timeout):
                    response = await self._session.get(
                        url, headers=headers, timeout=timeout, allow_redirects=False
                    )
                if response.status in (301, 302, 303, 307, 308) and "Location" in response.headers:
                    url = str(response.url.join(URL(response.headers["Location"])))
                    response.release()
                    response = None
                    continue
                break
            if response is None:
                raise self._fail("image", "redirects", "too many redirects")
        try:
            self._log_call("GET", "image", response.status, started)
            if response.status >= 300:
                body = await self._read_some(response)
                raise self._status_error("image", response.status, body)
            self.breaker.record(ok=True)
            yield ImageResponse(
                content_type=response.headers.get("Content-Type"),
                content_length=response.content_length,
                chunks=self._image_chunks(response),
            )
        finally:
            # after a full read the connection is already back in the pool; otherwise drop it
            response.close()

    async def _image_chunks(self, response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        started = time.perf_counter()
        idle = self._settings.image_idle_timeout
        chunks = response.content.iter_chunked(64 * 1024).__aiter__()
        with self._translate("image", started, ambiguous_after_send=False):
            while True:
                async with asyncio.timeout(idle):
                    chunk = await anext(chunks, None)
                if chunk is None:
                    return
                yield chunk

    @asynccontextmanager
    async def open_chat_stream(
        self, body: Mapping[str, Any]
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        """POST a streaming chat completion; yields an iterator over the raw SSE lines."""
        self.breaker.check()
        timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=self._settings.connect_timeout,
            sock_read=self._settings.stream_idle_timeout,
        )
        started = time.perf_counter()
        with self._translate("chat", started, ambiguous_after_send=False):
            response = await self._session.post(
                self.root + "/v1/chat/completions",
                data=json.dumps(body, ensure_ascii=False).encode(),
                headers={
                    **self._auth_headers(),
                    "Content-Type": "application/json",
                    "Accept": "text/event-stream",
                },
                timeout=timeout,
                allow_redirects=False,
            )
        try:
            self._log_call("POST", "chat", response.status, started)
            if response.status >= 300:
                raise self._status_error("chat", response.status, await self._read_some(response))
            if response.content_type != "text/event-stream":
                body_start = await self._read_some(response)
                raise self._fail(
                    "chat",
                    "invalid",
                    f"expected text/event-stream, got {response.content_type}: {body_start}",
                )
            self.breaker.record(ok=True)
            yield self._lines(response)
        finally:
            response.close()

    async def _lines(self, response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        started = time.perf_counter()
        with self._translate("chat", started, ambiguous_after_send=False, count=False):
            async for line in response.content:
                yield line.replace(self._key.encode(), b"[redacted]")

    # -- the one place aiohttp meets our errors --------------------------------------

    async def _call_json(
        self,
        kind: str,
        method: str,
        path: str,
        *,
        limits: aiohttp.ClientTimeout,
        data: bytes | None = None,
        content_type: str | None = None,
        attempts: int = 1,
    ) -> Any:
        """One JSON call with the retry policy; an error is ambiguous if any attempt was."""
        ambiguous = False
        for attempt in range(1, attempts + 1):
            try:
                return await self._call_json_once(
                    kind, method, path, limits=limits, data=data, content_type=content_type
                )
            except UpstreamError as exc:
                ambiguous = ambiguous or exc.ambiguous
                exc.ambiguous = ambiguous
                if attempt == attempts or not exc.retryable or self.breaker.is_open:
                    raise
                delay = _BACKOFF * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)
                log.info("retrying %s %s in %.2f s (attempt %d)", method, kind, delay, attempt + 1)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _call_json_once(
        self,
        kind: str,
        method: str,
        path: str,
        *,
        limits: aiohttp.ClientTimeout,
        data: bytes | None,
        content_type: str | None,
    ) -> Any:
        self.breaker.check()
        headers = self._auth_headers()
        if content_type:
            headers["Content-Type"] = content_type
        started = time.perf_counter()
        with self._translate(kind, started, ambiguous_after_send=True):
            async with self._session.request(
                method,
                self.root + path,
                # a fresh BytesIO per attempt: sized (so sent with Content-Length, not chunked)
                # and written in slices; aiohttp warns about raw bytes bodies over 1 MiB
                data=io.BytesIO(data) if data is not None else None,
                headers=headers,
                timeout=limits,
                allow_redirects=False,
            ) as response:
                self._log_call(method, kind, response.status, started)
                if response.status >= 300:
                    raise self._status_error(kind, response.status, await self._read_some(response))
                # read() returns what has arrived so far, not the whole body: read to the end
                raw = bytearray()
                async for chunk in response.content.iter_any():
                    raw += chunk
                    if len(raw) > _MAX_JSON_BYTES:
                        break
        if len(raw) > _MAX_JSON_BYTES:
            raise self._fail(kind, "invalid", "answer too large", ambiguous=True)
        try:
            answer = json.loads(raw)
        except ValueError as exc:
            snippet = bytes(raw[:_LOGGED_BODY_CHARS])
            raise self._fail(kind, "invalid", f"invalid JSON: {snippet!r}", ambiguous=True) from exc
        self.breaker.record(ok=True)
        return answer

    @contextmanager
    def _translate(
        self, kind: str, started: float, *, ambiguous_after_send: bool, count: bool = True
    ) -> Iterator[None]:
        """Map aiohttp/asyncio failures to UpstreamError; decide if the request may have landed."""
        try:
            yield
        except UpstreamError:
            raise
        except aiohttp.ConnectionTimeoutError as exc:
            # the connection never opened: nothing was sent
            raise self._fail(
                kind, "connect", "connect timeout", timeout=True, retryable=True, count=count
            ) from exc
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise self._fail(
                kind,
                "timeout",
                f"timed out after {time.perf_counter() - started:.1f}s",
                ambiguous=ambiguous_after_send,
                timeout=True,
                count=count,
            ) from exc
        except aiohttp.ClientConnectorError as exc:
            # refused, unreachable, DNS: nothing was sent
            raise self._fail(
                kind,
                "connect",
                f"cannot connect: {type(exc).__name__}",
                retryable=True,
                count=count,
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            # reset, disconnected, truncated after the request went out
            raise self._fail(
                kind,
                "connection",
                f"connection failed: {type(exc).__name__}",
                ambiguous=ambiguous_after_send,
                retryable=True,
                count=count,
            ) from exc

    def _status_error(self, kind: str, status: int, body: str) -> UpstreamError:
        if status in (401, 403):
            log.error(
                "upstream rejected our key (HTTP %s) on %s: check CHATGPT2API_API_KEY", status, kind
            )
            self._count_failure(kind, "auth")
            return UpstreamUnavailable(
                detail=f"{kind}: HTTP {status}", upstream_status=status, reason="auth"
            )
        return self._fail(
            kind,
            f"http_{status // 100}xx",
            f"HTTP {status}: {body}",
            upstream_status=status,
            # a 5xx (a gateway's 502/504 too) does not say whether the request was acted on
            ambiguous=status >= 500,
            retryable=status in (429, 502, 503, 504),
            # a 4xx is about our request, not the upstream's health
            count=status >= 500,
        )

    def _fail(
        self,
        kind: str,
        reason: str,
        detail: str,
        *,
        ambiguous: bool = False,
        timeout: bool = False,
        retryable: bool = False,
        upstream_status: int | None = None,
        count: bool = True,
    ) -> UpstreamError:
        detail = self._redact(f"{kind}: {detail}")
        log.warning("upstream failure: %s", detail)
        if count:
            self._count_failure(kind, reason)
        else:
            self._metrics.upstream_failures.labels(kind, reason).inc()
        error_type = UpstreamTimeout if timeout else UpstreamError
        return error_type(
            detail=detail,
            ambiguous=ambiguous,
            upstream_status=upstream_status,
            reason=reason,
            retryable=retryable,
        )

    def _count_failure(self, kind: str, reason: str) -> None:
        self._metrics.upstream_failures.labels(kind, reason).inc()
        self.breaker.record(ok=False)

    async def _read_some(self, response: aiohttp.ClientResponse) -> str:
        try:
            raw = await asyncio.wait_for(response.content.read(_LOGGED_BODY_CHARS), timeout=2)
        except (TimeoutError, aiohttp.ClientError, OSError):
            return "<unreadable body>"
        return self._redact(raw.decode("utf-8", "replace").strip())

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "[redacted]")

    def _auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._key}"}

    def _timeout(self, total: float) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=total, sock_connect=self._settings.connect_timeout)

    def _task(self, answer: Any, *, expected_id: str) -> UpstreamTask:
        try:
            task = UpstreamTask.from_json(answer)
        except ValueError as exc:
            raise self._fail(
                "submit", "invalid", f"unexpected task: {exc}", ambiguous=True
            ) from exc
        if task.id != expected_id:
            raise self._fail(
                "submit", "invalid", "upstream answered another task id", ambiguous=True
            )
        return self._scrub(task)

    def _scrub(self, task: UpstreamTask) -> UpstreamTask:
        """The upstream's free text reaches clients and logs: never with our key in it."""
        return replace(
            task,
            error=self._redact(task.error) if task.error else None,
            revised_prompt=self._redact(task.revised_prompt) if task.revised_prompt else None,
        )

    def _log_call(self, method: str, kind: str, status: int, started: float) -> None:
        self._metrics.upstream_calls.labels(kind, str(status)).inc()
        log.info(
            "upstream %s %s -> %s in %.1f ms",
            method,
            kind,
            status,
            (time.perf_counter() - started) * 1000,
        )


def encode_multipart(
    fields: Mapping[str, str], *, file_field: str, filename: str, content_type: str, data: bytes
) -> tuple[bytes, str]:
    """Build a multipart/form-data body in memory.

    Built by hand, not streamed, so that the request goes out with a known Content-Length:
    chatgpt2api (like many Python servers behind proxies) handles chunked uploads poorly.
    """
    boundary = f"scenemint-{uuid.uuid4().hex}"
    parts: list[bytes] = []
    for name, value in fields.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
            + value.encode()
            + b"\r\n"
        )
    parts.append(
        (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="{file_field}"; filename="{filename}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n"
        ).encode()
        + data
        + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"
