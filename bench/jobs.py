#!/usr/bin/env python3
"""The job runner of the openai kind: does it keep SCENEMINT_JOB_CONCURRENCY generations in
flight at all times while work is queued?

    python bench/jobs.py            # 4 runners, 6 rounds of 2 s generations (~20 s)
    python bench/jobs.py --quick    # 2 rounds

A fake OpenAI Images API (in this process, aiohttp) holds every generation for 2 s and
records when each began and ended; `scenemint serve` (SQLite, SCENEMINT_UPSTREAM_KIND=openai)
runs the jobs. All tasks are submitted at once; utilisation is the time-integral of the
generations in flight divided by (runners x the time from the first generation's start to
the last one's start — while work was still waiting). `bench/run.py` runs this too and
reports `job_runner_utilisation` (target >= 0.95).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

GENERATION_SECONDS = 2.0
RUNNERS = 4
KEY = "bench-openai-key-0123456789"


def _png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    header = (8).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    rows = (b"\x00" + b"\x30\x60\x90" * 8) * 8
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


class FakeImagesAPI:
    def __init__(self) -> None:
        self.spans: list[tuple[float, float]] = []
        self._b64 = base64.b64encode(_png()).decode()

    async def generations(self, request: web.Request) -> web.Response:
        started = time.monotonic()
        await request.read()
        await asyncio.sleep(GENERATION_SECONDS)
        self.spans.append((started, time.monotonic()))
        return web.json_response({"created": int(time.time()), "data": [{"b64_json": self._b64}]})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "gpt-image-1"}]})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def utilisation(spans: list[tuple[float, float]], runners: int) -> tuple[float, float]:
    """(utilisation, window seconds) over the time work was waiting: from the first start to
    the last start (after it, nothing was queued any more)."""
    if len(spans) < 2:
        return 0.0, 0.0
    begin = min(start for start, _ in spans)
    end = max(start for start, _ in spans)
    if end <= begin:
        return 0.0, 0.0
    busy = sum(max(0.0, min(stop, end) - max(start, begin)) for start, stop in spans)
    return busy / (runners * (end - begin)), end - begin


async def measure(*, rounds: int, runners: int = RUNNERS) -> dict[str, Any]:
    fake = FakeImagesAPI()
    app = web.Application()
    app.router.add_post("/v1/images/generations", fake.generations)
    app.router.add_get("/v1/models", fake.models)
    site_runner = web.AppRunner(app, access_log=None)
    await site_runner.setup()
    upstream_port = _free_port()
    await web.TCPSite(site_runner, "127.0.0.1", upstream_port).start()
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="scenemint-jobs-") as tmp:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": tmp,
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "SCENEMINT_UPSTREAM_KIND": "openai",
            "CHATGPT2API_BASE_URL": f"http://127.0.0.1:{upstream_port}/v1",
            "CHATGPT2API_API_KEY": KEY,
            "SCENEMINT_DATA_DIR": str(Path(tmp) / "data"),
            "SCENEMINT_JOB_CONCURRENCY": str(runners),
            "SCENEMINT_LOG_LEVEL": "WARNING",
        }
        log = open(Path(tmp) / "serve.log", "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(
            [sys.executable, "-m", "scenemint", "serve"],
            env=env,
            cwd=tmp,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            async with aiohttp.ClientSession() as http:
                await _wait_ready(http, base, proc)
                tasks = runners * rounds
                fingerprints = [f"bench-jobs-{i:04d}" for i in range((tasks + 9) // 10)]
                for fingerprint in fingerprints:
                    await _post(http, base + "/api/quota/check-in", {"fingerprint": fingerprint})
                submitted = time.monotonic()
                ids = await asyncio.gather(
                    *(
                        _post(
                            http,
                            base + "/api/images/generate",
                            {"prompt": f"job {i}", "fingerprint": fingerprints[i // 10]},
                        )
                        for i in range(tasks)
                    )
                )
                deadline = time.monotonic() + rounds * GENERATION_SECONDS * 3 + 30
                pending = {task["id"] for task in ids}
                while pending:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{len(pending)} jobs did not finish")
                    for task_id in list(pending):
                        async with http.get(f"{base}/api/images/tasks/{task_id}") as answer:
                            status = (await answer.json())["data"]["status"]
                        if status in ("completed", "failed"):
                            pending.discard(task_id)
                    await asyncio.sleep(0.2)
                finished = time.monotonic()
        finally:
            proc.terminate()
            proc.wait(15)
            log.close()
            await site_runner.cleanup()
    ratio, window = utilisation(fake.spans, runners)
    first_start = min(start for start, _ in fake.spans)
    return {
        "runners": runners,
        "tasks": tasks,
        "generation_seconds": GENERATION_SECONDS,
        "generations": len(fake.spans),
        "utilisation": round(ratio, 4),
        "window_s": round(window, 2),
        "first_job_after_submit_s": round(first_start - submitted, 3),
        "all_done_s": round(finished - submitted, 2),
        "ideal_s": round(rounds * GENERATION_SECONDS, 2),
    }


async def _wait_ready(
    http: aiohttp.ClientSession, base: str, proc: subprocess.Popen[bytes]
) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("scenemint serve exited early")
        try:
            async with http.get(base + "/healthz") as answer:
                if answer.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    raise RuntimeError("scenemint serve did not start")


async def _post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict[str, Any]:
    async with http.post(url, json=body) as answer:
        data = await answer.json()
        if answer.status != 200:
            raise RuntimeError(f"{url}: {answer.status} {data}")
        result: dict[str, Any] = data["data"]
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds instead of 6")
    parser.add_argument("--runners", type=int, default=RUNNERS)
    args = parser.parse_args()
    figures = asyncio.run(measure(rounds=2 if args.quick else 6, runners=args.runners))
    print(json.dumps(figures, indent=2))
    met = figures["utilisation"] >= 0.95
    print(
        f"utilisation {figures['utilisation']:.3f} (target >= 0.95): {'met' if met else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
