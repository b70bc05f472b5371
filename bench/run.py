#!/usr/bin/env python3
"""SceneMint benchmark: the service side by side with nginx, a bare ASGI floor and the upstream.

    python bench/run.py            # full run, ~15 s per measurement (about 4 minutes)
    python bench/run.py --quick    # ~3 s per measurement, about 70 s

Needs nginx and wrk (Debian: `apt-get install -y nginx-light wrk`). Everything listens on
127.0.0.1 and is stopped at the end, on Ctrl-C and on errors too. Progress goes to stderr;
stdout gets a Markdown table and, as its last line, the JSON summary `{"figures": [...]}`.
The full result, with the machine description, is written to bench/results.json.

How it is wired (two phases, because the demo upstream has one task duration per process):

- phase 1: the demo upstream with 0.3 s tasks and a 50 ms word delay (bench/upstream.py,
  which also serves distinct, valid 4 MiB PNGs and counts its requests), the service with
  one worker and its default image store (a directory). Completed tasks are made through the
  service (check-in, generate, poll until done: the service has copied their images into
  its store by then), then: polls of completed tasks, stored images against nginx serving
  the same files, enhancement time to first byte and buffering, and generate (the last: its
  thousands of tasks push older ones out of the demo's memory). Then, on the same upstream,
  each with a data directory of its own: a service with the S3 store on moto
  (`python -m moto.server`), its images against nginx proxy_pass to the same moto; and two
  service instances on one PostgreSQL database (a throwaway one, created and dropped here;
  on one SQLite file when no PostgreSQL answers on 127.0.0.1:5432) with one shared image
  directory, counting the upstream's image downloads per task.
- phase 2: the demo upstream with tasks that never finish and a 1 s word delay; the
  service with one worker, then two. 64 unfinished tasks are made through the service
  (the demo calls them "queued" for their first 15 %, i.e. for ever here; to the service
  that is the same unfinished-task path as "running"), then: the ASGI floor, the upstream
  called directly, nginx, the service (counting upstream calls), latency at one
  connection, 1,000 open enhancement streams; then two workers.

Every task the bench makes has a real id from the service's own ledger. Prompts of tasks
whose image is never fetched contain the word "fail", which makes the demo skip drawing a
PNG (its CPU cost would otherwise be measured instead of the service's); the tasks still
stay unfinished for as long as the demo's task duration says (then they fail).

The figures with targets:

- poll_running_rps_1w: wrk, 64 connections rotating over the 64 unfinished tasks; the
  reference is the ASGI floor (bench/asgi_floor.py) measured the same way in the same run.
- poll_added_latency_p50_ms: p50 of a poll through the service minus p50 of the same
  question asked of the upstream directly (GET /api/image-tasks?ids=...), each at one
  connection, so that queueing does not stand in for the cost of a request. The
  64-connection difference is reported beside it.
- upstream_calls_per_100_polls: the upstream's own count of task listings during the
  64-connection run above (closed-loop pollers, as fast as they are answered), per 100
  polls the service answered. nginx, which makes one call per poll, shows the original 100.
- image_store_ratio_vs_nginx, image_store_rss_growth_mib: wrk, 16 connections rotating over
  16 distinct stored 4 MiB images, served by the service from its image directory, then by
  nginx (one worker, `sendfile on`) from that same directory (`location /images/` aliased
  to it: the same files, the same bytes); MiB/s of the service over MiB/s of nginx. The
  service's VmRSS is sampled every 20 ms, growth is peak minus idle (after every image was
  downloaded once, which also checks it against its ETag and finds its key).
- image_s3_ratio_vs_nginx: the same with the service's S3 store (obstore, streaming, the
  default SCENEMINT_IMAGE_REDIRECT=stream) on moto, against nginx proxy_pass to the same
  moto for the same objects (GET /<bucket>/<prefix>/<key>). nginx sends no credentials: the
  bench creates the bucket public-read (moto answers anonymous GETs of a private bucket
  403). nginx streams too (proxy_buffering off) with 256 KiB buffers, the service's chunk
  size (with its default one-page buffer it measured under half as fast against moto).
  moto is one Python process and closes the connection after every answer, so both sides
  are mostly bounded by it; the ratio says what the service adds on top.
- image_downloads_per_task: 32 tasks made through two service instances (16 each) on one
  database, then 64 closed-loop pollers (two per task, one on each instance, 10 ms between
  polls) poll them until completed and download their images (each checked against its
  ETag); the upstream's own count of image downloads during all of it, per task.
- enhance_ttfb_overhead_ms: median time to the first SSE `data:` line through the service
  minus the same directly from the upstream's /v1/chat/completions (the body the service
  itself sends), runs alternating.
- enhance_buffered_chunks: whole streams with a 50 ms word delay upstream; a text chunk
  arriving less than 25 ms after the chunk before it was held back and sent with it.
- streams_1000_rss_mib: 1,000 enhancement streams opened at once (upstream word delay
  1 s keeps them open); the service's peak VmRSS once all have their first frame (or the
  wait ran out: then the target counts as missed and the note says how many were open).
- job_runner_utilisation: last, alone on the machine: bench/jobs.py (the openai kind, a fake
  OpenAI Images API holding every generation 2 s, 4 runners, 6 rounds of jobs submitted at
  once): generations in flight over runners, integrated from the first start to the last.
  The poll figures above are the chatgpt2api kind's, measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import itertools
import json
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp
import events  # bench/events.py, beside this file
import jobs  # bench/jobs.py, beside this file (its own script too)

BENCH = Path(__file__).resolve().parent
PY = sys.executable
MiB = 1024 * 1024
IMAGE_BYTES = 4 * MiB
POLLERS = 64
IMAGE_CONNECTIONS = 16
IMAGES = 16
MULTI_TASKS = 32
MULTI_POLLERS = 64
S3_BUCKET = "scenemint-bench"
S3_PREFIX = "images"
POSTGRES = "postgresql://postgres@127.0.0.1:5432"
STREAMS = 1000
FAST_TASK_SECONDS = 0.3
PHASE1_WORD_DELAY = 0.05
STREAM_WORD_DELAY = 1.0
NEVER = 1_000_000.0
EVENT_TASK_SECONDS = 1.0
EVENT_IMAGE_BYTES = 64 * 1024  # "even a tiny image": the copy is not what is measured
EVENT_LATENCY_TASKS = 10  # followed by events, and as many polled
WATCHERS = 10_000
WATCHED_TASKS = 100
EVENT_DELAY_TASKS = 20
ENHANCE_PROMPT = "a lighthouse on a cliff at dusk, gulls over the waves"
INSTALL_HINT = "install them with: apt-get install -y nginx-light wrk   (Debian/Ubuntu, as root)"


@dataclass(frozen=True)
class Plan:
    quick: bool
    wrk_seconds: int
    latency_seconds: int
    generate_seconds: float
    ttfb_runs: int
    buffer_streams: int
    stream_wait: float
    job_rounds: int


QUICK = Plan(True, 3, 2, 3.0, 15, 3, 8.0, 2)
FULL = Plan(False, 15, 8, 15.0, 60, 10, 30.0, 6)


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- processes


class Processes:
    """Every process the bench starts, each in its own process group, stopped on any exit."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.running: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self,
        name: str,
        cmd: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        self.running.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 8.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        # children of a leader that is gone (uvicorn workers) share its group
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        self.running = [(n, p) for n, p in self.running if p is not proc]

    def stop_all(self) -> None:
        for _, proc in reversed(list(self.running)):
            self.stop(proc)

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.logs / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MiB, from /proc."""
    values = {"VmRSS": 0.0, "VmHWM": 0.0}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in values:
                values[key] = int(rest.split()[0]) / 1024  # kB
    return values["VmRSS"], values["VmHWM"]


class RssSampler:
    """Samples a process's VmRSS every `interval` seconds while the block runs."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.peak = max(self.peak, rss_mib(self.pid)[0])
            await asyncio.sleep(self.interval)

    async def __aenter__(self) -> RssSampler:
        self.peak = rss_mib(self.pid)[0]
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.peak = max(self.peak, rss_mib(self.pid)[0])


