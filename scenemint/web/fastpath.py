"""`GET /api/images/tasks/{id}` answered below the framework.

This is the route the front end polls every two seconds for every active task: most of
the service's traffic. FastAPI's routing, dependency solving and request objects cost
more than the answer itself (see bench/ and the README), so this ASGI layer answers it
directly with the same service call and the same envelope and error mapping as every
other route, and reuses an encoded answer while it cannot have changed. The FastAPI route
of the same path stays for the OpenAPI documentation and is reached only by requests this
layer passes on.
"""

from __future__ import annotations

import asyncio
import time

from starlette.datastructures import State
from starlette.types import ASGIApp, Receive, Scope, Send

from ..models import TERMINAL
from ..service import ImageService
from .envelope import error_parts, ok_body

_PREFIX = "/api/images/tasks/"
_JSON_HEADER = (b"content-type", b"application/json")
_FINISHED_ANSWER_SECONDS = 60.0
_MAX_ANSWERS = 50_000


class TaskPollFastPath:
    def __init__(self, app: ASGIApp, *, state: State) -> None:
        self.app = app
        self._state = state  # the app's state: it holds the service once the lifespan ran
        # Encoded answers, reused while they cannot have changed: an unfinished task's for
        # the poll interval (the poller would give the same upstream answer anyway), a
        # finished task's for longer (it never changes again). Bounded: unknown ids churn it.
        self._answers: dict[str, tuple[float, bytes]] = {}
        self._pending: dict[str, asyncio.Future[bytes]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            path: str = scope["path"]
            if path.startswith(_PREFIX) and "/" not in path[len(_PREFIX) :]:
                await self._poll(scope, send, path[len(_PREFIX) :])
                return
        await self.app(scope, receive, send)

    async def _poll(self, scope: Scope, send: Send, task_id: str) -> None:
        headers = [_JSON_HEADER]
        try:
            status, body = 200, await self._answer(task_id)
        except Exception as exc:
            status, body, extra = error_parts(exc, _header(scope, b"accept-language"))
            headers += [(k.lower().encode(), v.encode()) for k, v in (extra or {}).items()]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _answer(self, task_id: str) -> bytes:
        now = time.monotonic()
        cached = self._answers.get(task_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        # When an answer expires under load, one computation runs and every poller waits for
        # it. It runs as its own task, so a poller that goes away does not cancel it for others.
        pending = self._pending.get(task_id)
        if pending is None:
            pending = asyncio.ensure_future(self._compute(task_id, now))
            self._pending[task_id] = pending
            pending.add_done_callback(lambda done: self._settled(task_id, done))
        return await asyncio.shield(pending)

    def _settled(self, task_id: str, done: asyncio.Future[bytes]) -> None:
        self._pending.pop(task_id, None)
        if not done.cancelled():
            done.exception()  # retrieved: its pollers may all have gone

    async def _compute(self, task_id: str, now: float) -> bytes:
        service: ImageService = self._state.service
        task = await service.get_task(task_id)
        body = ok_body(task.to_json())
        fresh_for = (
            _FINISHED_ANSWER_SECONDS
            if task.status in TERMINAL
            else service.settings.poll_min_interval
        )
        if len(self._answers) >= _MAX_ANSWERS:
            self._answers.clear()
        self._answers[task_id] = (now + fresh_for, body)
        return body


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None
