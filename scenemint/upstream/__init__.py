"""Everything that speaks HTTP to the upstream: one interface, two kinds.

    http.py         the pooled aiohttp session, the key, breakers per operation, and the
                    translation of every foreign exception into an `UpstreamError` kind
    breaker.py      the circuit breaker (failure rate over a window, per operation)
    sse.py          server-sent events decoded as the specification says
    chatgpt2api.py  chatgpt2api: an asynchronous image-task API (submit, then list)
    openai.py       any OpenAI Images API: synchronous generations, sent as our own jobs

What the service needs from both: `check_submit`, `probe`, `probe_chat`, `open_image`,
`open_chat_stream`, `close`; and by kind, submissions and listings (`Chatgpt2Api`) or
generations (`OpenAIImages`).
"""

from __future__ import annotations

from ..config import Settings
from ..metrics import Metrics
from .chatgpt2api import Chatgpt2Api
from .http import ImageResponse, UpstreamHTTP, encode_multipart, origin_of
from .openai import GeneratedImage, OpenAIImages, Refusal, nothing_generated

Upstream = Chatgpt2Api | OpenAIImages
UpstreamClient = Chatgpt2Api  # the name of the chatgpt2api client before there were two kinds

__all__ = [
    "Chatgpt2Api",
    "GeneratedImage",
    "ImageResponse",
    "OpenAIImages",
    "Refusal",
    "Upstream",
    "UpstreamClient",
    "UpstreamHTTP",
    "encode_multipart",
    "nothing_generated",
    "open_upstream",
    "origin_of",
]


def open_upstream(settings: Settings, *, metrics: Metrics | None = None) -> Upstream:
    """The upstream of `SCENEMINT_UPSTREAM_KIND`, with its own pooled session."""
    if settings.upstream_kind == "openai":
        return OpenAIImages.open(settings, metrics=metrics)
    return Chatgpt2Api.open(settings, metrics=metrics)
