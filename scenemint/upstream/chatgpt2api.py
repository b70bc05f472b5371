"""The chatgpt2api upstream: its asynchronous image-task API and its OpenAI chat endpoint.

    POST {root}/api/image-tasks/generations   JSON {client_task_id, prompt, model, size}
    POST {root}/api/image-tasks/edits         multipart, the same fields and an `image` file
    GET  {root}/api/image-tasks?ids=a,b,c     {"items": [...], "missing_ids": [...]}
    POST {root}/v1/chat/completions           stream: true -> SSE
    GET  {root}/v1/models                     (chat availability)

A submission may be retried safely: the same `client_task_id` returns the existing task.
All HTTP goes through `UpstreamHTTP` (pool, key, breakers, translation).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from typing import Any, Literal
from urllib.parse import quote

from ..config import Settings
from ..errors import UpstreamError
from ..metrics import Metrics
from ..models import TaskListing, UpstreamTask
from .config import UpstreamConfig
from .http import ImageResponse, UpstreamHTTP, encode_multipart


class Chatgpt2Api:
    """The chatgpt2api client: submit, list, download, stream. `open()` it, `close()` it."""

    kind: Literal["chatgpt2api"] = "chatgpt2api"

    def __init__(self, http: UpstreamHTTP) -> None:
        self.http = http
        self.settings = http.settings
        self.config = http.config
        self.name = http.name
        self.root = http.root

    @classmethod
    def open(
        cls, settings: Settings, upstream: UpstreamConfig, *, metrics: Metrics | None = None
    ) -> Chatgpt2Api:
        return cls(UpstreamHTTP.open(settings, upstream, metrics=metrics))

    async def close(self) -> None:
        await self.http.close()

    def check_submit(self) -> None:
        """Raise UpstreamUnavailable when submissions are failing fast (before a charge)."""
        self.http.check_breaker("submit")

    # -- the task API ----------------------------------------------------------------

    async def submit_generation(
        self, *, task_id: str, prompt: str, size: str, time_limit: float | None = None
    ) -> UpstreamTask:
        """One submission attempt (the caller retries: `client_task_id` makes that safe)."""
        body = {
            "client_task_id": task_id,
            "prompt": prompt,
            "model": self.config.image_model,
            "size": size,
        }
        answer = await self.http.call_json(
            "submit",
            "POST",
            "/api/image-tasks/generations",
            data=json.dumps(body, ensure_ascii=False).encode(),
            content_type="application/json",
            time_limit=time_limit or self.settings.submit_timeout,
        )
        return self._task(answer, expected_id=task_id)

    async def submit_edit(
        self,
        *,
        task_id: str,
        prompt: str,
        size: str,
        image: bytes,
        filename: str,
        content_type: str,
        time_limit: float | None = None,
    ) -> UpstreamTask:
        """One edit submission attempt, multipart with a known Content-Length."""
        fields = {
            "client_task_id": task_id,
            "prompt": prompt,
            "model": self.config.image_model,
            "size": size,
        }
        body, multipart_type = encode_multipart(
            fields, file_field="image", filename=filename, content_type=content_type, data=image
        )
        answer = await self.http.call_json(
            "submit",
            "POST",
            "/api/image-tasks/edits",
            data=body,
            content_type=multipart_type,
            time_limit=time_limit or self.settings.submit_timeout,
        )
        return self._task(answer, expected_id=task_id)

    async def list_tasks(self, ids: list[str]) -> TaskListing:
        answer = await self.http.call_json(
            "list",
            "GET",
            _listing_path(ids),
            time_limit=self.settings.poll_timeout,
            attempts=2,
        )
        try:
            listing = TaskListing.from_json(answer)
        except ValueError as exc:
            raise self.http.fail("list", "invalid", f"unexpected listing: {exc}") from exc
        items = {task_id: self._scrub(task) for task_id, task in listing.items.items()}
        return TaskListing(items=items, missing=listing.missing)

    # -- readiness ---------------------------------------------------------------------

    async def probe(self) -> None:
        """What the service needs, asked without touching any breaker: a listing of one
        random id, which the upstream answers itself (with our key checked)."""
        answer = await self.http.call_json(
            "probe",
            "GET",
            _listing_path([str(uuid.uuid4())]),
            time_limit=self.settings.poll_timeout,
            counted=False,
        )
        try:
            TaskListing.from_json(answer)
        except ValueError as exc:
            raise self.http.fail("probe", "invalid", f"unexpected listing: {exc}") from exc

    async def probe_chat(self) -> None:
        """Is the chat model reachable? (`GET /v1/models`; never counted by a breaker)."""
        await self.http.call_json(
            "models", "GET", "/v1/models", time_limit=self.settings.poll_timeout, counted=False
        )

    # -- streams -----------------------------------------------------------------------

    def open_image(
        self, url: str, *, deadline: float
    ) -> AbstractAsyncContextManager[ImageResponse]:
        return self.http.open_image(url, deadline=deadline)

    def open_chat_stream(
        self, body: Mapping[str, Any]
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """POST a streaming chat completion; yields the data of each SSE event."""
        return self.http.open_sse("chat", "/v1/chat/completions", body)

    # -- answers -----------------------------------------------------------------------

    def _task(self, answer: Any, *, expected_id: str) -> UpstreamTask:
        try:
            task = UpstreamTask.from_json(answer)
        except ValueError as exc:
            raise self.http.fail(
                "submit", "invalid", f"unexpected task: {exc}", ambiguous=True
            ) from exc
        if task.id != expected_id:
            raise self.http.fail(
                "submit", "invalid", "upstream answered another task id", ambiguous=True
            )
        return self._scrub(task)

    def _scrub(self, task: UpstreamTask) -> UpstreamTask:
        """The upstream's free text reaches clients and logs: never with our key in it."""
        redact = self.http.redact
        return replace(
            task,
            error=redact(task.error) if task.error else None,
            revised_prompt=redact(task.revised_prompt) if task.revised_prompt else None,
        )


def _listing_path(ids: list[str]) -> str:
    return "/api/image-tasks?ids=" + ",".join(quote(i, safe="") for i in ids)


__all__ = ["Chatgpt2Api", "UpstreamError", "encode_multipart"]
