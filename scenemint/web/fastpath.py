"""The task routes, answered below the framework — their one implementation:

    GET /api/images/tasks/{id}          the poll: most of the service's traffic
    GET|HEAD /api/images/tasks/{id}/image   megabytes per request from the image store
    GET /api/images/tasks/{id}/events   the task's answers pushed as server-sent events

FastAPI's routing, dependency solving and middleware stack cost more than the poll's answer
itself and about a fifth of an image's CPU (see bench/ and the README), and an event stream
lives for minutes: this ASGI layer answers them directly, with the same envelope and error
mapping as every other route (`envelope.error_parts`). Reuse of answers is the service's
(`TaskReader`, one cache keyed by the ledger row's version; `ServedImages`, what a completed
task's image is). The OpenAPI document describes these routes (`openapi.py`).
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.datastructures import State
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import ImageMissing
from ..messages import prefers_chinese
from ..models import is_task_id
from ..service import ImageService
from .envelope import error_parts, ok_body_encoded
from .images import serve_image

PREFIX = "/api/images/tasks/"
_IMAGE = "/image"
_EVENTS = "/events"
_JSON_HEADER = (b"content-type", b"application/json")
_NO_STORE_HEADER = (b"cache-control", b"no-store")
_EVENT_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"x-accel-buffering", b"no"),  # nginx: do not buffer the stream
]
_PING = b": ping\n\n"


class TaskRoutes:
    def __init__(self, app: ASGIApp, *, state: State) -> None:
        self.app = app
        self._state = state  # the app's state: it holds the service once the lifespan ran
        self._languages: dict[bytes, bool] = {}  # Accept-Language value -> prefers Chinese
        self._stopping_future: asyncio.Future[Any] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            if path.startswith(PREFIX):
                rest = path[len(PREFIX) :]
                method = scope["method"]
                if "/" not in rest:
                    if method in ("GET", "HEAD"):
                        await self._poll(scope, send, rest)
                    else:
                        await self._not_allowed(scope, send, "GET, HEAD")
                    return
                if rest.endswith(_IMAGE) and "/" not in rest[: -len(_IMAGE)]:
                    if method in ("GET", "HEAD"):
                        await self._image(scope, receive, send, rest[: -len(_IMAGE)])
                    else:
                        await self._not_allowed(scope, send, "GET, HEAD")
                    return
                if rest.endswith(_EVENTS) and "/" not in rest[: -len(_EVENTS)]:
                    if method == "GET":
                        await self._events(scope, receive, send, rest[: -len(_EVENTS)])
                    elif method == "HEAD":  # what a GET's head would be; no stream
                        await send(
                            {
                                "type": "http.response.start",
                                "status": 200,
                                "headers": _EVENT_HEADERS,
                            }
                        )
                        await send({"type": "http.response.body", "body": b""})
                    else:
                        await self._not_allowed(scope, send, "GET, HEAD")
                    return
        await self.app(scope, receive, send)

    # -- the poll ----------------------------------------------------------------------------

    async def _poll(self, scope: Scope, send: Send, task_id: str) -> None:
        headers = [_JSON_HEADER, _NO_STORE_HEADER]
        language = _header(scope, b"accept-language")
        try:
            service: ImageService = self._state.service
            data = await service.task_answer(task_id, chinese=self._chinese(language))
            body = ok_body_encoded(data)
        except Exception as exc:
            await self._error(send, exc, language)
            return
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send(
            {"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body}
        )

    # -- the image ----------------------------------------------------------------------------

    async def _image(self, scope: Scope, receive: Receive, send: Send, task_id: str) -> None:
        service: ImageService = self._state.service
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            try:
                image = await service.image(task_id)
                response = await serve_image(Request(scope, receive), image, service.settings)
                await response(scope, receive, tracked)
            except ImageMissing as missing:
                if started:
                    raise
                raise await service.image_missing(missing) from None
        except Exception as exc:
            if started:  # the head went out: nothing to do but end the connection
                raise
            await self._error(send, exc, _header(scope, b"accept-language"))

    # -- the events ----------------------------------------------------------------------------

    async def _events(self, scope: Scope, receive: Receive, send: Send, task_id: str) -> None:
        """The task's answer at once, then each new one; the stream ends after a finished
        one (the same as a poll then answers), or, on shutdown, after the current one. A
        `: ping` comment every SCENEMINT_STREAM_PING_INTERVAL while nothing changes."""
        service: ImageService = self._state.service
        chinese = self._chinese(_header(scope, b"accept-language"))
        if not is_task_id(task_id):  # not ours: the missing shape, and the end
            data = await service.task_answer(task_id, chinese=chinese)
            await send({"type": "http.response.start", "status": 200, "headers": _EVENT_HEADERS})
            await send({"type": "http.response.body", "body": _event(-1, data)})
            return
        gauge = service.metrics.open_streams.labels("events")
        gauge.inc()
        watcher = service.events.watch(task_id)
        gone = asyncio.ensure_future(_disconnected(receive))
        stopping = self._stopping(service)
        ping = service.settings.stream_ping_interval
        try:
            await send({"type": "http.response.start", "status": 200, "headers": _EVENT_HEADERS})
            while True:
                answer = watcher.take()
                if answer is not None:
                    await _body(send, _event(answer.version, answer.encoded(chinese=chinese)))
                    if watcher.finished:
                        break
                    continue
                # one future for all watchers of the task, one for all streams: only the
                # connection's own `gone` is a task of this stream's
                done, _ = await asyncio.wait(
                    {watcher.updated, gone, stopping},
                    timeout=ping,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if gone.done():
                    break
                if stopping.done():  # the current answer once more, then a clean end
                    answer = watcher.current
                    if answer is not None:
                        await _body(send, _event(answer.version, answer.encoded(chinese=chinese)))
                    break
                if not done:
                    await _body(send, _PING)
            if not gone.done():
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.close()
            gone.cancel()
            await asyncio.gather(gone, return_exceptions=True)
            gauge.dec()

    def _stopping(self, service: ImageService) -> asyncio.Future[Any]:
        """Done once the service is shutting down: one future for every stream."""
        if self._stopping_future is None:
            self._stopping_future = asyncio.ensure_future(service.shutting_down.wait())
        return self._stopping_future

    # -- shared ---------------------------------------------------------------------------------

    async def _not_allowed(self, scope: Scope, send: Send, allow: str) -> None:
        refused = HTTPException(405, headers={"Allow": allow})
        await self._error(send, refused, _header(scope, b"accept-language"))

    async def _error(self, send: Send, exc: Exception, language: bytes | None) -> None:
        """The envelope every route answers an error with (`error_parts`)."""
        status, body, extra = error_parts(exc, language.decode("latin-1") if language else None)
        headers = [_JSON_HEADER]
        headers += [(k.lower().encode(), v.encode()) for k, v in extra.items()]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _chinese(self, language: bytes | None) -> bool:
        if not language:
            return False
        known = self._languages.get(language)
        if known is None:
            known = prefers_chinese(language.decode("latin-1"))
            if len(self._languages) < 1_000 and len(language) <= 200:
                self._languages[language] = known
        return known


def _event(version: int, data: bytes) -> bytes:
    # the answer's JSON is one line (json.dumps escapes every line break in it)
    return b"id: %d\ndata: %s\n\n" % (max(version, 0), data)


async def _body(send: Send, chunk: bytes) -> None:
    await send({"type": "http.response.body", "body": chunk, "more_body": True})


async def _disconnected(receive: Receive) -> None:
    while True:
        message: dict[str, Any] = dict(await receive())
        if message["type"] == "http.disconnect":
            return


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None
