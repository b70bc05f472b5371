"""The one place where aiohttp, yarl and JSON decoding meet our errors.

`UpstreamHTTP` owns the pooled aiohttp session of the process, the upstream key, one circuit
breaker per operation, and the translation of every exception those libraries raise into an
`UpstreamError` kind (see `translated`). Nothing else in the package calls aiohttp.

Every request to an upstream's own origin carries its key (`Authorization: Bearer <key>`,
or Azure's `api-key`); the key never goes to any other origin (an image host) and never into
a log line or an error: `redact` scrubs it from anything we log, before anything is cut to
length. Every call is logged and counted with the upstream's name (never its URL or key).
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError
from yarl import URL

from ..config import Settings
from ..errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from ..metrics import Metrics
from ..models import clean_text
from .breaker import BreakerPolicy, CircuitBreaker
from .config import UpstreamConfig
from .secrets import REDACTED, KeyRedactor
from .sse import SSEDecoder, SSEError

log = logging.getLogger("scenemint.upstream")

LOGGED_BODY_CHARS = 300
_ERROR_BODY_BYTES = 8 * 1024  # read of an error answer (an OpenAI error object fits)
_ERROR_BODY_SECONDS = 1.0  # an error answer's body is only for the log: never wait long
MAX_JSON_BYTES = 8 * 1024 * 1024  # an upstream answer larger than this is not a task listing
MAX_SSE_LINE = 256 * 1024
_MAX_REDIRECTS = 3
_BACKOFF = 0.2  # seconds before the first retry; doubled each time, with jitter

# What the libraries below us raise, by what it means. Anything else is a bug of ours or
# theirs: it is still translated (a request path never sees a foreign exception), and
# logged with its traceback.
_NOT_SENT = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)
_TIMEOUTS = (TimeoutError, aiohttp.ServerTimeoutError)
_BROKEN = (aiohttp.ClientError, HttpProcessingError, OSError)
_UNREADABLE = (ValueError, UnicodeError, SSEError)  # yarl's URL errors, JSON, our parsers
TRANSLATED = (*_NOT_SENT, *_TIMEOUTS, *_BROKEN, *_UNREADABLE)


@dataclass(frozen=True, slots=True)
class ImageResponse:
    """An open upstream image download; the caller iterates `chunks` and the context closes it.

    `content_length` is the length of the bytes `chunks` yields, or None when unknown (an
    upstream that compressed the image anyway: we serve the decompressed bytes).
    """

    content_type: str | None
    content_length: int | None
    chunks: AsyncIterator[bytes]


def origin_of(url: str) -> str | None:
    """`scheme://host:port` of an absolute http(s) URL; None for anything odd (userinfo, a
    port out of range, no host, another scheme)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    if parts.username is not None or parts.password is not None or "\\" in url:
        return None
    port = port or (443 if parts.scheme == "https" else 80)
    return f"{parts.scheme}://{parts.hostname.lower()}:{port}"


def new_session(settings: Settings) -> aiohttp.ClientSession:
    """The pooled keep-alive session of the process (create inside a running loop): every
    upstream's calls share it."""
    connector = aiohttp.TCPConnector(
        limit=settings.upstream_pool_size, keepalive_timeout=30, ttl_dns_cache=300
    )
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
        auto_decompress=True,
    )


