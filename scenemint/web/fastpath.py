"""`GET /api/images/tasks/{id}` answered below the framework.

This is the route the front end polls every two seconds for every active task: most of
the service's traffic. FastAPI's routing, dependency solving and request objects cost
more than the answer itself (see bench/ and the README), so this ASGI middleware answers
it directly with the same service call and the same envelope and error mapping as every
other route. The FastAPI route of the same path stays for the OpenAPI documentation and
is reached only by requests this layer passes on.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from ..service import ImageService
from .envelope import error_parts, ok_body

_PREFIX = "/api/images/tasks/"
_JSON_HEADER = (b"content-type", b"application/json")


class TaskPollFastPath:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            path: str = scope["path"]
            if path.startswith(_PREFIX) and "/" not in path[len(_PREFIX) :]:
                await self._poll(scope, send, path[len(_PREFIX) :])
                return
        await self.app(scope, receive, send)

    async def _poll(self, scope: Scope, send: Send, task_id: str) -> None:
        service: ImageService = scope["app"].state.service
        headers = [_JSON_HEADER]
        try:
            task = await service.get_task(task_id)
            status, body = 200, ok_body(task.to_json())
        except Exception as exc:
            status, body, extra = error_parts(exc, _header(scope, b"accept-language"))
            headers += [(k.lower().encode(), v.encode()) for k, v in (extra or {}).items()]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None
