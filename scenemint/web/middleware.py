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

log = logging.getLogger("scenemint.access")

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
_VALID_ID = re.compile(rb"[A-Za-z0-9._-]{1,64}")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


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
                scope["path"],
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
