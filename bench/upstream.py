"""The benchmark's upstream: the project's demo upstream, run as a process of its own.

It is `scenemint.demo.create_demo_app` unchanged (task API, task states, the streaming
chat endpoint), with two bench aids in front of it:

- every request is counted by kind; `GET /bench/stats` answers the counts (no key
  needed). `upstream_calls_per_100_polls` is read from here: the upstream's own count
  is the one figure the service under test cannot get wrong about itself;
- `GET /images/{name}` answers a PNG of exactly `--image-bytes` bytes, different for every
  name and the same every time for one name (random pixels seeded by the name, stored
  uncompressed, padded to the size with a private ancillary chunk that decoders skip). The
  demo draws PNGs of a few hundred KiB; the image scenarios need 4 MiB images, distinct
  ones (the service stores an image under the SHA-256 of its bytes: identical images would
  be one object) and real ones (the service decodes every image before it stores it). These
  requests are counted as "image": `image_downloads_per_task` is read from that count.
  Task states and image URLs stay the demo's;
- the first time a task listing reports a task finished (`success` or `error`), the wall
  time is kept: `GET /bench/reported?ids=a,b` answers `{id: unix time}`. The task-event
  latency figures start from this moment: when the upstream told the service.

Usage: python bench/upstream.py --port P --api-key K --task-seconds T --word-delay D
       [--image-bytes N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import random
import struct
import time
import zlib
from collections import Counter

from aiohttp import web
from aiohttp.typedefs import Handler

from scenemint.demo import create_demo_app


def kind_of(request: web.Request) -> str:
    path = request.path
    if path == "/api/image-tasks" and request.method == "GET":
        return "list"
    if path.startswith("/api/image-tasks/"):
        return "submit"
    if path == "/v1/chat/completions":
        return "chat"
    if path.startswith("/images/"):
        return "image"
    if path == "/v1/models":
        return "models"
    return "other"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bench_png(name: str, size: int, width: int = 1024) -> bytes:
    """A valid RGB PNG of exactly `size` bytes (at least ~16 KiB), its pixels seeded by `name`."""
    rng = random.Random(hashlib.sha256(name.encode()).digest())
    row = 1 + 3 * width  # a filter-type byte, then the pixels of one scanline
    framing = 8 + 25 + 3 * 12  # signature, IHDR, then the IDAT, padding and IEND chunk frames
    # stored (level 0) deflate adds 5 bytes per 64 KiB block and 6 in all: stay below the size
    height = max(1, (size - framing - 4096) // (row + 1))
    raw = bytearray(rng.randbytes(row * height))
    raw[::row] = bytes(height)  # filter type 0 (None) for every scanline
    pixels = zlib.compress(bytes(raw), 0)
    padding = size - framing - len(pixels)
    if padding < 0:
        raise ValueError(f"--image-bytes {size} is too small for a bench PNG")
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _chunk(b"IHDR", header),
            _chunk(b"pdAd", bytes(padding)),  # ancillary, private: decoders skip it
            _chunk(b"IDAT", pixels),
            _chunk(b"IEND", b""),
        )
    )


def build_app(
    *, api_key: str, task_seconds: float, word_delay: float, image_bytes: int
) -> web.Application:
    app = create_demo_app(api_key=api_key, task_seconds=task_seconds, word_delay=word_delay)
    counts: Counter[str] = Counter()
    reported: dict[str, float] = {}  # task id -> when a listing first said it was finished

    @web.middleware
    async def bench_aids(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/bench/stats":
            return web.json_response(dict(counts))
        if request.path == "/bench/reported":
            ids = request.query.get("ids", "").split(",")
            return web.json_response({i: reported[i] for i in ids if i in reported})
        kind = kind_of(request)
        counts[kind] += 1
        if kind == "image" and image_bytes > 0 and request.method == "GET":
            name = request.path.rsplit("/", 1)[-1]
            body = await asyncio.to_thread(bench_png, name, image_bytes)
            return web.Response(body=body, content_type="image/png")
        response = await handler(request)
        if kind == "list" and isinstance(response, web.Response) and response.body:
            now = time.time()
            for item in json.loads(bytes(response.body))["items"]:  # type: ignore[arg-type]
                if item["status"] in ("success", "error"):
                    reported.setdefault(item["id"], now)
        return response

    # outermost: counted before the demo's own key check
    app.middlewares.insert(0, bench_aids)
    return app


async def serve(args: argparse.Namespace) -> None:
    app = build_app(
        api_key=args.api_key,
        task_seconds=args.task_seconds,
        word_delay=args.word_delay,
        image_bytes=args.image_bytes,
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    # a deep backlog: the 1,000-stream scenario opens its upstream connections in a burst
    await web.TCPSite(runner, "127.0.0.1", args.port, backlog=4096).start()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--task-seconds", type=float, default=3.0)
    parser.add_argument("--word-delay", type=float, default=0.03)
    parser.add_argument("--image-bytes", type=int, default=0)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args))


if __name__ == "__main__":
    main()
