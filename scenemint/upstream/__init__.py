"""Everything that speaks HTTP to the upstream.

http.py         the pooled aiohttp session, the key, breakers per operation, and the
                translation of every foreign exception into an `UpstreamError` kind
breaker.py      the circuit breaker (failure rate over a window, per operation)
sse.py          server-sent events decoded as the specification says
chatgpt2api.py  the chatgpt2api task API and chat endpoint
"""

from __future__ import annotations

from .chatgpt2api import Chatgpt2Api, encode_multipart
from .http import ImageResponse, UpstreamHTTP, origin_of

UpstreamClient = Chatgpt2Api

__all__ = [
    "Chatgpt2Api",
    "ImageResponse",
    "UpstreamClient",
    "UpstreamHTTP",
    "encode_multipart",
    "origin_of",
]
