"""Everything that speaks HTTP to upstreams: one interface, two kinds, several at once.

    config.py       the configured upstreams: a TOML file of [[upstream]] tables, or today's
                    variables as one named `default`
    router.py       which upstream takes a new task, where a task may move on to, and the one
                    rule every retry and move asks ("did it prove it made nothing, and whose
                    fault is that?")
    http.py         one upstream's calls on the shared pooled session: its key, breakers per
                    operation, metrics and log lines by name, the translation of every
                    foreign exception into an `UpstreamError` kind
    breaker.py      the circuit breaker (failure rate over a window, per operation)
    secrets.py      the one matcher of keys that every redaction uses
    sse.py          server-sent events decoded as the specification says
    chatgpt2api.py  chatgpt2api: an asynchronous image-task API (submit, then list)
    openai.py       any OpenAI Images API: synchronous generations, sent as our own jobs

What the service needs from both kinds: `probe`, `probe_chat`, `open_image`,
`open_chat_stream`; and by kind, submissions and listings (`Chatgpt2Api`) or generations
(`OpenAIImages`).
"""

from __future__ import annotations

from .chatgpt2api import Chatgpt2Api
from .config import DEFAULT, UpstreamConfig, UpstreamsError, load_upstreams
from .http import ImageResponse, UpstreamHTTP, encode_multipart, origin_of
from .openai import GeneratedImage, OpenAIImages, Refusal
from .router import Route, Router, judge, late_fault

Upstream = Chatgpt2Api | OpenAIImages

__all__ = [
    "DEFAULT",
    "Chatgpt2Api",
    "GeneratedImage",
    "ImageResponse",
    "OpenAIImages",
    "Refusal",
    "Route",
    "Router",
    "Upstream",
    "UpstreamConfig",
    "UpstreamHTTP",
    "UpstreamsError",
    "encode_multipart",
    "judge",
    "late_fault",
    "load_upstreams",
    "origin_of",
]
