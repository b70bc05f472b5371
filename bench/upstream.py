"""The benchmark's upstream: the project's demo upstream, run as a process of its own.

It is `scenemint.demo.create_demo_app` unchanged (task API, task states, the streaming
chat endpoint), with two bench aids in front of it:

- every request is counted by kind; `GET /bench/stats` answers the counts (no key
  needed). `upstream_calls_per_100_polls` is read from here: the upstream's own count
  is the one figure the service under test cannot get wrong about itself;
- `GET /images/{name}` answers a fixed blob of `--image-bytes` for every name. The demo
  draws PNGs of a few hundred KiB; the image-proxy scenario needs 4 MiB images, and which
  bytes they are does not matter to a proxy. Task states and image URLs stay the demo's.

Usage: python bench/upstream.py --port P --api-key K --task-seconds T --word-delay D
       [--image-bytes N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
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


def build_app(
    *, api_key: str, task_seconds: float, word_delay: float, image_bytes: int
) -> web.Application:
    app = create_demo_app(api_key=api_key, task_seconds=task_seconds, word_delay=word_delay)
    counts: Counter[str] = Counter()
    blob = os.urandom(image_bytes) if image_bytes > 0 else b""

    @web.middleware
    async def bench_aids(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/bench/stats":
            return web.json_response(dict(counts))
        kind = kind_of(request)
        counts[kind] += 1
        if kind == "image" and blob and request.method == "GET":
            return web.Response(body=blob, content_type="image/png")
        return await handler(request)

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
