"""One log line per request, with its time and a request id also sent as `X-Request-ID`.

Plain ASGI, not BaseHTTPMiddleware: it costs a few microseconds and never buffers a stream.
"""

from __future__ import annotations

import contextvars
import itertools
import logging
import os
import re
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..metrics import Metrics, route_of
from .envelope import failure_body

log = logging.getLogger("scenemint.access")

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
_VALID_ID = re.compile(rb"[A-Za-z0-9._-]{1,64}")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
MAX_PATH_CHARS = 1024  # our longest path is about 70 characters
_LOGGED_PATH_CHARS = 200


class RequestLogMiddleware:
    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        # ids unique across processes (random prefix) and cheap within one (a counter)
        self._id_prefix = os.urandom(4).hex()
        self._ids = itertools.count()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        if len(scope["path"]) > MAX_PATH_CHARS or len(scope.get("query_string", b"")) > 8192:
            # refused before any work: nothing of it is looked up, cached or echoed
            await _too_long(scope, send)
            self._observe("other", scope["method"], 414, time.perf_counter() - started)
            return
        request_id = _incoming_id(scope) or f"{self._id_prefix}{next(self._ids):08x}"
        token = request_id_var.set(request_id)
        status = 0
        header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            log.info(
                "%s %s -> %s in %.1f ms",
                scope["method"],
                scope["path"][:_LOGGED_PATH_CHARS],
                status or "aborted",
                elapsed * 1000,
            )
            self._observe(scope["path"], scope["method"], status, elapsed)
            request_id_var.reset(token)

    def _observe(self, path: str, method: str, status: int, elapsed: float) -> None:
        # bounded labels only: route templates, known methods. The labelled children are
        # kept: looking them up in prometheus_client costs more than the poll itself.
        route = route_of(path)
        key = (route, method, status)
        children = self._children.get(key)
        if children is None:
            children = (
                self.metrics.requests.labels(
                    route, method if method in _METHODS else "other", str(status or "aborted")
                ),
                self.metrics.latency.labels(route),
            )
            if len(self._children) < 10_000:
                self._children[key] = children
        children[0].inc()
        children[1].observe(elapsed)


def _incoming_id(scope: Scope) -> str | None:
    # accept a caller's id only when it is short and plain: it ends up in our logs
    for name, value in scope["headers"]:
        if name == b"x-request-id" and _VALID_ID.fullmatch(value):
            return str(value.decode())
    return None


async def _too_long(scope: Scope, send: Send) -> None:
    language = next((v for k, v in scope["headers"] if k == b"accept-language"), b"")
    body = failure_body("path_too_long", accept_language=language.decode("latin-1"))
    headers = [
        (b"content-type", b"application/json"),
        (b"cache-control", b"no-store"),
        (b"content-length", b"%d" % len(body)),
    ]
    await send({"type": "http.response.start", "status": 414, "headers": headers})
    await send({"type": "http.response.body", "body": body})
