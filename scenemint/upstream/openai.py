"""Any OpenAI-compatible Images API as the upstream (OpenAI, Azure OpenAI, LiteLLM, new-api,
one-api, sub2api...): synchronous generations that our runners send as durable jobs.

    POST {base}/v1/images/generations   JSON {model, prompt, n: 1, size}
    POST {base}/v1/images/edits         multipart, the same fields and an `image` file
    POST {base}/v1/chat/completions     stream: true -> SSE (prompt enhancement)
    GET  {base}/v1/models               readiness (our key checked)

Only the fields named here are sent: gateways refuse parameters they believe a model does
not support (`response_format` with gpt-image models, for one). An answer carries
`b64_json` or a short-lived `url`; errors are OpenAI's `{"error": {"message", "type",
"code"}}`; a refusal (a 4xx) says whether its safety system refused the prompt (`Refusal`).

A synchronous call cannot be asked about later: each method here is one attempt. Whether
sending it again is safe — an answer proving nothing was generated — is the router's rule
(`router.judge`), applied by the job runner.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Literal

from ..config import Settings
from ..errors import UpstreamError
from ..metrics import Metrics
from ..models import clean_text
from .config import UpstreamConfig
from .http import ImageResponse, UpstreamHTTP, encode_multipart

log = logging.getLogger("scenemint.upstream")

_MAX_ANSWER_BYTES = 96 * 1024 * 1024  # a base64 PNG of a large image is tens of MiB
# what OpenAI and gateways say when their safety system refuses a prompt
_POLICY_CODES = frozenset(
    {"content_policy_violation", "moderation_blocked", "content_filter", "safety_violation"}
)


@dataclass(frozen=True, slots=True)
class GeneratedImage:
    """What one synchronous generation gave: the bytes (`b64_json`) or a URL to fetch."""

    data: bytes | None
    url: str | None
    revised_prompt: str | None = None


class Refusal(UpstreamError):
    """The upstream answered that it will not generate this (a 4xx): nothing was made.

    `policy` is True when its safety system refused the prompt."""

    def __init__(
        self, *, detail: str, message: str | None, policy: bool, upstream_status: int | None
    ) -> None:
        super().__init__(detail=detail, reason="refused", upstream_status=upstream_status)
        self.message = message
        self.policy = policy


class OpenAIImages:
    """The OpenAI Images API client. `open()` it, `close()` it."""

    kind: Literal["openai"] = "openai"

    def __init__(self, http: UpstreamHTTP) -> None:
        self.http = http
        self.settings = http.settings
        self.config = http.config
        self.name = http.name
        self.root = http.root

    @classmethod
    def open(
        cls, settings: Settings, upstream: UpstreamConfig, *, metrics: Metrics | None = None
    ) -> OpenAIImages:
        return cls(UpstreamHTTP.open(settings, upstream, metrics=metrics))

    async def close(self) -> None:
        await self.http.close()

    def check_submit(self) -> None:
        """Raise UpstreamUnavailable when generations are failing fast (before a charge)."""
        self.http.check_breaker("submit")

    # -- generations -----------------------------------------------------------------

    async def generate(self, *, prompt: str, size: str, deadline: float) -> GeneratedImage:
        """One generation (sent again only after an answer proving nothing was made)."""
        body = {
            "model": self.config.image_model,
            "prompt": prompt,
            "n": 1,
            "size": self._size(size),
        }
        data = json.dumps(body, ensure_ascii=False).encode()
        return await self._send(
            "/v1/images/generations", data=data, content_type="application/json", deadline=deadline
        )

    async def edit(
        self,
        *,
        prompt: str,
        size: str,
        image: bytes,
        filename: str,
        content_type: str,
        deadline: float,
    ) -> GeneratedImage:
        fields = {
            "model": self.config.image_model,
            "prompt": prompt,
            "n": "1",
            "size": self._size(size),
        }
        body, multipart_type = encode_multipart(
            fields, file_field="image", filename=filename, content_type=content_type, data=image
        )
        return await self._send(
            "/v1/images/edits", data=body, content_type=multipart_type, deadline=deadline
        )

    async def _send(
        self, path: str, *, data: bytes, content_type: str, deadline: float
    ) -> GeneratedImage:
        """One attempt, within the loop time `deadline`."""
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise UpstreamError(detail="submit: no time left", reason="timeout")
        try:
            answer = await self.http.call_json(
                "submit",
                "POST",
                path,
                data=data,
                content_type=content_type,
                time_limit=remaining,
                max_bytes=_MAX_ANSWER_BYTES,
            )
        except UpstreamError as exc:
            refusal = _as_refusal(exc)
            if refusal is not None:
                raise refusal from exc
            raise
        return self._image(answer)

    def _size(self, size: str) -> str:
        return self.config.sizes.get(size) or self.config.sizes["1:1"]

    def _image(self, answer: Any) -> GeneratedImage:
        data = answer.get("data") if isinstance(answer, dict) else None
        first = data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else None
        if first is None:
            raise self.http.fail("submit", "invalid", "answer without data[0]", ambiguous=True)
        revised = first.get("revised_prompt")
        revised = clean_text(self.http.redact(revised)) if isinstance(revised, str) else None
        encoded = first.get("b64_json")
        if isinstance(encoded, str) and encoded:
            try:
                raw = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise self.http.fail(
                    "submit", "invalid", "b64_json is not base64", ambiguous=True
                ) from exc
            return GeneratedImage(data=raw, url=None, revised_prompt=revised)
        url = first.get("url")
        url = clean_text(url, limit=8192) if isinstance(url, str) else None
        if url:
            return GeneratedImage(data=None, url=url, revised_prompt=revised)
        raise self.http.fail("submit", "invalid", "answer without b64_json or url", ambiguous=True)

    # -- readiness ---------------------------------------------------------------------

    async def probe(self) -> None:
        """Our key, checked by the upstream itself (`GET /v1/models`; no breaker counts it)."""
        await self.http.call_json(
            "probe", "GET", "/v1/models", time_limit=self.settings.poll_timeout, counted=False
        )

    async def probe_chat(self) -> None:
        await self.probe()

    # -- streams -----------------------------------------------------------------------

    def open_image(
        self, url: str, *, deadline: float
    ) -> AbstractAsyncContextManager[ImageResponse]:
        return self.http.open_image(url, deadline=deadline)

    def open_chat_stream(
        self, body: Mapping[str, Any]
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        return self.http.open_sse("chat", "/v1/chat/completions", body)


def _as_refusal(exc: UpstreamError) -> Refusal | None:
    """A 4xx of the Images API about the request (not 401/402/403/404/408/429: the upstream's
    own trouble): the upstream will not make it, and said why."""
    status = exc.upstream_status
    if status is None or not 400 <= status < 500 or status in (401, 402, 403, 404, 408, 429):
        return None
    code = (exc.upstream_code or "").lower()
    message = exc.upstream_message or ""
    policy = code in _POLICY_CODES or "safety" in message.lower() or "policy" in code
    return Refusal(
        detail=exc.detail, message=message or None, policy=policy, upstream_status=status
    )
