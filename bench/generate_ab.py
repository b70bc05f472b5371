#!/usr/bin/env python3
"""generate_rps of this checkout beside another commit's, back to back, on one machine.

    python bench/generate_ab.py --base 504fb41 [--rounds 3] [--seconds 15]

The other commit is checked out (git worktree) into a scratch directory and run with the
same interpreter (its package first on PYTHONPATH). Both run `scenemint serve` on SQLite
against one demo upstream (`scenemint demo-upstream`), and 64 closed-loop clients POST
/api/images/generate (each fingerprint checked in before every 10 generates), the rounds
alternating A B, B A, ... Prints the medians and the ratio (this / base) and writes them to
bench/generate_ab.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CLIENTS = 64


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_http(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{url}: the process exited")
            try:
                async with http.get(url) as answer:
                    if answer.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


async def load(base: str, seconds: float, tag: str) -> tuple[float, float]:
    """(generates/s, p50 ms) of CLIENTS closed-loop clients for `seconds`."""
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        end = time.perf_counter() + seconds
        started = time.perf_counter()

        async def worker(w: int) -> None:
            n = 0
            while time.perf_counter() < end:
                owner = f"ab-{tag}-{w}-{n}"
                n += 1
                async with http.post(f"{base}/api/quota/check-in", json={"fingerprint": owner}):
                    pass
                for i in range(10):
                    if time.perf_counter() >= end:
                        return
                    # "fail": the demo draws nothing for it
                    body = {"prompt": f"ab {w}.{n}.{i} (fail)", "fingerprint": owner}
                    sent = time.perf_counter()
                    async with http.post(f"{base}/api/images/generate", json=body) as answer:
                        await answer.read()
                        if answer.status == 200:
                            latencies.append((time.perf_counter() - sent) * 1000)

        await asyncio.gather(*(worker(w) for w in range(CLIENTS)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return len(latencies) / elapsed, latencies[len(latencies) // 2] if latencies else 0.0


async def one_round(
    label: str, pythonpath: str, upstream: str, key: str, seconds: float, tmp: Path
) -> tuple[float, float]:
    port = free_port()
    data = tmp / f"data-{label}-{port}"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp),
        "PYTHONPATH": pythonpath,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "CHATGPT2API_BASE_URL": upstream,
        "CHATGPT2API_API_KEY": key,
        "SCENEMINT_DATA_DIR": str(data),
        "SCENEMINT_LOG_LEVEL": "WARNING",
        "SCENEMINT_RECONCILE_INTERVAL": "3600",
        # the breakers must not judge the demo's refusals of "(fail)" prompts
        "SCENEMINT_BREAKER_THRESHOLD": "1000000000",
        "SCENEMINT_BREAKER_MIN_CALLS": "1000000000",
    }
    with open(tmp / f"serve-{label}.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "scenemint", "serve"],
            env=env,
            cwd=tmp,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        await wait_http(base + "/healthz", proc)
        await load(base, 2.0, f"{label}-warm")
        return await load(base, seconds, label)
    finally:
        proc.terminate()
        proc.wait(15)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="scenemint-ab-") as scratch:
        tmp = Path(scratch)
        base_tree = tmp / "base"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base_tree), args.base],
            check=True,
            capture_output=True,
        )
        upstream_port = free_port()
        key = "ab-demo-key-0123456789"
        upstream = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "scenemint",
                "demo-upstream",
                "--port",
                str(upstream_port),
                "--api-key",
                key,
            ],
            cwd=tmp,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        upstream_url = f"http://127.0.0.1:{upstream_port}"
        results: dict[str, list[tuple[float, float]]] = {"this": [], "base": []}
        try:
            await wait_http(upstream_url + "/v1/models", upstream)
            for index in range(args.rounds):
                order = ("this", "base") if index % 2 == 0 else ("base", "this")
                for label in order:
                    path = str(ROOT) if label == "this" else str(base_tree)
                    rate, p50 = await one_round(label, path, upstream_url, key, args.seconds, tmp)
                    results[label].append((rate, p50))
                    print(f"round {index + 1} {label}: {rate:,.0f} req/s, p50 {p50:.1f} ms")
        finally:
            upstream.terminate()
            upstream.wait(10)
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_tree)],
                check=False,
                capture_output=True,
            )
    this = statistics.median(rate for rate, _ in results["this"])
    base = statistics.median(rate for rate, _ in results["base"])
    return {
        "base_commit": args.base,
        "clients": CLIENTS,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "this_generate_rps": [round(r, 1) for r, _ in results["this"]],
        "base_generate_rps": [round(r, 1) for r, _ in results["base"]],
        "this_median": round(this, 1),
        "base_median": round(base, 1),
        "ratio": round(this / base, 3),
        "target": ">= 0.9",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the commit to compare with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--output", type=Path, default=BENCH / "generate_ab.json")
    args = parser.parse_args()
    figures = asyncio.run(main_async(args))
    args.output.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
