"""A streaming response that notices a client going away at once and always closes its source.

Starlette's StreamingResponse only notices a disconnect on its next write when the server
speaks ASGI spec 2.4; an enhancement waiting on a silent upstream would then hold the
upstream request open. Here a second task listens for `http.disconnect` and cancels the
writer, and `close` runs on every path: finished, failed, or abandoned.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from typing import Any, TypeVar

from prometheus_client import Gauge
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

log = logging.getLogger("scenemint.web")

T = TypeVar("T")


class ClosingStreamResponse(Response):
    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        *,
        close: Callable[[], Awaitable[None]] | None = None,
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
        media_type: str | None = None,
        head_only: bool = False,
        gauge: Gauge | None = None,
    ) -> None:
        self._chunks = chunks
        self._gauge = gauge
        self._close = close
        self._head_only = head_only
        self.status_code = status_code
        self.media_type = media_type
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._gauge is not None:
            self._gauge.inc()
        writer = asyncio.create_task(self._write(send))
        listener = asyncio.create_task(_disconnected(receive))
        try:
            await asyncio.wait({writer, listener}, return_when=asyncio.FIRST_COMPLETED)
            if writer.done() and not writer.cancelled() and writer.exception() is not None:
                # the response has started: all we can do is cut the connection short
                log.warning("stream ended early: %r", writer.exception())
        finally:
            for task in (writer, listener):
                task.cancel()
            await asyncio.gather(writer, listener, return_exceptions=True)
            aclose = getattr(self._chunks, "aclose", None)
            if aclose is not None:
                await aclose()
            if self._close is not None:
                await self._close()
            if self._gauge is not None:
                self._gauge.dec()

    async def _write(self, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        if not self._head_only:
            async for chunk in self._chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _disconnected(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def unless_client_leaves(request: Request, work: Coroutine[Any, Any, T]) -> T | None:
    """Await `work` (the body has been read), or cancel it when the client disconnects first:
    None. An upstream request being opened for a client that left is cancelled at once."""
    job = asyncio.ensure_future(work)
    listener = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({job, listener}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        listener.cancel()
        if not job.done():
            job.cancel()
        await asyncio.gather(listener, job, return_exceptions=True)
    if job.cancelled():
        return None
    return job.result()