class UpstreamHTTP:
    """One upstream's calls: its key, its breakers, its metrics and log lines (by its name),
    the translation. On a session shared with the other upstreams (`open()` makes one of its
    own, closed by `close()`)."""

    OPERATIONS = ("submit", "list", "image", "chat")

    def __init__(
        self,
        *,
        settings: Settings,
        upstream: UpstreamConfig,
        session: aiohttp.ClientSession,
        metrics: Metrics | None = None,
        owns_session: bool = False,
    ) -> None:
        key = upstream.key
        if key is None:
            raise ValueError(f"upstream {upstream.name}: its key is required")
        self.settings = settings
        self.config = upstream
        self.name = upstream.name
        self.root = upstream.root
        self._session = session
        self._owns_session = owns_session
        self._key = key
        self._key_bytes = key.encode()
        self.secrets = KeyRedactor([key])
        self.origin = origin_of(self.root)
        self.metrics = metrics or Metrics()
        image_origins = {self.origin} | {origin_of(host) for host in upstream.image_hosts}
        self.image_origins = {origin for origin in image_origins if origin is not None}
        policy = BreakerPolicy(
            failure_rate=settings.breaker_failure_rate,
            min_calls=settings.breaker_min_calls,
            window=settings.breaker_window,
            cooldown=settings.breaker_cooldown,
        )
        self.breakers = {
            op: CircuitBreaker(
                f"{self.name} {op}", policy, on_change=functools.partial(self._breaker_is, op)
            )
            for op in self.OPERATIONS
        }
        for op in self.OPERATIONS:
            self._breaker_is(op, False)
        self._calls: dict[tuple[str, int], Any] = {}  # labelled metric children, kept

    def _breaker_is(self, op: str, is_open: bool) -> None:
        self.metrics.breaker_open.labels(self.name, op).set(int(is_open))

    @classmethod
    def open(
        cls, settings: Settings, upstream: UpstreamConfig, *, metrics: Metrics | None = None
    ) -> UpstreamHTTP:
        """One upstream on a session of its own (create inside a running loop)."""
        return cls(
            settings=settings,
            upstream=upstream,
            session=new_session(settings),
            metrics=metrics,
            owns_session=True,
        )

    async def close(self) -> None:
        if self._owns_session:
            await self._session.close()

    def check_breaker(self, operation: str) -> None:
        breaker = self.breakers.get(operation)
        if breaker is not None:
            breaker.check()

    # -- JSON calls ------------------------------------------------------------------

    async def call_json(
        self,
        op: str,
        method: str,
        path: str,
        *,
        time_limit: float,
        data: bytes | None = None,
        content_type: str | None = None,
        attempts: int = 1,
        counted: bool = True,
        max_bytes: int = MAX_JSON_BYTES,
    ) -> Any:
        """One JSON call to the upstream's origin, tried `attempts` times on what may pass.

        An error is `ambiguous` if any attempt may have been acted on. With `counted=False`
        (readiness probes) no breaker sees the call.
        """
        ambiguous = False
        for attempt in range(1, attempts + 1):
            try:
                return await self._call_json_once(
                    op,
                    method,
                    path,
                    time_limit=time_limit,
                    data=data,
                    content_type=content_type,
                    counted=counted,
                    max_bytes=max_bytes,
                )
            except UpstreamError as exc:
                ambiguous = ambiguous or exc.ambiguous
                exc.ambiguous = ambiguous
                breaker = self.breakers.get(op)
                if attempt == attempts or not exc.retryable or (breaker and breaker.is_open):
                    raise
                delay = _BACKOFF * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)
                log.info("retrying %s %s in %.2f s (attempt %d)", method, op, delay, attempt + 1)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _call_json_once(
        self,
        op: str,
        method: str,
        path: str,
        *,
        time_limit: float,
        data: bytes | None,
        content_type: str | None,
        counted: bool,
        max_bytes: int = MAX_JSON_BYTES,
    ) -> Any:
        if counted:
            self.check_breaker(op)
        headers = self.auth_headers()
        if content_type:
            headers["Content-Type"] = content_type
        started = time.perf_counter()
        with self.translated(op, started, ambiguous_after_send=True, counted=counted):
            async with asyncio.timeout(time_limit):
                async with self._session.request(
                    method,
                    self.root + path,
                    # a fresh BytesIO per attempt: sized (so sent with Content-Length, not
                    # chunked) and written in slices; aiohttp warns about large raw bytes
                    data=io.BytesIO(data) if data is not None else None,
                    headers=headers,
                    timeout=self._timeout(),
                    allow_redirects=False,
                ) as response:
                    self.log_call(method, op, response.status, started)
                    if response.status >= 300:
                        body = await self.read_some(response)
                        error = self.status_error(op, response.status, body, counted=counted)
                        error.retry_after = _retry_after(response.headers.get("Retry-After"))
                        raise error
                    raw = bytearray()
                    async for chunk in response.content.iter_any():
                        raw += chunk
                        if len(raw) > max_bytes:
                            raise self.fail(
                                op, "invalid", "answer too large", ambiguous=True, counted=counted
                            )
            try:
                answer = json.loads(raw)
            except (ValueError, RecursionError) as exc:
                snippet = self.cut(raw.decode("utf-8", "replace"))
                raise self.fail(
                    op, "invalid", f"invalid JSON: {snippet!r}", ambiguous=True, counted=counted
                ) from exc
        if counted:
            self.record(op, ok=True)
        return answer

    # -- streams ---------------------------------------------------------------------

    @asynccontextmanager
    async def open_sse(
        self, op: str, path: str, body: Mapping[str, Any]
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        """POST a JSON body and read an SSE answer; yields the data of each event.

        The context closes the upstream request on every path.
        """
        self.check_breaker(op)
        started = time.perf_counter()
        idle = self.settings.stream_idle_timeout
        with self.translated(op, started, ambiguous_after_send=False):
            # waiting for the answer to begin is silence too
            async with asyncio.timeout(idle):
                response = await self._session.post(
                    self.root + path,
                    data=json.dumps(body, ensure_ascii=False).encode(),
                    headers={
                        **self.auth_headers(),
                        "Content-Type": "application/json",
                        "Accept": "text/event-stream",
                    },
                    timeout=self._timeout(),
                    allow_redirects=False,
                )
        try:
            self.log_call("POST", op, response.status, started)
            if response.status >= 300:
                raise self.status_error(op, response.status, await self.read_some(response))
            if response.content_type != "text/event-stream":
                start = await self.read_some(response)
                raise self.fail(
                    op,
                    "invalid",
                    f"expected text/event-stream, got {response.content_type}:"
                    f" {start[:LOGGED_BODY_CHARS]}",
                )
            self.record(op, ok=True)
            yield self._events(op, response)
        finally:
            response.close()

    async def _events(self, op: str, response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        started = time.perf_counter()
        decoder = SSEDecoder(max_line=MAX_SSE_LINE)
        idle = self.settings.stream_idle_timeout
        chunks = response.content.iter_any().__aiter__()
        with self.translated(op, started, ambiguous_after_send=False, counted=False):
            while True:
                async with asyncio.timeout(idle):
                    chunk = await anext(chunks, None)
                events = decoder.close() if chunk is None else decoder.feed(chunk)
                for data in events:
                    yield data.replace(self._key_bytes, REDACTED.encode())
                if chunk is None:
                    return

    @asynccontextmanager
    async def open_image(self, url: str, *, deadline: float) -> AsyncIterator[ImageResponse]:
        """Download an image by URL before the loop time `deadline`.

        Only allowed origins are fetched; the key goes to the upstream's own origin on the
        first request only, never along a redirect (followed only to allowed origins).
        Asks for identity encoding; an upstream that compresses anyway is decompressed here
        and served without a Content-Length of other bytes.
        """
        self.check_breaker("image")
        settings = self.settings
        started = time.perf_counter()
        response: aiohttp.ClientResponse | None = None
        loop = asyncio.get_running_loop()
        first_byte = min(loop.time() + settings.image_first_byte_timeout, deadline)
        with self.translated("image", started, ambiguous_after_send=False):
            async with asyncio.timeout_at(first_byte):
                for hop in range(_MAX_REDIRECTS + 1):
                    origin = origin_of(url)
                    if origin is None or origin not in self.image_origins:
                        # our refusal, not an upstream failure: it must not open the breaker
                        raise self.fail(
                            "image", "forbidden", f"image URL not allowed: {origin}", counted=False
                        )
                    headers = {"Accept-Encoding": "identity", "Accept": "image/*"}
                    if hop == 0 and origin == self.origin:
                        headers.update(self.auth_headers())
                    response = await self._session.get(
                        URL(url, encoded=False),
                        headers=headers,
                        timeout=self._timeout(),
                        allow_redirects=False,
                    )
                    location = response.headers.get("Location")
                    if response.status in (301, 302, 303, 307, 308) and location:
                        url = str(response.url.join(URL(location)))
                        response.release()
                        response = None
                        continue
                    break
                if response is None:
                    raise self.fail("image", "redirects", "too many redirects")
        try:
            self.log_call("GET", "image", response.status, started)
            if response.status >= 300:
                raise self.status_error("image", response.status, await self.read_some(response))
            self.record("image", ok=True)
            encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
            yield ImageResponse(
                content_type=response.headers.get("Content-Type"),
                content_length=response.content_length if encoding == "identity" else None,
                chunks=self._image_chunks(response, deadline),
            )
        finally:
            # after a full read the connection is already back in the pool; otherwise drop it
            response.close()

    async def _image_chunks(
        self, response: aiohttp.ClientResponse, deadline: float
    ) -> AsyncIterator[bytes]:
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        idle = self.settings.image_idle_timeout
        chunks = response.content.iter_chunked(64 * 1024).__aiter__()
        with self.translated("image", started, ambiguous_after_send=False):
            while True:
                async with asyncio.timeout_at(min(loop.time() + idle, deadline)):
                    chunk = await anext(chunks, None)
                if chunk is None:
                    return
                yield chunk

    # -- translation ------------------------------------------------------------------

    @contextmanager
    def translated(
        self, op: str, started: float, *, ambiguous_after_send: bool, counted: bool = True
    ) -> Iterator[None]:
        """Every exception below becomes an UpstreamError kind; says whether the request may
        have been acted on (`ambiguous`) and whether trying again may help (`retryable`)."""
        try:
            yield
        except UpstreamError:
            raise
        except _NOT_SENT as exc:
            # refused, unreachable, DNS, connect timeout: nothing was sent
            timeout = isinstance(exc, aiohttp.ConnectionTimeoutError)
            raise self.fail(
                op,
                "connect",
                f"cannot connect: {type(exc).__name__}",
                timeout=timeout,
                retryable=True,
                counted=counted,
            ) from exc
        except _TIMEOUTS as exc:
            raise self.fail(
                op,
                "timeout",
                f"timed out after {time.perf_counter() - started:.1f}s",
                ambiguous=ambiguous_after_send,
                timeout=True,
                counted=counted,
            ) from exc
        except _BROKEN as exc:
            # reset, disconnected, truncated, a malformed HTTP answer after the request left
            raise self.fail(
                op,
                "connection",
                f"connection failed: {type(exc).__name__}",
                ambiguous=ambiguous_after_send,
                retryable=True,
                counted=counted,
            ) from exc
        except _UNREADABLE as exc:
            raise self.fail(
                op,
                "invalid",
                f"unreadable: {type(exc).__name__}: {exc}",
                ambiguous=ambiguous_after_send,
                counted=counted,
            ) from exc
        except Exception as exc:
            log.error("unexpected exception in upstream %s", op, exc_info=exc)
            raise self.fail(
                op,
                "internal",
                f"unexpected {type(exc).__name__}",
                ambiguous=ambiguous_after_send,
                counted=counted,
            ) from exc

    def status_error(
        self, op: str, status: int, body: str, *, counted: bool = True
    ) -> UpstreamError:
        if status in (401, 403):
            log.error(
                "upstream %s rejected our key (HTTP %s) on %s: check %s",
                self.name,
                status,
                op,
                self.config.api_key_env or f"the api_key of [[upstream]] {self.name}",
            )
            self.metrics.upstream_failures.labels(self.name, op, "auth").inc()
            if counted:
                self.record(op, ok=False)
            return UpstreamUnavailable(
                detail=f"{op}: HTTP {status}", upstream_status=status, reason="auth"
            )
        error = self.fail(
            op,
            f"http_{status // 100}xx",
            f"HTTP {status}: {body[:LOGGED_BODY_CHARS]}",
            upstream_status=status,
            # a 5xx (a gateway's 502/504 too) does not say whether the request was acted on
            ambiguous=status >= 500,
            retryable=status in (429, 502, 503, 504),
            # a 4xx is about our request, not the upstream's health
            counted=counted and status >= 500,
        )
        code, message = _openai_error(body)
        error.upstream_code = clean_text(code, limit=100) if code else None
        error.upstream_message = clean_text(self.redact(message)) if message else None
        return error

    def fail(
        self,
        op: str,
        reason: str,
        detail: str,
        *,
        ambiguous: bool = False,
        timeout: bool = False,
        retryable: bool = False,
        upstream_status: int | None = None,
        counted: bool = True,
    ) -> UpstreamError:
        detail = self.redact(f"{op}: {detail}")
        log.warning("upstream %s failure: %s", self.name, detail)
        self.metrics.upstream_failures.labels(self.name, op, reason).inc()
        if counted:
            self.record(op, ok=False)
        error_type = UpstreamTimeout if timeout else UpstreamError
        return error_type(
            detail=detail,
            ambiguous=ambiguous,
            upstream_status=upstream_status,
            reason=reason,
            retryable=retryable,
        )

    def record(self, op: str, *, ok: bool) -> None:
        breaker = self.breakers.get(op)
        if breaker is not None:
            breaker.record(ok=ok)

    async def read_some(self, response: aiohttp.ClientResponse) -> str:
        """The start of an error body (enough of it for an OpenAI error object): redacted
        first, then cut."""
        try:
            async with asyncio.timeout(_ERROR_BODY_SECONDS):
                raw = await response.content.read(_ERROR_BODY_BYTES)
        except Exception:  # only for the log: whatever failed, say so
            return "<unreadable body>"
        return self.redact(raw.decode("utf-8", "replace").strip())

    def cut(self, text: str) -> str:
        """Redact, then cut to the logged length (a key straddling the cut never leaks)."""
        return self.redact(text)[:LOGGED_BODY_CHARS]

    def redact(self, text: str) -> str:
        """`text` without the key: spelled out in any case, or JSON-escaped (`\\/`,
        `\\u0074` ...: an error body is decoded before it is searched)."""
        return self.secrets.redact(text)

    def auth_headers(self) -> dict[str, str]:
        if self.config.auth == "api-key":  # Azure OpenAI's key header
            return {"api-key": self._key}
        return {"Authorization": f"Bearer {self._key}"}

    def _timeout(self) -> aiohttp.ClientTimeout:
        # overall limits are asyncio timeouts around each call; aiohttp only bounds connecting
        return aiohttp.ClientTimeout(total=None, sock_connect=self.settings.connect_timeout)

    def log_call(self, method: str, op: str, status: int, started: float) -> None:
        child = self._calls.get((op, status))
        if child is None:
            child = self.metrics.upstream_calls.labels(self.name, op, str(status))
            if len(self._calls) < 1000:
                self._calls[(op, status)] = child
        child.inc()
        log.info(
            "upstream %s %s %s -> %s in %.1f ms",
            self.name,
            method,
            op,
            status,
            (time.perf_counter() - started) * 1000,
        )


def _retry_after(value: str | None) -> float | None:
    """Seconds of a Retry-After header given in seconds (a date is not worth honouring)."""
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and 0 <= seconds <= 3600 else None


def _openai_error(body: str) -> tuple[str | None, str | None]:
    """(code or type, message) of an OpenAI error object `{"error": {...}}`, if it is one."""
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        return None, None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if not isinstance(error, dict):
        return None, None
    code = error.get("code") or error.get("type")
    message = error.get("message")
    return (
        code if isinstance(code, str) else None,
        message[:LOGGED_BODY_CHARS] if isinstance(message, str) else None,
    )


def encode_multipart(
    fields: Mapping[str, str], *, file_field: str, filename: str, content_type: str, data: bytes
) -> tuple[bytes, str]:
    """Build a multipart/form-data body in memory.

    Built by hand, not streamed, so that the request goes out with a known Content-Length:
    chatgpt2api and many gateways (like many Python servers behind proxies) handle chunked
    uploads poorly.
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