async def wait_http(
    http: aiohttp.ClientSession,
    url: str,
    proc: subprocess.Popen[bytes],
    procs: Processes,
    name: str,
    timeout: float = 30.0,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{procs.log_tail(name)}")
        try:
            async with http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                if resp.status == 200:
                    await resp.read()
                    return
        except (aiohttp.ClientError, TimeoutError):
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{name} did not answer {url} within {timeout} s:\n{procs.log_tail(name)}")


# --------------------------------------------------------------------------- wrk


@dataclass(frozen=True)
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    seconds: float
    errors: int
    output: str


_TIME_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def duration_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if match is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _TIME_UNITS[match.group(2)]


def parse_wrk(output: str) -> WrkResult:
    def find(pattern: str) -> re.Match[str]:
        match = re.search(pattern, output, re.MULTILINE)
        if match is None:
            raise ValueError(f"wrk output without {pattern!r}:\n{output}")
        return match

    done = find(r"^\s*(\d+) requests in ([\d.]+\w+),")
    errors = 0
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non2xx:
        errors += int(non2xx.group(1))
    sockets = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if sockets:
        errors += sum(int(n) for n in sockets.groups())
    return WrkResult(
        rps=float(find(r"^Requests/sec:\s+([\d.]+)").group(1)),
        p50_ms=duration_ms(find(r"^\s+50%\s+(\S+)").group(1)),
        p99_ms=duration_ms(find(r"^\s+99%\s+(\S+)").group(1)),
        requests=int(done.group(1)),
        seconds=duration_ms(done.group(2)) / 1000,
        errors=errors,
        output=output,
    )


class Wrk:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.runs = 0

    async def run(
        self,
        base: str,
        paths: list[str],
        *,
        connections: int,
        seconds: int,
        headers: tuple[str, ...] = (),
        label: str,
    ) -> WrkResult:
        """Run wrk against base, rotating over `paths` (one Lua table, built once per thread)."""
        self.runs += 1
        script = self.tmp / f"wrk-{self.runs}.lua"
        table = ",\n".join(json.dumps(p) for p in paths)  # JSON strings are valid Lua strings
        script.write_text(
            f"local paths = {{\n{table}\n}}\n"
            "local reqs = {}\n"
            "local i = 0\n"
            "init = function(args)\n"
            "  for k, p in ipairs(paths) do reqs[k] = wrk.format('GET', p) end\n"
            "end\n"
            "request = function()\n"
            "  i = i % #reqs + 1\n"
            "  return reqs[i]\n"
            "end\n"
        )
        threads = min(2, connections)
        cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency"]
        cmd += ["--timeout", "10s", "-s", str(script)]
        for header in headers:
            cmd += ["-H", header]
        cmd.append(base)
        say(f"wrk {label}: {connections} connections, {seconds} s")
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        try:
            out, _ = await proc.communicate()
        except BaseException:
            # interrupted: wrk shares our process group but would run out its duration
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await proc.wait()
            raise
        text = out.decode(errors="replace")
        if proc.returncode != 0:
            raise RuntimeError(f"wrk failed ({proc.returncode}):\n{text}")
        result = parse_wrk(text)
        say(
            f"  {result.rps:,.0f} req/s, p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms"
            + (f", {result.errors} errors" if result.errors else "")
        )
        return result


# --------------------------------------------------------------------------- service calls


class Service:
    """One running `scenemint serve` and the URLs to talk to it."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, workers: int, name: str) -> None:
        self.proc = proc
        self.port = port
        self.workers = workers
        self.name = name
        self.base = f"http://127.0.0.1:{port}"


def service_env(
    upstream: str, key: str, data_dir: Path, extra: dict[str, str] | None = None
) -> dict[str, str]:
    # our own settings only: nothing inherited from the shell or a .env file may change them
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SCENEMINT_", "CHATGPT2API_", "AWS_")) and k not in ("HOST", "PORT")
    }
    env.update(
        CHATGPT2API_BASE_URL=upstream,
        CHATGPT2API_API_KEY=key,
        SCENEMINT_DATA_DIR=str(data_dir),
        SCENEMINT_LOG_LEVEL="WARNING",  # a log line per request would dominate the poll path
    )
    env.update(extra or {})
    return env


async def call_json(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    async with http.post(url, json=body) as resp:
        return resp.status, await resp.json(content_type=None)


async def check_in(http: aiohttp.ClientSession, base: str, fingerprint: str) -> None:
    status, answer = await call_json(
        http, f"{base}/api/quota/check-in", {"fingerprint": fingerprint}
    )
    if status != 200 or answer.get("code") != 0:
        raise RuntimeError(f"check-in failed: {status} {answer}")


async def make_tasks(
    http: aiohttp.ClientSession, base: str, count: int, prompt: str, fingerprint: str
) -> list[str]:
    """Create `count` tasks through the service (10 credits a fingerprint a day)."""
    owners = [f"{fingerprint}-{i}" for i in range((count + 9) // 10)]
    await asyncio.gather(*(check_in(http, base, fp) for fp in owners))

    async def one(i: int) -> str:
        body = {"prompt": f"{prompt} #{i}", "size": "1:1", "fingerprint": owners[i // 10]}
        status, answer = await call_json(http, f"{base}/api/images/generate", body)
        if status != 200 or answer.get("code") != 0:
            raise RuntimeError(f"generate failed: {status} {answer}")
        return str(answer["data"]["id"])

    return list(await asyncio.gather(*(one(i) for i in range(count))))


async def task_status(http: aiohttp.ClientSession, base: str, task_id: str) -> str:
    async with http.get(f"{base}/api/images/tasks/{task_id}") as resp:
        answer = await resp.json(content_type=None)
    return str(answer["data"]["status"])


async def wait_completed(
    http: aiohttp.ClientSession, base: str, ids: list[str], timeout: float = 60.0
) -> None:
    deadline = time.monotonic() + timeout
    pending = set(ids)
    while pending and time.monotonic() < deadline:
        states = await asyncio.gather(*(task_status(http, base, i) for i in pending))
        for task_id, state in zip(list(pending), states, strict=True):
            if state == "failed":
                raise RuntimeError(f"task {task_id} failed; see the upstream log")
            if state == "completed":
                pending.discard(task_id)
        if pending:
            await asyncio.sleep(0.2)
    if pending:
        raise RuntimeError(f"{len(pending)} tasks did not complete within {timeout} s")


async def upstream_counts(http: aiohttp.ClientSession, upstream: str) -> dict[str, int]:
    async with http.get(f"{upstream}/bench/stats") as resp:
        counts: dict[str, int] = await resp.json()
    return counts


async def metric_value(http: aiohttp.ClientSession, base: str, name: str) -> float:
    """One unlabelled sample of the service's /metrics (0 when it is not there)."""
    async with http.get(f"{base}/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        sample, _, value = line.partition(" ")
        if sample == name:
            return float(value)
    return 0.0


# --------------------------------------------------------------------------- images


async def fetch_image(http: aiohttp.ClientSession, url: str, *, etag: bool = True) -> str:
    """Download a whole image; the SHA-256 of its bytes, checked against the service's
    ETag (the SHA-256 of the bytes) unless `etag` is false (nginx makes its own)."""
    async with http.get(url) as resp:
        body = await resp.read()
        tag = resp.headers.get("ETag") if etag else None
        if resp.status != 200 or len(body) != IMAGE_BYTES:
            raise RuntimeError(f"image {url}: {resp.status}, {len(body)} bytes")
    digest = hashlib.sha256(body).hexdigest()
    if tag is not None and tag.strip('"') != digest:
        raise RuntimeError(f"image {url}: ETag {tag} but the bytes hash to {digest}")
    return digest


async def stored_keys(http: aiohttp.ClientSession, base: str, ids: list[str]) -> list[str]:
    """The image store key of each task's image (`ab/abcdef…-<task id>`, see
    scenemint.images.base), from the bytes the service serves; every image is downloaded
    once on the way."""
    keys = []
    for task_id in ids:  # one at a time: sixteen 4 MiB bodies at once are no warm-up
        digest = await fetch_image(http, f"{base}/api/images/tasks/{task_id}/image")
        keys.append(f"{digest[:2]}/{digest}-{task_id}")
    return keys


async def same_bytes(http: aiohttp.ClientSession, url: str, key: str, who: str) -> None:
    """`url` serves the bytes stored under `key` (its SHA-256 is the key's first part)."""
    if await fetch_image(http, url, etag=False) != key.partition("/")[2][:64]:
        raise RuntimeError(f"{who} serves other bytes than the service")


def start_moto(procs: Processes, tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    cmd = [PY, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    return procs.start("moto", cmd, cwd=tmp), port


async def create_public_bucket(http: aiohttp.ClientSession, endpoint: str, bucket: str) -> None:
    # moto checks no signature; public-read lets nginx GET objects without credentials
    # (moto answers anonymous GETs of a private bucket 403)
    async with http.put(f"{endpoint}/{bucket}", headers={"x-amz-acl": "public-read"}) as resp:
        if resp.status != 200:
            raise RuntimeError(f"moto: creating bucket {bucket}: {resp.status} {await resp.text()}")


def create_database(name: str) -> str | None:
    """A throwaway PostgreSQL database on 127.0.0.1:5432 (trust auth); None when there is
    no server there."""
    import psycopg

    try:
        with psycopg.connect(f"{POSTGRES}/postgres", autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        say(f"  no PostgreSQL on 127.0.0.1:5432 ({' '.join(str(exc).split())[:120]})")
        return None
    return f"{POSTGRES}/{name}"


def drop_database(name: str) -> None:
    import psycopg

    with psycopg.connect(f"{POSTGRES}/postgres", autocommit=True, connect_timeout=3) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --------------------------------------------------------------------------- enhancement


def direct_chat_body() -> dict[str, object]:
    """What the service itself sends upstream for ENHANCE_PROMPT: same body, same shape."""
    from scenemint.config import Settings
    from scenemint.prompts import chat_request

    model = str(Settings.model_fields["prompt_model"].default)
    return chat_request(model=model, prompt=ENHANCE_PROMPT, direction="details")


async def first_frame_ms(
    http: aiohttp.ClientSession, url: str, body: dict[str, object], headers: dict[str, str]
) -> float:
    """Milliseconds from sending the request to the first SSE `data:` line.

    Leaving the block with the body unread closes the connection, and so the stream.
    """
    started = time.perf_counter()
    async with http.post(url, json=body, headers=headers) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url} answered {resp.status}: {await resp.text()}")
        while True:
            line = await resp.content.readline()
            if not line:
                raise RuntimeError(f"{url} ended before its first frame")
            if line.startswith(b"data:"):
                return (time.perf_counter() - started) * 1000


async def frame_times(
    http: aiohttp.ClientSession, url: str, body: dict[str, object], headers: dict[str, str]
) -> list[tuple[float, bytes]]:
    """Arrival time and payload of every `data:` line of one whole stream."""
    frames: list[tuple[float, bytes]] = []
    async with http.post(url, json=body, headers=headers) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url} answered {resp.status}: {await resp.text()}")
        while True:
            line = await resp.content.readline()
            now = time.perf_counter()
            if not line:
                break
            if line.startswith(b"data:"):
                payload = line[5:].strip()
                frames.append((now, payload))
                if payload == b"[DONE]":
                    break
    return frames


def count_buffered(frames: list[tuple[float, bytes]], word_delay: float) -> tuple[int, int]:
    """(token frames checked, token frames that arrived together with the one before).

    The demo writes its first frame at once and then one token frame after each
    `word_delay`: a token frame arriving less than half a delay after the frame before it
    was held back and sent together with that one. The closing frames follow the last
    token without a pause, so only frames carrying text are checked.
    """
    checked = buffered = 0
    for (before, _), (at, payload) in itertools.pairwise(frames):
        try:
            frame = json.loads(payload)
            content = frame["choices"][0]["delta"].get("content")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            continue
        if not content:
            continue
        checked += 1
        if at - before < word_delay / 2:
            buffered += 1
    return checked, buffered


async def hold_streams(
    url: str, count: int, wait: float, pid: int
) -> tuple[int, float, float, float]:
    """Open `count` enhancement streams at once; (streams with a first frame, idle RSS,
    peak RSS while they are open, seconds until all were open or the wait ran out)."""
    idle = rss_mib(pid)[0]
    opened = 0
    all_open = asyncio.Event()
    release = asyncio.Event()
    body = {"prompt": ENHANCE_PROMPT, "direction": "details"}
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=None)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:

        async def one() -> None:
            nonlocal opened
            async with http.post(url, json=body) as resp:
                if resp.status != 200:
                    return
                while True:
                    line = await resp.content.readline()
                    if not line:
                        return
                    if line.startswith(b"data:"):
                        break
                opened += 1
                if opened == count:
                    all_open.set()
                await release.wait()

        started = time.monotonic()
        tasks = [asyncio.create_task(one()) for _ in range(count)]
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_open.wait(), wait)
            took = time.monotonic() - started
            say(f"  {opened} of {count} streams open after {took:.1f} s")
            async with RssSampler(pid, interval=0.05) as sampler:
                await asyncio.sleep(1.0)
            peak = sampler.peak
        finally:
            release.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return opened, idle, peak, took


# --------------------------------------------------------------------------- generate


async def generate_load(
    base: str, seconds: float, concurrency: int, fingerprint: str
) -> tuple[float, float, float, int, int]:
    """(generates/s, p50 ms, p99 ms, generates, failures) for `concurrency` closed-loop
    clients, each checking in a fresh fingerprint before every 10 generates."""
    latencies: list[float] = []
    failures = 0
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        end = time.perf_counter() + seconds
        started = time.perf_counter()

        async def worker(w: int) -> None:
            nonlocal failures
            n = 0
            while time.perf_counter() < end:
                owner = f"{fingerprint}-{w}-{n}"
                n += 1
                await check_in(http, base, owner)
                for i in range(10):
                    if time.perf_counter() >= end:
                        return
                    body = {
                        # "fail": the demo draws nothing for it (see the module docstring)
                        "prompt": f"benchmark generate {w}.{n}.{i} (fail)",
                        "size": "1:1",
                        "fingerprint": owner,
                    }
                    sent = time.perf_counter()
                    status, answer = await call_json(http, f"{base}/api/images/generate", body)
                    if status == 200 and answer.get("code") == 0:
                        latencies.append((time.perf_counter() - sent) * 1000)
                    else:
                        failures += 1

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    if not latencies:
        raise RuntimeError("no generate succeeded")
    p50 = latencies[len(latencies) // 2]
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return len(latencies) / elapsed, p50, p99, len(latencies), failures


# --------------------------------------------------------------------------- figures


def figure(
    scenario: str,
    metric: str,
    value: float | int,
    unit: str,
    *,
    reference: float | int | None = None,
    reference_metric: str | None = None,
    target: str | None = None,
    met: bool | None = None,
    note: str | None = None,
) -> dict[str, Any]:
    def tidy(x: float | int | None) -> float | int | None:
        if isinstance(x, float):
            return round(x, 3) if abs(x) < 10 else round(x, 1)
        return x

    return {
        "scenario": scenario,
        "metric": metric,
        "value": tidy(value),
        "unit": unit,
        "reference": tidy(reference),
        "reference_metric": reference_metric,
        "target": target,
        "met": met,
        "note": note,
    }


def image_figures(
    scenario: str, prefix: str, run: ImageRun, nginx_metric: str, *, floor: float, what: str
) -> list[dict[str, Any]]:
    """Throughput of our image route beside nginx's, and their ratio against `floor`."""
    met = run.ratio >= floor
    return [
        figure(scenario, f"{prefix}_mib_s", run.ours_mib, "MiB/s",
               reference=run.theirs_mib, reference_metric=nginx_metric,
               note=f"{run.errors} failed downloads" if run.errors else None),
        figure(scenario, nginx_metric, run.theirs_mib, "MiB/s"),
        figure(
            scenario, f"{prefix}_ratio_vs_nginx", run.ratio, "ratio",
            reference=run.theirs_mib, reference_metric=nginx_metric,
            target=f">= {floor} ({floor:.0%} of nginx {what})", met=met,
            note=None if met else f"missed by {floor - run.ratio:.2f} ({run.ratio:.0%} of nginx)",
        ),
    ]  # fmt: skip


def wrk_figures(
    scenario: str, prefix: str, result: WrkResult, suffix: str = ""
) -> list[dict[str, Any]]:
    note = f"{result.errors} failed requests" if result.errors else None
    return [
        figure(scenario, f"{prefix}_rps{suffix}", result.rps, "req/s", note=note),
        figure(scenario, f"{prefix}_p50_ms{suffix}", result.p50_ms, "ms"),
        figure(scenario, f"{prefix}_p99_ms{suffix}", result.p99_ms, "ms"),
    ]


# --------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class Ports:
    """nginx's listening ports: proxy to upstream 1, to upstream 2, files, proxy to S3."""

    up1: int
    up2: int
    files: int
    s3: int


@dataclass(frozen=True)
class ImageRun:
    ours_mib: float
    theirs_mib: float
    idle: float
    peak: float
    hwm: float
    errors: int

    @property
    def ratio(self) -> float:
        return self.ours_mib / self.theirs_mib if self.theirs_mib else 0.0

    @property
    def growth(self) -> float:
        return self.peak - self.idle


class Bench:
    def __init__(self, plan: Plan, tmp: Path, procs: Processes) -> None:
        self.plan = plan
        self.tmp = tmp
        self.procs = procs
        self.wrk = Wrk(tmp)
        self.key = secrets.token_urlsafe(18)
        self.token = secrets.token_hex(4)
        self.data_dir = tmp / "data"
        self.figures: list[dict[str, Any]] = []

    def add(self, *figs: dict[str, Any]) -> None:
        self.figures.extend(figs)

    def start_upstream(
        self, name: str, task_seconds: float, word_delay: float, image_bytes: int = IMAGE_BYTES
    ) -> tuple[subprocess.Popen[bytes], str]:
        port = free_port()
        cmd = [PY, str(BENCH / "upstream.py"), "--port", str(port), "--api-key", self.key]
        cmd += ["--task-seconds", str(task_seconds), "--word-delay", str(word_delay)]
        cmd += ["--image-bytes", str(image_bytes)]
        return self.procs.start(name, cmd, cwd=self.tmp), f"http://127.0.0.1:{port}"

    async def start_service(
        self,
        http: aiohttp.ClientSession,
        upstream: str,
        workers: int,
        name: str,
        *,
        data_dir: Path | None = None,
        extra: dict[str, str] | None = None,
    ) -> Service:
        port = free_port()
        cmd = [PY, "-m", "scenemint", "serve", "--port", str(port)]
        if workers > 1:
            cmd += ["--workers", str(workers)]
        env = service_env(upstream, self.key, data_dir or self.data_dir, extra)
        # cwd: a directory without a .env file, so only the environment above counts
        proc = self.procs.start(name, cmd, env=env, cwd=self.tmp)
        service = Service(proc, port, workers, name)
        await wait_http(http, f"{service.base}/healthz", proc, self.procs, name)
        if workers > 1:
            await asyncio.sleep(1.5)  # the first worker answered; let the others finish starting
        say(f"{name} up on {service.base} ({workers} worker{'s' if workers > 1 else ''})")
        return service

    def start_nginx(
        self, up1: str, up2: str, s3_port: int
    ) -> tuple[subprocess.Popen[bytes], Ports]:
        ngx = self.tmp / "nginx"
        ngx.mkdir()
        ports = Ports(free_port(), free_port(), free_port(), free_port())
        text = (BENCH / "nginx.conf.template").read_text()
        for name, value in {
            # as root, nginx's workers would run as nobody, who cannot enter our temp dir
            "@USER@": "user root;" if os.geteuid() == 0 else "",
            "@DIR@": str(ngx),
            "@KEY@": self.key,
            "@UP1@": up1.rsplit(":", 1)[1],
            "@UP2@": up2.rsplit(":", 1)[1],
            "@S3@": str(s3_port),
            # the phase-1 service's image directory (its default store: <data dir>/images)
            "@IMAGES@": str(self.data_dir / "images"),
            "@PORT1@": str(ports.up1),
            "@PORT2@": str(ports.up2),
            "@PORT3@": str(ports.files),
            "@PORT4@": str(ports.s3),
        }.items():
            text = text.replace(name, value)
        conf = ngx / "nginx.conf"
        conf.write_text(text)
        proc = self.procs.start("nginx", ["nginx", "-c", str(conf), "-p", str(ngx)], cwd=ngx)
        return proc, ports

    async def run(self, only: str | None = None) -> None:
        timeout = aiohttp.ClientTimeout(total=60)
        if only == "events":
            async with aiohttp.ClientSession(timeout=timeout) as http:
                await self.events(http)
            return
        if only == "jobs":
            await self.job_runner()
            return
        async with aiohttp.ClientSession(timeout=timeout) as http:
            # everything that only waits is started at once; idle processes cost no CPU
            up1, up1_url = self.start_upstream("upstream-1", FAST_TASK_SECONDS, PHASE1_WORD_DELAY)
            up2, up2_url = self.start_upstream("upstream-2", NEVER, STREAM_WORD_DELAY)
            floor_port = free_port()
            floor = self.procs.start(
                "asgi-floor", [PY, str(BENCH / "asgi_floor.py"), "--port", str(floor_port)]
            )
            moto, moto_port = start_moto(self.procs, self.tmp)
            moto_url = f"http://127.0.0.1:{moto_port}"
            nginx, ports = self.start_nginx(up1_url, up2_url, moto_port)
            floor_url = f"http://127.0.0.1:{floor_port}"
            await asyncio.gather(
                wait_http(http, f"{up1_url}/bench/stats", up1, self.procs, "upstream-1"),
                wait_http(http, f"{up2_url}/bench/stats", up2, self.procs, "upstream-2"),
                wait_http(http, f"{floor_url}/", floor, self.procs, "asgi-floor"),
                wait_http(
                    http, f"http://127.0.0.1:{ports.up1}/nginx-health", nginx, self.procs, "nginx"
                ),
                wait_http(http, f"{moto_url}/moto-api/", moto, self.procs, "moto"),
            )
            await create_public_bucket(http, moto_url, S3_BUCKET)
            completed = await self.phase1(http, up1_url, ports)
            await self.generate_upstreams(http, up1_url)
            await self.s3_images(http, up1_url, moto_url, ports)
            self.procs.stop(moto)
            await self.downloads_per_task(http, up1_url)
            self.procs.stop(up1)
            await self.phase2(http, up2_url, ports.up2, floor_url, completed)
            self.procs.stop(floor)
            self.procs.stop(nginx)
            self.procs.stop(up2)
            await self.events(http)
        await self.job_runner()

    # -- the openai kind's job runner (bench/jobs.py) ----------------------------------------

    async def job_runner(self) -> None:
        say(f"job runner: openai kind, {jobs.RUNNERS} runners, 2 s generations")
        result = await jobs.measure(rounds=self.plan.job_rounds)
        ratio = result["utilisation"]
        self.add(
            figure(
                "openai kind job runner",
                "job_runner_utilisation",
                ratio,
                "ratio",
                target=">= 0.95",
                met=ratio >= 0.95,
                note=(
                    f"{result['tasks']} jobs of {result['generation_seconds']} s on"
                    f" {result['runners']} runners: all done in {result['all_done_s']} s"
                    f" (ideal {result['ideal_s']} s)"
                ),
            )
        )

    # -- generate with three upstreams beside one ---------------------------------------------

    async def generate_upstreams(self, http: aiohttp.ClientSession, upstream: str) -> None:
        """generate_rps of a service with one upstream and of one with three (a file of
        three names, all priority 1 with weights 3:2:1, in front of the same upstream
        server, so that only the service's routing differs), alternated, each on a fresh
        SQLite file: the median of each and their ratio."""
        plan = self.plan
        rounds = 2 if plan.quick else 3
        seconds = plan.generate_seconds
        file = self.tmp / "three-upstreams.toml"
        file.write_text(
            "".join(
                f'[[upstream]]\nname = "{name}"\nbase_url = "{upstream}"\n'
                f'api_key_env = "BENCH_UPSTREAM_KEY"\npriority = 1\nweight = {weight}\n\n'
                for name, weight in (("pool-a", 3), ("pool-b", 2), ("pool-c", 1))
            )
        )
        three = {"SCENEMINT_UPSTREAMS_FILE": str(file), "BENCH_UPSTREAM_KEY": self.key}
        rates: dict[str, list[float]] = {"one": [], "three": []}
        say(f"generate, one upstream vs three: {rounds} rounds of {seconds:.0f} s each")
        for n in range(rounds):
            for label, extra in (("one", {}), ("three", three)):
                name = f"service-generate-{label}-{n}"
                svc = await self.start_service(
                    http, upstream, 1, name, data_dir=self.tmp / name, extra=extra
                )
                rate, _, _, _, failed = await generate_load(
                    svc.base, seconds, POLLERS, f"bench{self.token}-{label}{n}"
                )
                self.procs.stop(svc.proc)
                if failed:
                    raise RuntimeError(f"{failed} generates failed with {label} upstream(s)")
                rates[label].append(rate)
                say(f"  {label} upstream(s), round {n + 1}: {rate:,.0f} generates/s")
        one, three_rate = statistics.median(rates["one"]), statistics.median(rates["three"])
        ratio = three_rate / one
        scenario = "generate with three upstreams (weights 3:2:1) beside one, 64 clients"
        self.add(
            figure(scenario, "generate_rps_one_upstream", one, "req/s"),
            figure(scenario, "generate_rps_three_upstreams", three_rate, "req/s"),
            figure(
                scenario,
                "generate_three_upstreams_ratio",
                ratio,
                "ratio",
                target=">= 0.9",
                met=ratio >= 0.9,
                note=f"medians of {rounds} alternated rounds: "
                + ", ".join(f"{k} {[round(r) for r in v]}" for k, v in rates.items()),
            ),
        )

    # -- task events ---------------------------------------------------------------------------

    async def events(self, http: aiohttp.ClientSession) -> None:
        fast, fast_url = self.start_upstream(
            "upstream-events-fast", EVENT_TASK_SECONDS, PHASE1_WORD_DELAY, EVENT_IMAGE_BYTES
        )
        never, never_url = self.start_upstream("upstream-events-never", NEVER, STREAM_WORD_DELAY)
        await asyncio.gather(
            wait_http(http, f"{fast_url}/bench/stats", fast, self.procs, "upstream-events-fast"),
            wait_http(http, f"{never_url}/bench/stats", never, self.procs, "upstream-events-never"),
        )
        await self.event_latency(http, fast_url)
        self.procs.stop(fast)
        await self.event_watchers(http, never_url)
        await self.event_delay_across(http, never_url)
        self.procs.stop(never)

    async def event_latency(self, http: aiohttp.ClientSession, upstream: str) -> None:
        """From the upstream's report of a finished task to the client seeing `completed`:
        through the events, and by polling every second (the client library's `wait()`
        before events), for tasks made at the same time on one service, side by side."""
        count = EVENT_LATENCY_TASKS
        say(f"task events: completed latency, {count} tasks followed by events, {count} polled")
        data_dir = self.tmp / "data-events-latency"
        svc = await self.start_service(http, upstream, 1, "service-events", data_dir=data_dir)
        host, port = "127.0.0.1", svc.port
        seen: dict[str, tuple[str, float]] = {}  # task id -> (how it was seen, when)

        async def by_events(task_id: str) -> None:
            watcher = events.Watcher(host, port, task_id)
            await watcher.run()
            moment = watcher.status_seen("completed")
            if moment is None:
                raise RuntimeError(f"no completed event for {task_id}: {watcher.error}")
            seen[task_id] = ("events", moment)

        async def by_polls(task_id: str) -> None:
            while await task_status(http, svc.base, task_id) != "completed":
                await asyncio.sleep(1.0)
            seen[task_id] = ("polls", time.time())

        async def one(n: int) -> None:
            # started spread over a second: the upstream finishes each at its own phase
            await asyncio.sleep(n / (2 * count))
            (task_id,) = await make_tasks(
                http, svc.base, 1, "a lighthouse at dusk, events", f"bench{self.token}-ev{n}"
            )
            await (by_events if n % 2 == 0 else by_polls)(task_id)

        await asyncio.gather(*(one(n) for n in range(2 * count)))
        self.procs.stop(svc.proc)
        ids = list(seen)
        async with http.get(f"{upstream}/bench/reported", params={"ids": ",".join(ids)}) as r:
            reported: dict[str, float] = await r.json()
        written = await events.ledger_times(
            f"sqlite:///{(data_dir / 'scenemint.sqlite3').as_posix()}", ids
        )
        copy, after = [], {"events": [], "polls": []}  # ms
        for task_id, (how, moment) in seen.items():
            copy.append((written[task_id] - reported[task_id]) * 1000)
            after[how].append((moment - reported[task_id]) * 1000)
        pushed = statistics.median(after["events"])
        polled = statistics.median(after["polls"])
        say(f"  reported -> completed written (the image copy): {events.summary(copy)}")
        say(f"  reported -> completed event: {events.summary(after['events'])}")
        say(f"  reported -> completed poll (1 s polls): {events.summary(after['polls'])}")
        scenario = (
            f"completed latency from the upstream's report ({count}+{count} tasks,"
            f" {EVENT_IMAGE_BYTES // 1024} KiB images, 1 worker)"
        )
        self.add(
            figure(scenario, "completed_event_latency_ms", pushed, "ms",
                   reference=polled, reference_metric="completed_poll_latency_ms",
                   note="p50; " + events.summary(after["events"])),
            figure(scenario, "completed_poll_latency_ms", polled, "ms",
                   note="p50, polls every 1 s (before events); " + events.summary(after["polls"])),
            figure(scenario, "completed_copy_ms", statistics.median(copy), "ms",
                   note="p50 from the report to the completed ledger write (the image copy)"),
        )  # fmt: skip

    async def event_watchers(self, http: aiohttp.ClientSession, upstream: str) -> None:
        """RSS of one worker holding WATCHERS open event streams over WATCHED_TASKS tasks,
        and the upstream's task listings while they are held, beside the listings while
        one client per task polls it every second (what one poller of each costs; the
        clients start spread over a second, as independent clients would)."""
        hold = 4.0 if self.plan.quick else 10.0
        say(f"task events: {WATCHERS:,} watchers of {WATCHED_TASKS} unfinished tasks, {hold:.0f} s")
        extra = {"SCENEMINT_MAX_CONNECTIONS": str(WATCHERS + 1000)}
        svc = await self.start_service(
            http, upstream, 1, "service-watchers", data_dir=self.tmp / "data-watchers", extra=extra
        )
        owner = f"bench{self.token}-w"
        ids = await make_tasks(http, svc.base, WATCHED_TASKS, "fail: watched", owner)
        await asyncio.sleep(1.0)
        idle = rss_mib(svc.proc.pid)[0]

        async def poll_each_second(n: int, task_id: str) -> None:
            await asyncio.sleep(n / len(ids))  # independent clients: each at its own phase
            while True:
                await task_status(http, svc.base, task_id)
                await asyncio.sleep(1.0)

        before = (await upstream_counts(http, upstream)).get("list", 0)
        pollers = [asyncio.create_task(poll_each_second(n, i)) for n, i in enumerate(ids)]
        await asyncio.sleep(hold)
        for poller in pollers:
            poller.cancel()
        await asyncio.gather(*pollers, return_exceptions=True)
        polled = (await upstream_counts(http, upstream)).get("list", 0) - before
        await asyncio.sleep(1.5)  # the answers cached for the pollers are stale

        started = time.monotonic()
        targets = [ids[n % len(ids)] for n in range(WATCHERS)]
        watchers, tasks = await events.open_watchers("127.0.0.1", svc.port, targets)
        try:
            opened = await events.all_first(watchers, timeout=60)
            took = time.monotonic() - started
            say(f"  {opened:,} of {WATCHERS:,} watchers have their first event after {took:.1f} s")
            before = (await upstream_counts(http, upstream)).get("list", 0)
            async with RssSampler(svc.proc.pid, interval=0.1) as sampler:
                await asyncio.sleep(hold)
            watched = (await upstream_counts(http, upstream)).get("list", 0) - before
            still = sum(1 for t in tasks if not t.done())
        finally:
            await events.close(tasks)
        self.procs.stop(svc.proc)
        errors = [w.error for w in watchers if w.error]
        if errors:
            say(f"  {len(errors)} watchers failed, e.g. {errors[0]}")
        peak = sampler.peak
        met = opened == WATCHERS and still == WATCHERS and peak <= 300
        ratio = watched / polled if polled else 0.0
        say(
            f"  RSS {idle:.0f} MiB idle, {peak:.0f} MiB peak; upstream listings in {hold:.0f} s:"
            f" {watched} with the watchers, {polled} with one poller a task"
        )
        scenario = f"{WATCHERS:,} task-event watchers of {WATCHED_TASKS} tasks (1 worker)"
        self.add(
            figure(scenario, "events_10000_watchers_rss_mib", peak, "MiB",
                   reference=idle, reference_metric="events_idle_rss_mib",
                   target="<= 300 MiB", met=met,
                   note=None if met else f"{opened} opened, {still} still open, peak {peak:.0f}"),
            figure(scenario, "events_upstream_listings_ratio", ratio, "ratio",
                   target="<= 1.1 (one poller a task)", met=ratio <= 1.1,
                   note=f"{watched} listings in {hold:.0f} s with {WATCHERS:,} watchers,"
                   f" {polled} with one client a task polling every second"),
        )  # fmt: skip

    async def event_delay_across(self, http: aiohttp.ClientSession, upstream: str) -> None:
        """From a change another process writes (a refund, through the store's conditional
        write) to the event at a watcher of this service: PostgreSQL (NOTIFY), SQLite (the
        watched rows' versions read four times a second)."""
        database = f"scenemint_bench_events_{self.token}"
        url = await asyncio.to_thread(create_database, database)
        try:
            for label, database_url in (("postgres", url), ("sqlite", None)):
                if label == "postgres" and database_url is None:
                    say("task events across processes: no PostgreSQL on 127.0.0.1:5432, skipped")
                    continue
                await self.event_delay_on(http, upstream, label, database_url)
        finally:
            if url:
                await asyncio.to_thread(drop_database, database)

    async def event_delay_on(
        self, http: aiohttp.ClientSession, upstream: str, label: str, database_url: str | None
    ) -> None:
        count = EVENT_DELAY_TASKS
        say(f"task events across processes on {label}: {count} refunds written by the bench")
        data_dir = self.tmp / f"data-events-{label}"
        extra = {"SCENEMINT_DATABASE_URL": database_url} if database_url else {}
        svc = await self.start_service(
            http, upstream, 1, f"service-events-{label}", data_dir=data_dir, extra=extra
        )
        owner = f"bench{self.token}-{label}"
        ids = await make_tasks(http, svc.base, count, "fail: refunded", owner)
        watchers, tasks = await events.open_watchers("127.0.0.1", svc.port, ids)
        try:
            if await events.all_first(watchers, timeout=30) != count:
                raise RuntimeError(f"watchers on {label} did not get their first event")
            written = await events.refund_elsewhere(
                database_url or f"sqlite:///{(data_dir / 'scenemint.sqlite3').as_posix()}",
                ids,
                gap=0.1,
            )
            await asyncio.wait(tasks, timeout=10)
        finally:
            await events.close(tasks)
        self.procs.stop(svc.proc)
        delays = []
        for watcher in watchers:
            moment = watcher.status_seen("failed")
            if moment is None:
                raise RuntimeError(f"no failed event on {label} for {watcher.task_id}")
            delays.append((moment - written[watcher.task_id]) * 1000)
        say(f"  change -> event: {events.summary(delays)}")
        p90 = events.percentile(delays, 0.9)
        how = "LISTEN/NOTIFY" if label == "postgres" else "versions read every 0.25 s"
        self.add(
            figure(f"a change by another process reaches a watcher ({label}: {how})",
                   f"events_cross_process_delay_ms_{label}", p90, "ms",
                   target="<= 1000 ms", met=max(delays) <= 1000,
                   note="p90; " + events.summary(delays)),
        )  # fmt: skip

    # -- phase 1: completed tasks, images, enhancement, generate ----------------------------

    async def phase1(self, http: aiohttp.ClientSession, upstream: str, ports: Ports) -> list[str]:
        plan = self.plan
        say("phase 1: demo upstream with 0.3 s tasks, service with 1 worker")
        svc = await self.start_service(http, upstream, 1, "service-phase1")
        ids = await make_tasks(
            http, svc.base, IMAGES, "a lighthouse at dusk, benchmark", f"bench{self.token}-img"
        )
        await wait_completed(http, svc.base, ids)
        say(f"{len(ids)} completed tasks")
        polls = [f"/api/images/tasks/{i}" for i in ids]

        # polls of completed tasks: the ledger answers, the upstream is never asked
        result = await self.wrk.run(
            svc.base,
            polls,
            connections=POLLERS,
            seconds=plan.wrk_seconds,
            label="poll completed, 1 worker",
        )
        self.add(
            *wrk_figures("poll completed task (service, 1 worker)", "poll_completed", result, "_1w")
        )

        await self.file_images(http, svc, ids, ports.files)
        await self.enhancement(http, svc, upstream)

        say(f"generate: 64 clients, {plan.generate_seconds:.0f} s")
        rate, p50, p99, _, failed = await generate_load(
            svc.base, plan.generate_seconds, POLLERS, f"bench{self.token}-gen"
        )
        say(f"  {rate:,.0f} generates/s, p50 {p50:.1f} ms, p99 {p99:.1f} ms, {failed} failed")
        scenario = "generate (check-in, ledger write, upstream submit; 64 clients, 1 worker)"
        note = f"{failed} failed generates" if failed else None
        self.add(
            figure(scenario, "generate_rps", rate, "req/s", note=note),
            figure(scenario, "generate_p50_ms", p50, "ms"),
            figure(scenario, "generate_p99_ms", p99, "ms"),
        )
        self.procs.stop(svc.proc)
        return ids

    async def compare_images(
        self,
        svc: Service,
        ids: list[str],
        reference: str,
        reference_paths: list[str],
        what: str,
    ) -> ImageRun:
        """wrk over the tasks' images, through the service (RSS sampled) and then `reference`."""
        paths = [f"/api/images/tasks/{i}/image" for i in ids]
        await asyncio.sleep(0.5)  # the downloads before this one are over
        idle, _ = rss_mib(svc.proc.pid)
        async with RssSampler(svc.proc.pid) as sampler:
            ours = await self.wrk.run(
                svc.base,
                paths,
                connections=IMAGE_CONNECTIONS,
                seconds=self.plan.wrk_seconds,
                label=f"{what}, service",
            )
        _, hwm = rss_mib(svc.proc.pid)
        theirs = await self.wrk.run(
            reference,
            reference_paths,
            connections=IMAGE_CONNECTIONS,
            seconds=self.plan.wrk_seconds,
            label=f"{what}, nginx",
        )
        run = ImageRun(
            ours_mib=ours.requests * IMAGE_BYTES / MiB / ours.seconds,
            theirs_mib=theirs.requests * IMAGE_BYTES / MiB / theirs.seconds,
            idle=idle,
            peak=sampler.peak,
            hwm=hwm,
            errors=ours.errors + theirs.errors,
        )
        say(
            f"  service {run.ours_mib:,.0f} MiB/s, nginx {run.theirs_mib:,.0f} MiB/s"
            f" (ratio {run.ratio:.2f}), RSS +{run.growth:.1f} MiB"
        )
        return run

    async def file_images(
        self, http: aiohttp.ClientSession, svc: Service, ids: list[str], nginx: int
    ) -> None:
        say(f"images from the file store: {len(ids)} distinct 4 MiB images")
        # every image once (this also loads the image path's code before idle is measured)
        keys = await stored_keys(http, svc.base, ids)
        for key in keys:
            if not (self.data_dir / "images" / key).is_file():
                raise RuntimeError(f"image {key} is not in the service's image directory")
        nginx_base = f"http://127.0.0.1:{nginx}"
        nginx_paths = [f"/images/{key}" for key in keys]
        await same_bytes(http, nginx_base + nginx_paths[0], keys[0], "nginx")
        run = await self.compare_images(svc, ids, nginx_base, nginx_paths, "stored image")
        scenario = "stored images, file store (16 distinct 4 MiB images, 16 connections, 1 worker)"
        growth_met = run.growth <= 30
        self.add(
            *image_figures(scenario, "image_store", run, "nginx_sendfile_mib_s", floor=0.8,
                           what="sendfile of the same files"),
            figure(
                scenario, "image_store_rss_growth_mib", run.growth, "MiB",
                reference=run.idle, reference_metric="image_store_idle_rss_mib",
                target="<= 30 MiB over idle", met=growth_met,
                note=None if growth_met else f"missed by {run.growth - 30:.1f} MiB",
            ),
            figure(scenario, "image_store_idle_rss_mib", run.idle, "MiB"),
            figure(scenario, "image_store_peak_rss_mib", run.peak, "MiB",
                   note=f"VmHWM since start {run.hwm:.1f} MiB"),
        )  # fmt: skip

    async def s3_images(
        self, http: aiohttp.ClientSession, upstream: str, moto: str, ports: Ports
    ) -> None:
        say(f"images from the S3 store (moto at {moto}), service with 1 worker")
        extra = {
            "SCENEMINT_IMAGE_STORE": f"s3://{S3_BUCKET}/{S3_PREFIX}",
            "AWS_ENDPOINT_URL": moto,
            "AWS_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
        }
        svc = await self.start_service(
            http, upstream, 1, "service-s3", data_dir=self.tmp / "data-s3", extra=extra
        )
        ids = await make_tasks(
            http, svc.base, IMAGES, "a lighthouse in the fog, benchmark", f"bench{self.token}-s3"
        )
        await wait_completed(http, svc.base, ids)
        keys = await stored_keys(http, svc.base, ids)
        nginx_base = f"http://127.0.0.1:{ports.s3}"
        nginx_paths = [f"/{S3_BUCKET}/{S3_PREFIX}/{key}" for key in keys]
        # nginx reads the object straight from moto: the same bytes the service copied there
        await same_bytes(http, nginx_base + nginx_paths[0], keys[0], "nginx (from moto)")
        run = await self.compare_images(svc, ids, nginx_base, nginx_paths, "S3 image")
        self.procs.stop(svc.proc)
        scenario = "stored images, S3 store on moto, streamed (16 distinct 4 MiB, 16 connections)"
        self.add(
            *image_figures(scenario, "image_s3", run, "nginx_s3_proxy_mib_s", floor=0.7,
                           what="proxy_pass to the same S3"),
            figure(scenario, "image_s3_rss_growth_mib", run.growth, "MiB",
                   reference=run.idle, reference_metric="image_s3_idle_rss_mib"),
            figure(scenario, "image_s3_idle_rss_mib", run.idle, "MiB"),
        )  # fmt: skip

    async def downloads_per_task(self, http: aiohttp.ClientSession, upstream: str) -> None:
        database = f"scenemint_bench_{self.token}"
        url = await asyncio.to_thread(create_database, database)
        where = "one PostgreSQL database" if url else "one SQLite file (no PostgreSQL answered)"
        say(f"image downloads per task: two instances on {where}, {MULTI_POLLERS} pollers")
        extra = {"SCENEMINT_IMAGE_STORE": f"file://{self.tmp / 'images-shared'}"}
        if url:
            extra["SCENEMINT_DATABASE_URL"] = url
        instances: list[Service] = []
        try:
            for name in ("a", "b"):
                # own data directories on PostgreSQL; on SQLite the ledger is in the data dir
                data_dir = self.tmp / (f"data-multi-{name}" if url else "data-multi")
                instances.append(
                    await self.start_service(
                        http, upstream, 1, f"service-multi-{name}", data_dir=data_dir, extra=extra
                    )
                )
            (ids, served, polls, took), downloads = await self.poll_and_download(
                http, upstream, instances
            )
            copies = [await metric_value(http, s.base, "scenemint_image_copies_total")
                      for s in instances]  # fmt: skip
        finally:
            for svc in instances:
                self.procs.stop(svc.proc)
            if url:
                await asyncio.to_thread(drop_database, database)
        per_task = downloads / len(ids)
        say(
            f"  {downloads} image downloads upstream for {len(ids)} tasks"
            f" ({per_task:.2f} per task), {served} images served, {polls} polls, {took:.1f} s;"
            f" copies by instance: {', '.join(f'{c:.0f}' for c in copies)}"
        )
        scenario = (
            f"image downloads from the upstream per task ({len(ids)} tasks, {MULTI_POLLERS}"
            f" pollers, 2 instances on {where})"
        )
        met = per_task <= 1.0 and served == MULTI_POLLERS
        problems = []
        if per_task > 1.0:
            problems.append(f"{downloads - len(ids)} downloads more than one per task")
        if served != MULTI_POLLERS:
            problems.append(f"only {served} of {MULTI_POLLERS} pollers got their image")
        self.add(
            figure(
                scenario, "image_downloads_per_task", per_task, "downloads",
                reference=len(ids), reference_metric="tasks",
                target="<= 1.0", met=met, note="; ".join(problems) or None,
            ),
            figure(scenario, "image_downloads_upstream", downloads, "downloads"),
            figure(scenario, "image_downloads_served", served, "images"),
            figure(scenario, "image_downloads_polls", polls, "polls",
                   note=f"all completed and served in {took:.1f} s"),
            *(
                figure(scenario, f"image_copies_instance_{name}", c, "copies",
                       note="scenemint_image_copies_total of the instance")
                for name, c in zip("ab", copies, strict=True)
            ),
        )  # fmt: skip

    async def poll_and_download(
        self, http: aiohttp.ClientSession, upstream: str, instances: list[Service]
    ) -> tuple[tuple[list[str], int, int, float], int]:
        """Make MULTI_TASKS tasks (half through each instance), then two pollers per task,
        one on each instance, poll it until completed and download its image. ((ids, images
        served, polls, seconds), the upstream's image downloads meanwhile)."""
        before = await upstream_counts(http, upstream)
        half = MULTI_TASKS // len(instances)
        made = await asyncio.gather(
            *(
                make_tasks(
                    http, s.base, half, "a harbour at night, benchmark", f"bench{self.token}-m{n}"
                )
                for n, s in enumerate(instances)
            )
        )
        ids = [task_id for batch in made for task_id in batch]
        served = polls = 0
        digests: dict[str, set[str]] = {}
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=60)
        started = time.monotonic()
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as pollers:

            async def poller(n: int) -> None:
                nonlocal served, polls
                task_id = ids[n % len(ids)]
                base = instances[(n // len(ids)) % len(instances)].base
                while True:
                    polls += 1
                    state = await task_status(pollers, base, task_id)
                    if state == "failed":
                        raise RuntimeError(f"task {task_id} failed; see the logs")
                    if state == "completed":
                        break
                    await asyncio.sleep(0.01)
                url = f"{base}/api/images/tasks/{task_id}/image"
                digests.setdefault(task_id, set()).add(await fetch_image(pollers, url))
                served += 1

            async with asyncio.timeout(60):
                await asyncio.gather(*(poller(n) for n in range(MULTI_POLLERS)))
        took = time.monotonic() - started
        if any(len(found) != 1 for found in digests.values()):
            raise RuntimeError("two instances served different bytes for one task")
        after = await upstream_counts(http, upstream)
        downloads = after.get("image", 0) - before.get("image", 0)
        return (ids, served, polls, took), downloads

    async def enhancement(self, http: aiohttp.ClientSession, svc: Service, upstream: str) -> None:
        plan = self.plan
        ours_url = f"{svc.base}/api/prompts/enhance"
        theirs_url = f"{upstream}/v1/chat/completions"
        ours_body: dict[str, object] = {"prompt": ENHANCE_PROMPT, "direction": "details"}
        theirs_body = direct_chat_body()
        auth = {"Authorization": f"Bearer {self.key}"}
        say(f"enhance: time to first byte, {plan.ttfb_runs} runs each, alternating")
        ours: list[float] = []
        theirs: list[float] = []
        for _ in range(2):  # warm-up: connection pools, first-call imports
            await first_frame_ms(http, ours_url, ours_body, {})
            await first_frame_ms(http, theirs_url, theirs_body, auth)
        for _ in range(plan.ttfb_runs):
            ours.append(await first_frame_ms(http, ours_url, ours_body, {}))
            theirs.append(await first_frame_ms(http, theirs_url, theirs_body, auth))
        ours_ms, theirs_ms = statistics.median(ours), statistics.median(theirs)
        overhead = ours_ms - theirs_ms
        say(f"  service {ours_ms:.2f} ms, direct {theirs_ms:.2f} ms")

        say(f"enhance: buffering, {plan.buffer_streams} whole streams (+1 direct as control)")
        runs = await asyncio.gather(
            *(frame_times(http, ours_url, ours_body, {}) for _ in range(plan.buffer_streams)),
            frame_times(http, theirs_url, theirs_body, auth),
        )
        checked = buffered = 0
        for frames in runs[:-1]:
            c, b = count_buffered(frames, PHASE1_WORD_DELAY)
            checked += c
            buffered += b
        control_checked, control_buffered = count_buffered(runs[-1], PHASE1_WORD_DELAY)
        say(
            f"  {buffered} of {checked} chunks buffered"
            f" (direct: {control_buffered} of {control_checked})"
        )
        scenario = "prompt enhancement (streamed, 1 worker)"
        ttfb_met = overhead <= 5
        self.add(
            figure(
                scenario, "enhance_ttfb_overhead_ms", overhead, "ms",
                reference=theirs_ms, reference_metric="enhance_ttfb_direct_ms",
                target="<= 5 ms slower than direct", met=ttfb_met,
                note=None if ttfb_met else f"missed by {overhead - 5:.2f} ms",
            ),
            figure(scenario, "enhance_ttfb_service_ms", ours_ms, "ms"),
            figure(scenario, "enhance_ttfb_direct_ms", theirs_ms, "ms"),
            figure(
                scenario, "enhance_buffered_chunks", buffered, "chunks",
                reference=checked, reference_metric="enhance_chunks_checked",
                target="0", met=buffered == 0 and checked > 0,
                note=(
                    None if buffered == 0 and checked > 0
                    else f"{buffered} of {checked} chunks arrived with the one before"
                ),
            ),
            figure(scenario, "enhance_chunks_checked", checked, "chunks"),
            figure(
                scenario, "enhance_buffered_chunks_direct", control_buffered, "chunks",
                reference=control_checked, reference_metric="chunks checked (control)",
            ),
        )  # fmt: skip

    # -- phase 2: unfinished tasks, the poll path, open streams -------------------------------

    async def phase2(
        self,
        http: aiohttp.ClientSession,
        upstream: str,
        nginx: int,
        floor_url: str,
        completed: list[str],
    ) -> None:
        plan = self.plan
        say("phase 2: demo upstream with tasks that never finish, service with 1 worker")
        svc = await self.start_service(http, upstream, 1, "service-phase2-1w")
        ids = await make_tasks(
            http, svc.base, POLLERS, "benchmark poll (fail)", f"bench{self.token}-poll"
        )
        states = await asyncio.gather(*(task_status(http, svc.base, i) for i in ids))
        if any(s in ("completed", "failed") for s in states):
            raise RuntimeError(f"poll tasks are not unfinished: {sorted(set(states))}")
        polls = [f"/api/images/tasks/{i}" for i in ids]
        direct = [f"/api/image-tasks?ids={i}" for i in ids]
        auth = (f"Authorization: Bearer {self.key}",)
        secs = plan.wrk_seconds
        scenario = "poll running task (64 connections)"

        floor = await self.wrk.run(
            floor_url, polls, connections=POLLERS, seconds=secs, label="ASGI floor"
        )
        self.add(
            *wrk_figures(
                "ASGI floor (uvicorn+httptools, fixed JSON, 1 worker)", "asgi_floor", floor
            )
        )
        up = await self.wrk.run(
            upstream,
            direct,
            connections=POLLERS,
            seconds=secs,
            headers=auth,
            label="upstream direct",
        )
        self.add(*wrk_figures("upstream called directly (demo, aiohttp)", "upstream_direct", up))
        ngx = await self.wrk.run(
            f"http://127.0.0.1:{nginx}",
            polls,
            connections=POLLERS,
            seconds=secs,
            label="nginx proxy_pass",
        )
        self.add(
            *wrk_figures("nginx proxy_pass to the upstream (1 call per poll)", "nginx_poll", ngx)
        )

        before = await upstream_counts(http, upstream)
        ours = await self.wrk.run(
            svc.base, polls, connections=POLLERS, seconds=secs, label="service, 1 worker"
        )
        after = await upstream_counts(http, upstream)
        calls = after.get("list", 0) - before.get("list", 0)
        per_100 = 100 * calls / ours.requests if ours.requests else float("inf")
        say(f"  {calls} upstream calls for {ours.requests} polls: {per_100:.3f} per 100")
        rps_met = ours.rps >= 10_000 and ours.rps >= floor.rps / 3
        shortfalls = []
        if ours.rps < 10_000:
            shortfalls.append(f"{10_000 - ours.rps:,.0f} req/s short of 10,000")
        if ours.rps < floor.rps / 3:
            shortfalls.append(
                f"{floor.rps / 3 - ours.rps:,.0f} req/s short of a third of the floor"
            )
        self.add(
            figure(
                f"{scenario}, service 1 worker", "poll_running_rps_1w", ours.rps, "req/s",
                reference=floor.rps, reference_metric="asgi_floor_rps",
                target=">= 10,000 req/s and >= 1/3 of asgi_floor_rps", met=rps_met,
                note="; ".join(shortfalls)
                or (f"{ours.errors} failed requests" if ours.errors else None),
            ),
            figure(f"{scenario}, service 1 worker", "poll_running_p50_ms_1w", ours.p50_ms, "ms",
                   reference=ngx.p50_ms, reference_metric="nginx_poll_p50_ms"),
            figure(f"{scenario}, service 1 worker", "poll_running_p99_ms_1w", ours.p99_ms, "ms",
                   reference=ngx.p99_ms, reference_metric="nginx_poll_p99_ms"),
            figure(
                "upstream calls per 100 client polls (64 closed-loop pollers, one task each)",
                "upstream_calls_per_100_polls", per_100, "calls",
                reference=100, reference_metric="original design (one call per poll)",
                target="<= 5", met=per_100 <= 5,
                note=None if per_100 <= 5 else f"missed by {per_100 - 5:.2f}",
            ),
        )  # fmt: skip

        # added latency: one connection, so that queueing does not hide the per-request cost
        lat = plan.latency_seconds
        ours1 = await self.wrk.run(
            svc.base, polls, connections=1, seconds=lat, label="service, 1 connection"
        )
        up1 = await self.wrk.run(
            upstream,
            direct,
            connections=1,
            seconds=lat,
            headers=auth,
            label="upstream direct, 1 connection",
        )
        added = ours1.p50_ms - up1.p50_ms
        scenario1 = "poll running task, one connection: service vs the upstream called directly"
        self.add(
            figure(
                scenario1, "poll_added_latency_p50_ms", added, "ms",
                reference=up1.p50_ms, reference_metric="upstream_direct_p50_ms_1conn",
                target="<= 1 ms over a direct upstream call", met=added <= 1,
                note=None if added <= 1 else f"missed by {added - 1:.2f} ms",
            ),
            figure(scenario1, "poll_p50_ms_1conn", ours1.p50_ms, "ms"),
            figure(scenario1, "upstream_direct_p50_ms_1conn", up1.p50_ms, "ms"),
            # the same difference under load; there p50 is mostly queueing (64 / throughput)
            figure(
                "poll running task, 64 connections: service 1 worker vs the upstream directly",
                "poll_added_latency_p50_ms_64conn", ours.p50_ms - up.p50_ms, "ms",
                reference=up.p50_ms, reference_metric="upstream_direct_p50_ms",
            ),
        )  # fmt: skip

        await self.streams(svc)
        self.procs.stop(svc.proc)

        say("phase 2: service with 2 workers")
        svc2 = await self.start_service(http, upstream, 2, "service-phase2-2w")
        two = await self.wrk.run(
            svc2.base, polls, connections=POLLERS, seconds=secs, label="service, 2 workers"
        )
        self.add(*wrk_figures(f"{scenario}, service 2 workers", "poll_running", two, "_2w"))
        done = [f"/api/images/tasks/{i}" for i in completed]
        two_c = await self.wrk.run(
            svc2.base, done, connections=POLLERS, seconds=secs, label="poll completed, 2 workers"
        )
        self.add(
            *wrk_figures("poll completed task (service, 2 workers)", "poll_completed", two_c, "_2w")
        )
        self.procs.stop(svc2.proc)

    async def streams(self, svc: Service) -> None:
        say(f"enhance: {STREAMS} concurrent streams (upstream word delay {STREAM_WORD_DELAY} s)")
        opened, idle, peak, took = await hold_streams(
            f"{svc.base}/api/prompts/enhance", STREAMS, self.plan.stream_wait, svc.proc.pid
        )
        say(f"  RSS idle {idle:.1f} MiB, with the streams open {peak:.1f} MiB")
        scenario = f"{STREAMS} concurrent enhancement streams held open (1 worker)"
        problems = []
        if opened < STREAMS:
            from scenemint.config import Settings

            pool = Settings.model_fields["upstream_pool_size"].default
            problems.append(
                f"only {opened} of {STREAMS} streams had their first frame after {took:.1f} s"
                + (
                    f" (= SCENEMINT_UPSTREAM_POOL_SIZE, default {pool}: the rest wait for an"
                    " upstream connection)"
                    if opened == pool
                    else ""
                )
            )
        if peak > 250:
            problems.append(f"RSS {peak - 250:.1f} MiB over the target")
        self.add(
            figure(
                scenario, "streams_1000_rss_mib", peak, "MiB",
                reference=idle, reference_metric="streams_idle_rss_mib",
                target="<= 250 MiB with all 1,000 streams open", met=not problems,
                note="; ".join(problems) or None,
            ),
            figure(scenario, "streams_idle_rss_mib", idle, "MiB"),
            figure(scenario, "streams_1000_open", opened, "streams", reference=STREAMS,
                   reference_metric="streams requested"),
            figure(scenario, "streams_1000_seconds_to_open", took, "s"),
        )  # fmt: skip


# --------------------------------------------------------------------------- report


def command_version(cmd: list[str]) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except OSError as exc:
        return f"unavailable ({exc})"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0].strip() if text else "unknown"


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = None
    with contextlib.suppress(OSError), open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                memory = round(int(line.split()[1]) / 1024 / 1024, 1)
                break
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": memory,
        "python": platform.python_version(),
        "kernel": f"{platform.system()} {platform.release()}",
        "nginx": command_version(["nginx", "-v"]),
        "wrk": command_version(["wrk", "-v"]),
    }


def markdown_table(figures: list[dict[str, Any]]) -> str:
    def show(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:g}"
        return str(value)

    rows = ["| scenario | metric | value | reference | target | met |", "|---|---|---|---|---|---|"]
    for f in figures:
        reference = ""
        if f["reference"] is not None:
            reference = f"{show(f['reference'])} ({f['reference_metric']})"
        met = {True: "yes", False: "**NO**", None: ""}[f["met"]]
        if f["met"] is False and f["note"]:
            met += f": {f['note']}"
        value = f"{show(f['value'])} {f['unit']}"
        rows.append(
            f"| {f['scenario']} | `{f['metric']}` | {value} | {reference}"
            f" | {f['target'] or ''} | {met} |"
        )
    return "\n".join(rows)


def missing_tools() -> list[str]:
    return [tool for tool in ("nginx", "wrk") if shutil.which(tool) is None]


def raise_open_files() -> int:
    # 1,000 streams need ~2,000 sockets in the service and 1,000 here; the service and the
    # upstream are our children and inherit this limit
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def main() -> int:
    parser = argparse.ArgumentParser(description="SceneMint benchmark (see bench/run.py).")
    parser.add_argument("--quick", action="store_true", help="~3 s per measurement, about 70 s")
    parser.add_argument(
        "--only",
        choices=["events", "jobs"],
        help="run one part only (written to bench/results-<part>.json unless --output)",
    )
    parser.add_argument("--output", type=Path)
    parser.add_argument("--keep-temp", action="store_true", help="keep logs and configs")
    args = parser.parse_args()
    if args.output is None:
        args.output = BENCH / (f"results-{args.only}.json" if args.only else "results.json")

    missing = missing_tools()
    if missing:
        print(f"bench: {' and '.join(missing)} not found; {INSTALL_HINT}", file=sys.stderr)
        return 2
    limit = raise_open_files()
    if limit < 4096:
        say(f"warning: open-files limit is {limit}; the 1,000-stream scenario may fail")

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    plan = QUICK if args.quick else FULL
    load_before = os.getloadavg()
    if load_before[0] > 0.5:
        say(
            f"warning: load average {load_before[0]:.2f} before the start: other work is"
            " running on this machine, and the figures will be lower and noisier"
        )
    tmp = Path(tempfile.mkdtemp(prefix="scenemint-bench-"))
    (tmp / "logs").mkdir()
    procs = Processes(tmp / "logs")
    bench = Bench(plan, tmp, procs)
    started = time.monotonic()
    try:
        asyncio.run(bench.run(args.only))
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except Exception as exc:
        say(f"failed: {exc}")
        say(f"logs kept in {tmp / 'logs'}")
        args.keep_temp = True
        raise
    finally:
        procs.stop_all()
        if not args.keep_temp:
            shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.monotonic() - started

    figures = order(bench.figures)
    results = {
        "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "quick": plan.quick,
        "seconds": round(elapsed, 1),
        "machine": machine(),
        # other work on the machine skews everything: the 1-minute load before the start
        "load_average_before": round(load_before[0], 2),
        "plan": {
            "wrk_seconds": plan.wrk_seconds,
            "latency_seconds": plan.latency_seconds,
            "pollers": POLLERS,
            "image_connections": IMAGE_CONNECTIONS,
            "image_bytes": IMAGE_BYTES,
            "images": IMAGES,
            "multi_tasks": MULTI_TASKS,
            "multi_pollers": MULTI_POLLERS,
            "streams": STREAMS,
        },
        "figures": figures,
    }
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    say(f"done in {elapsed:.0f} s; wrote {args.output}")
    print(markdown_table(figures))
    print()
    print(json.dumps({"figures": figures}))
    return 0


_FIRST = (
    "poll_running_rps_1w",
    "poll_added_latency_p50_ms",
    "upstream_calls_per_100_polls",
    "image_store_ratio_vs_nginx",
    "image_store_rss_growth_mib",
    "image_s3_ratio_vs_nginx",
    "image_downloads_per_task",
    "enhance_ttfb_overhead_ms",
    "enhance_buffered_chunks",
    "streams_1000_rss_mib",
    "job_runner_utilisation",
)


def order(figures: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The figures with targets first, in the issue's order; the rest as measured."""
    first = [f for name in _FIRST for f in figures if f["metric"] == name]
    return first + [f for f in figures if f["metric"] not in _FIRST]


if __name__ == "__main__":
    sys.exit(main())
