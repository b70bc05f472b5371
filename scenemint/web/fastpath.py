"""`GET /api/images/tasks/{id}` answered below the framework.

This is the route the front end polls every two seconds for every active task: most of
the service's traffic. FastAPI's routing, dependency solving and request objects cost
more than the answer itself (see bench/ and the README), so this ASGI layer answers it
directly with the same service call and the same envelope and error mapping as every
other route. Reuse of answers is the service's (`ImageService.task_answer`, one cache keyed
by the ledger row's version): this layer keeps nothing of its own. The FastAPI route of the
same path stays for the OpenAPI documentation and is reached only by requests this layer
passes on.
"""

from __future__ import annotations

from starlette.datastructures import State
from starlette.types import ASGIApp, Receive, Scope, Send

from ..messages import prefers_chinese
from ..service import ImageService
from .envelope import error_parts, ok_body_encoded

_PREFIX = "/api/images/tasks/"
_JSON_HEADER = (b"content-type", b"application/json")


class TaskPollFastPath:
    def __init__(self, app: ASGIApp, *, state: State) -> None:
        self.app = app
        self._state = state  # the app's state: it holds the service once the lifespan ran
        self._languages: dict[bytes, bool] = {}  # Accept-Language value -> prefers Chinese

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            path: str = scope["path"]
            if path.startswith(_PREFIX) and "/" not in path[len(_PREFIX) :]:
                await self._poll(scope, send, path[len(_PREFIX) :])
                return
        await self.app(scope, receive, send)

    async def _poll(self, scope: Scope, send: Send, task_id: str) -> None:
        headers = [_JSON_HEADER]
        language = _header(scope, b"accept-language")
        try:
            service: ImageService = self._state.service
            data = await service.task_answer(task_id, chinese=self._chinese(language))
            status, body = 200, ok_body_encoded(data)
        except Exception as exc:
            text = language.decode("latin-1") if language else None
            status, body, extra = error_parts(exc, text)
            headers += [(k.lower().encode(), v.encode()) for k, v in (extra or {}).items()]
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
