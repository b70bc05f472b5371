"""A fake OpenAI Images API: a real aiohttp server on a loopback thread.

    POST /v1/images/generations   JSON {model, prompt, n, size} -> {"data": [{"b64_json"}]}
    POST /v1/images/edits         multipart (the same fields and an `image` file)
    GET  /v1/models               the model list (readiness)
    POST /v1/chat/completions     a short SSE stream (enhancement)
    GET  /files/<name>            images of `url` answers

Knobs (set from the test's thread): `delay` (seconds a generation holds the connection),
`answer` ("b64" or "url"), and `fail_next(status, times, ...)` for what the next
generations answer: an OpenAI error object with a status (400 content policy, 429 with
Retry-After, 5xx), or `drop` (the connection closed mid-generation). It counts every
generation by prompt and keeps the concurrency of generations over time.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fake_upstream import TINY_PNG, make_png

API_KEY = "sk-fake-openai-key-0123456789"


@dataclass
class Outcome:
    status: int = 200
    code: str = "server_error"
    message: str = "the fake failed"
    retry_after: str | None = None
    drop: bool = False


@dataclass
class Generation:
    path: str
    prompt: str
    fields: dict[str, Any]
    started: float
    ended: float | None = None
    authorization: str | None = None
    api_key: str | None = None
    image: bytes | None = None


@dataclass
class FakeOpenAI:
    api_key: str = API_KEY
    delay: float = 0.0
    answer: str = "b64"  # or "url"
    image: bytes = field(default_factory=lambda: make_png(8, 8, rgb=(10, 120, 200)))
    chat_chunks: tuple[str, ...] = ("A ", "red ", "fox")

    def __post_init__(self) -> None:
        self.generations: list[Generation] = []
        self.chat_bodies: list[dict[str, Any]] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self._outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # -- the test's side ------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fail_next(self, status: int = 500, *, times: int = 1, **options: Any) -> None:
        with self._lock:
            self._outcomes.extend(Outcome(status=status, **options) for _ in range(times))

    def by_prompt(self) -> Counter[str]:
        with self._lock:
            return Counter(g.prompt for g in self.generations)

    def start(self) -> FakeOpenAI:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            app = web.Application(client_max_size=32 * 1024 * 1024)
            app.router.add_post("/v1/images/generations", self._generation)
            app.router.add_post("/v1/images/edits", self._generation)
            app.router.add_get("/v1/models", self._models)
            app.router.add_post("/v1/chat/completions", self._chat)
            app.router.add_get("/files/{name}", self._file)
            self._runner = web.AppRunner(app, access_log=None)
            loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True, name="fake-openai")
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the server's side -------------------------------------------------------------

    def _authorized(self, request: web.Request) -> bool:
        bearer = request.headers.get("Authorization") == f"Bearer {self.api_key}"
        return bearer or request.headers.get("api-key") == self.api_key

    async def _generation(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return _error(401, "invalid_api_key", "Incorrect API key provided")
        image = None
        if request.content_type == "application/json":
            fields = await request.json()
        else:
            form = await request.post()
            fields = {k: v for k, v in form.items() if not isinstance(v, web.FileField)}
            upload = form.get("image")
            image = upload.file.read() if isinstance(upload, web.FileField) else None
        record = Generation(
            path=request.path,
            prompt=str(fields.get("prompt")),
            fields=dict(fields),
            started=time.monotonic(),
            authorization=request.headers.get("Authorization"),
            api_key=request.headers.get("api-key"),
            image=image,
        )
        with self._lock:
            self.generations.append(record)
            outcome = self._outcomes.pop(0) if self._outcomes else Outcome()
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if outcome.drop:
                await asyncio.sleep(self.delay / 2)
                if request.transport is not None:
                    request.transport.close()
                return web.Response()
            if outcome.status >= 400 and outcome.status not in (500, 502, 504):
                # refused at once (a 4xx, or 503/429: the request was never taken)
                headers = {"Retry-After": outcome.retry_after} if outcome.retry_after else {}
                return _error(outcome.status, outcome.code, outcome.message, headers)
            await asyncio.sleep(self.delay)
            if outcome.status >= 400:
                return _error(outcome.status, outcome.code, outcome.message)
            return web.json_response(self._answer(request, record))
        finally:
            with self._lock:
                self.in_flight -= 1
                record.ended = time.monotonic()

    def _answer(self, request: web.Request, record: Generation) -> dict[str, Any]:
        revised = f"revised: {record.prompt}"
        if self.answer == "url":
            url = f"{self.base_url}/files/{len(self.generations)}.png"
            return {"created": int(time.time()), "data": [{"url": url, "revised_prompt": revised}]}
        encoded = base64.b64encode(self.image).decode()
        return {
            "created": int(time.time()),
            "data": [{"b64_json": encoded, "revised_prompt": revised}],
        }

    async def _file(self, request: web.Request) -> web.Response:
        return web.Response(body=self.image, content_type="image/png")

    async def _models(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _error(401, "invalid_api_key", "Incorrect API key provided")
        models = [{"id": "gpt-image-1", "object": "model"}, {"id": "gpt-5-mini", "object": "model"}]
        return web.json_response({"object": "list", "data": models})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return _error(401, "invalid_api_key", "Incorrect API key provided")
        body = await request.json()
        with self._lock:
            self.chat_bodies.append(body)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for text in self.chat_chunks:
            frame = {"object": "chat.completion.chunk", "choices": [{"delta": {"content": text}}]}
            await response.write(b"data: " + json.dumps(frame).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response


def _error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "code": code}}
    return web.json_response(body, status=status, headers=headers)


__all__ = ["API_KEY", "TINY_PNG", "FakeOpenAI"]
