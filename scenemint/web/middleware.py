"""One log line per request, with its time and a request id also sent as `X-Request-ID`.

Plain ASGI, not BaseHTTPMiddleware: it costs a few microseconds and never buffers a stream.
"""

from __future__ import annotations

import contextvars
import logging
import re
import time
import uuid

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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _incoming_id(scope) or uuid.uuid4().hex
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
            # bounded labels only: route templates, known methods
            route = route_of(scope["path"])
            method = scope["method"] if scope["method"] in _METHODS else "other"
            self.metrics.requests.labels(route, method, str(status or "aborted")).inc()
            self.metrics.latency.labels(route).observe(elapsed)
            request_id_var.reset(token)


def _incoming_id(scope: Scope) -> str | None:
    # accept a caller's id only when it is short and plain: it ends up in our logs
    for name, value in scope["headers"]:
        if name == b"x-request-id" and _VALID_ID.fullmatch(value):
            return str(value.decode())
    return None
