"""`GET /api/images/tasks/{id}` and `GET`/`HEAD /api/images/tasks/{id}/image` answered
below the framework.

The first is the route the front end polls every two seconds for every active task: most
of the service's traffic; the second sends megabytes per request from the image store.
FastAPI's routing, dependency solving and middleware stack cost more than the poll's
answer itself and about a fifth of an image's CPU (see bench/ and the README), so this ASGI
layer answers both directly with the same service calls, the same responses and the same
envelope and error mapping as every other route. Reuse of answers is the service's
(`ImageService.task_answer`, one cache keyed by the ledger row's version; `image`, what a
completed task's image is, which never changes): this layer keeps nothing of its own. The
FastAPI routes of the same paths stay for the OpenAPI documentation and are reached only
by requests this layer passes on.
"""

from __future__ import annotations

from starlette.datastructures import State
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import ImageMissing
from ..messages import prefers_chinese
from ..service import ImageService
from .envelope import error_parts, ok_body_encoded
from .images import serve_image

_PREFIX = "/api/images/tasks/"
_IMAGE = "/image"
_JSON_HEADER = (b"content-type", b"application/json")
_NO_STORE_HEADER = (b"cache-control", b"no-store")


class TaskPollFastPath:
    def __init__(self, app: ASGIApp, *, state: State) -> None:
        self.app = app
        self._state = state  # the app's state: it holds the service once the lifespan ran
        self._languages: dict[bytes, bool] = {}  # Accept-Language value -> prefers Chinese

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            if path.startswith(_PREFIX):
                rest = path[len(_PREFIX) :]
                method = scope["method"]
                if "/" not in rest:
                    if method == "GET":
                        await self._poll(scope, send, rest)
                        return
                elif method in ("GET", "HEAD") and rest.endswith(_IMAGE):
                    task_id = rest[: -len(_IMAGE)]
                    if "/" not in task_id:
                        await self._image(scope, receive, send, task_id)
                        return
        await self.app(scope, receive, send)

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
        await send({"type": "http.response.body", "body": body})

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


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None
