#!/usr/bin/env python3
"""Hostile clients against a running service: does the server close them, how fast, and
what do they cost it in memory?

    python bench/hostile_clients.py --url http://127.0.0.1:3000 --count 2000
    python bench/hostile_clients.py --slowloris 2000 --idle 10000 --partial 2000 --wait 30
    scenemint serve --demo & python bench/hostile_clients.py --count 0 --bighead 20 \
        --stalled 200 --trickle 50 --make-image --pid $! --wait 90

Opens, all at the same time, kinds of connections that a server without deadlines or
limits holds for as long as the client likes, or that make it grow:

- slowloris: sends `GET /healthz HTTP/1.1`, `Host:` and then one byte of a header line every
  `--drip` seconds, never ending the head;
- idle: connects and sends nothing;
- partial body: sends a complete `POST /api/quota/status` head with `Content-Length: 1000`
  and 10 bytes of the body, then nothing;
- bighead: sends header lines of 64 KiB as fast as the server takes them, never ending the
  head (the header deadline limits time, not bytes: a server without a head limit grows
  by what these send within it);
- stalled: asks for a large answer (`--big-path`, or the image of a task made with
  `--make-image`) with a 4 KiB receive buffer and never reads it;
- trickle: the same, read at `--trickle-rate` bytes a second (1 KiB/s).

Each connection waits (dripping, for the slowloris ones) until the server closes it or
`--wait` seconds have passed since it was opened; then this script closes what is left.
While they are open, an honest client asks `GET /healthz` on a new connection every
`--probe-interval` seconds. The report gives, per kind: connections opened, closed by the
server (and how: 408, 431, 503, closed without an answer, reset), left open by the server,
and the seconds from open to close (p50, p90, max); the honest client's answers; and, with
`--pid`, the server's resident memory (its process and children) before, at the peak and
at the end. Progress goes to stderr; the report to stdout, with `--json` as one JSON object.

Everything runs in this one process on asyncio: `--count 10000` needs as many file
descriptors (the script lifts its soft limit to the hard one; see `ulimit -n`). The
service lifts its own. The server's limits are its own settings: `SCENEMINT_HEADER_TIMEOUT`
(10 s: slowloris, idle, and the partial body's grace), `SCENEMINT_BODY_MIN_RATE`,
`SCENEMINT_MAX_CONNECTIONS` (8192: past it a connection gets 503 at once), the head limit
(64 KiB: 431), `SCENEMINT_SEND_TIMEOUT` and `SCENEMINT_SEND_MIN_RATE` (stalled, trickle).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import socket
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

KINDS = ("slowloris", "idle", "partial", "bighead", "stalled", "trickle")
_BIG_LINE = b"X-Filler: " + b"a" * (64 * 1024) + b"\r\n"


def say(message: str) -> None:
    print(f"[hostile {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Outcome:
    kind: str
    opened: float | None = None  # monotonic time of the established connection
    closed_after: float | None = None  # seconds from open to the server's close
    how: str = "open"  # open, 408, 503, <other status>, silent, reset, connect_failed
    error: str = ""


@dataclass
class Probe:
    ok: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)


def status_of(data: bytes) -> str:
    if not data:
        return "silent"
    parts = data.split(b" ", 2)
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/"):
        return parts[1].decode("ascii", "replace")
    return "garbage"


async def stalled(sock: Any, outcome: Outcome, until: float) -> None:
    """Read nothing; notice the server's reset (the socket's pending error) when it comes."""
    while time.monotonic() < until:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            assert outcome.opened is not None
            outcome.how = "reset"
            outcome.closed_after = time.monotonic() - outcome.opened
            return
        await asyncio.sleep(0.25)


async def wait_closed(
    reader: asyncio.StreamReader, outcome: Outcome, until: float, first: bytes = b""
) -> bool:
    """Read until the server closes (True) or `until` passes (False); note how it closed."""
    data = first
    while True:
        left = until - time.monotonic()
        if left <= 0:
            return False
        try:
            chunk = await asyncio.wait_for(reader.read(65536), left)
        except TimeoutError:
            return False
        except (ConnectionResetError, BrokenPipeError):
            outcome.how = status_of(data) if data else "reset"
            break
        if not chunk:
            outcome.how = status_of(data)
            break
        data += chunk
    assert outcome.opened is not None
    outcome.closed_after = time.monotonic() - outcome.opened
    return True


async def one(
    kind: str,
    host: str,
    port: int,
    args: argparse.Namespace,
    gate: asyncio.Semaphore,
    outcomes: list[Outcome],
) -> None:
    outcome = Outcome(kind)
    outcomes.append(outcome)
    async with gate:  # at most so many connects at once (the listen backlog is finite)
        try:
            sock = socket.socket()
            if kind in ("stalled", "trickle"):  # a small window: the server's buffer fills
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (host, port)), 30)
            # a small stream buffer too, for the readers: what they take is what they read
            reader, writer = await asyncio.open_connection(sock=sock, limit=2048)
        except (OSError, TimeoutError) as exc:
            outcome.how, outcome.error = "connect_failed", type(exc).__name__
            return
    outcome.opened = time.monotonic()
    until = outcome.opened + args.wait
    try:
        if kind == "idle":
            await wait_closed(reader, outcome, until)
        elif kind == "partial":
            writer.write(
                b"POST /api/quota/status HTTP/1.1\r\nHost: hostile\r\n"
                b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                b'{"fingerp'
            )
            await wait_closed(reader, outcome, until)
        elif kind == "bighead":
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: hostile\r\n")
            answered = asyncio.ensure_future(reader.read(65536))
            try:
                while time.monotonic() < until and not answered.done():
                    writer.write(_BIG_LINE)
                    drained = asyncio.ensure_future(writer.drain())
                    await asyncio.wait(
                        {drained, answered},
                        timeout=max(0.01, until - time.monotonic()),
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    if not drained.done():
                        drained.cancel()
            except (ConnectionResetError, BrokenPipeError):
                pass
            if not answered.done():  # the wait ran out: the server kept taking it all
                answered.cancel()
                await asyncio.gather(answered, return_exceptions=True)
                return
            try:
                first = answered.result()
            except (ConnectionResetError, BrokenPipeError):
                first, outcome.how = b"", "reset"
            if not first:  # reset, or closed without a word
                outcome.how = outcome.how if outcome.how == "reset" else "silent"
                outcome.closed_after = time.monotonic() - outcome.opened
            else:
                await wait_closed(reader, outcome, until, first)
        elif kind in ("stalled", "trickle"):
            writer.write(f"GET {args.big_path} HTTP/1.1\r\nHost: hostile\r\n\r\n".encode())
            if kind == "stalled":
                await stalled(writer.get_extra_info("socket"), outcome, until)
            else:
                await trickle(
                    reader, writer.get_extra_info("socket"), outcome, until, args.trickle_rate
                )
        else:  # slowloris
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: hostile\r\nX-Slow: ")
            while time.monotonic() < until:
                try:
                    writer.write(b"a")
                    chunk = await asyncio.wait_for(reader.read(65536), args.drip)
                except TimeoutError:
                    continue
                except (ConnectionResetError, BrokenPipeError):
                    outcome.how = "reset"
                    outcome.closed_after = time.monotonic() - outcome.opened
                    break
                if not chunk:
                    outcome.how = "silent"
                    outcome.closed_after = time.monotonic() - outcome.opened
                else:
                    await wait_closed(reader, outcome, until, chunk)
                break
    except (ConnectionResetError, BrokenPipeError):
        outcome.how = "reset"
        outcome.closed_after = time.monotonic() - outcome.opened
    finally:
        writer.transport.abort()  # what is left open is ours to drop, without lingering


async def trickle(
    reader: asyncio.StreamReader, sock: Any, outcome: Outcome, until: float, rate: float
) -> None:
    """Read `rate` bytes a second until the server ends the connection or `until` passes
    (a reset is noticed at once, not only when the reader gets to it)."""
    started = time.monotonic()
    taken = 0
    data = b""
    while time.monotonic() < until:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            outcome.how = "reset"
            break
        try:
            chunk = await reader.read(512)
        except (ConnectionResetError, BrokenPipeError):
            outcome.how = "reset"
            break
        if not chunk:
            outcome.how = status_of(data) + "+eof"
            break
        if len(data) < 64:
            data += chunk
        taken += len(chunk)
        behind = taken / rate - (time.monotonic() - started)
        if behind > 0:
            await asyncio.sleep(behind)
    else:
        return
    assert outcome.opened is not None
    outcome.closed_after = time.monotonic() - outcome.opened


async def probe(host: str, port: int, interval: float, stop: asyncio.Event, result: Probe) -> None:
    """An honest client: `GET /healthz` on a fresh connection every `interval` seconds."""
    while not stop.is_set():
        started = time.monotonic()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
            try:
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
                data = await asyncio.wait_for(reader.read(), 10)
            finally:
                writer.transport.abort()
            status = status_of(data)
        except (OSError, TimeoutError) as exc:
            status = type(exc).__name__
        result.statuses[status] = result.statuses.get(status, 0) + 1
        if status == "200":
            result.ok += 1
            result.latencies.append(time.monotonic() - started)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarise(kind: str, outcomes: list[Outcome]) -> dict[str, Any]:
    mine = [o for o in outcomes if o.kind == kind]
    closed = [o for o in mine if o.closed_after is not None]
    times = [o.closed_after for o in closed if o.closed_after is not None]
    how: dict[str, int] = {}
    for o in mine:
        how[o.how] = how.get(o.how, 0) + 1
    return {
        "kind": kind,
        "requested": len(mine),
        "opened": sum(1 for o in mine if o.opened is not None),
        "closed_by_server": len(closed),
        "left_open": sum(1 for o in mine if o.opened is not None and o.closed_after is None),
        "how": dict(sorted(how.items())),
        "close_p50_s": _round(percentile(times, 0.5)),
        "close_p90_s": _round(percentile(times, 0.9)),
        "close_max_s": _round(max(times) if times else None),
        "close_mean_s": _round(statistics.fmean(times) if times else None),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def rss_mib(pid: int) -> float:
    """Resident memory of `pid` and its children (a `--workers` server), in MiB."""
    total = 0
    pids = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            pids += [int(child) for child in handle.read().split()]
    except OSError:
        pass
    for each in pids:
        try:
            with open(f"/proc/{each}/status") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


async def sample_rss(pid: int, samples: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        samples.append(rss_mib(pid))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.2)


async def make_image(base: str) -> str:
    """Check in, generate a task and wait until it is completed: the path of its image."""
    import httpx

    fingerprint = "hostile-bench-" + os.urandom(4).hex()
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        await http.post("/api/quota/check-in", json={"fingerprint": fingerprint})
        answer = await http.post(
            "/api/images/generate",
            json={"prompt": "a large image", "size": "16:9", "fingerprint": fingerprint},
        )
        task_id = answer.json()["data"]["id"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            task = (await http.get(f"/api/images/tasks/{task_id}")).json()["data"]
            if task["status"] == "completed":
                return str(task["image"])
            if task["status"] == "failed":
                raise SystemExit(f"the image task failed: {task.get('error')}")
            await asyncio.sleep(0.2)
    raise SystemExit("the image task did not complete within 60 s")


def raise_open_files_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1_048_576
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    url = urlsplit(args.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    counts = {
        kind: getattr(args, kind)
        if getattr(args, kind) is not None
        else (args.count if kind in ("slowloris", "idle", "partial") else 0)
        for kind in KINDS
    }
    total = sum(counts.values())
    limit = raise_open_files_limit()
    if total + 64 > limit:
        raise SystemExit(f"{total} connections need more file descriptors than {limit} (ulimit -n)")
    if (counts["stalled"] or counts["trickle"]) and not args.big_path:
        if not args.make_image:
            raise SystemExit("stalled and trickle need --big-path or --make-image")
        args.big_path = await make_image(args.url)
    say(f"{host}:{port}: " + ", ".join(f"{n} {kind}" for kind, n in counts.items() if n))
    rss: list[float] = []
    rss_stop = asyncio.Event()
    sampler = asyncio.create_task(sample_rss(args.pid, rss, rss_stop)) if args.pid else None
    await asyncio.sleep(0.5 if args.pid else 0)  # the server's memory before the attack

    outcomes: list[Outcome] = []
    gate = asyncio.Semaphore(args.connect_concurrency)
    stop = asyncio.Event()
    honest = Probe()
    prober = asyncio.create_task(probe(host, port, args.probe_interval, stop, honest))
    started = time.monotonic()
    # interleaved, so that every kind is opened over the same stretch of time
    order = [kind for i in range(max(counts.values())) for kind in KINDS if i < counts[kind]]
    tasks = [asyncio.create_task(one(kind, host, port, args, gate, outcomes)) for kind in order]

    async def progress() -> None:
        while True:
            await asyncio.sleep(2)
            opened = sum(1 for o in outcomes if o.opened is not None)
            closed = sum(1 for o in outcomes if o.closed_after is not None)
            now = time.monotonic() - started
            say(f"{now:5.1f} s: {opened} opened, {closed} closed by the server")

    reporter = asyncio.create_task(progress())
    await asyncio.gather(*tasks)
    reporter.cancel()
    stop.set()
    await prober
    if sampler is not None:
        await asyncio.sleep(2)  # after the attack
        rss_stop.set()
        await sampler
    elapsed = time.monotonic() - started
    opened_at = [o.opened for o in outcomes if o.opened is not None]
    report = {
        "url": args.url,
        "wait_s": args.wait,
        "seconds": round(elapsed, 1),
        "seconds_to_open_all": round(max(opened_at) - started, 2) if opened_at else None,
        "kinds": [summarise(kind, outcomes) for kind in KINDS if counts[kind]],
        "honest_client": {
            "ok": honest.ok,
            "answers": dict(sorted(honest.statuses.items())),
            "p50_ms": _round(1000 * p) if (p := percentile(honest.latencies, 0.5)) else None,
            "max_ms": _round(1000 * max(honest.latencies)) if honest.latencies else None,
        },
    }
    if rss:
        report["server_rss_mib"] = {
            "before": round(rss[0], 1),
            "peak": round(max(rss), 1),
            "end": round(rss[-1], 1),
        }
    return report


def print_report(report: dict[str, Any]) -> None:
    print(
        f"{report['url']}: all opened within {report['seconds_to_open_all']} s; "
        f"each kept at most {report['wait_s']} s"
    )
    columns = ("opened", "closed", "open", "p50 s", "p90 s", "max s")
    print(f"{'kind':<10} " + " ".join(f"{c:>7}" for c in columns) + "  how")
    for row in report["kinds"]:
        how = ", ".join(f"{k} {v}" for k, v in row["how"].items())
        print(
            f"{row['kind']:<10} {row['opened']:>7} {row['closed_by_server']:>7} "
            f"{row['left_open']:>7} {_fmt(row['close_p50_s'])} {_fmt(row['close_p90_s'])} "
            f"{_fmt(row['close_max_s'])}  {how}"
        )
    honest = report["honest_client"]
    answers = ", ".join(f"{k} {v}" for k, v in honest["answers"].items())
    print(
        f"honest GET /healthz meanwhile: {answers or 'none'} "
        f"(p50 {honest['p50_ms']} ms, max {honest['max_ms']} ms)"
    )
    if "server_rss_mib" in report:
        rss = report["server_rss_mib"]
        print(
            f"server memory (RSS): {rss['before']} MiB before, {rss['peak']} MiB at the peak,"
            f" {rss['end']} MiB at the end"
        )


def _fmt(value: float | None) -> str:
    return f"{value:7.2f}" if value is not None else f"{'-':>7}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:3000", help="the running service")
    parser.add_argument("--count", type=int, default=500, help="connections of each kind")
    for kind in KINDS:
        parser.add_argument(f"--{kind}", type=int, default=None, help=f"{kind} connections")
    parser.add_argument(
        "--wait", type=float, default=30.0, help="seconds a connection waits for the server's close"
    )
    parser.add_argument("--drip", type=float, default=1.0, help="seconds between slowloris bytes")
    parser.add_argument("--connect-concurrency", type=int, default=256, help="connects at once")
    parser.add_argument("--probe-interval", type=float, default=0.5, help="honest client's pace")
    parser.add_argument("--big-path", default="", help="a large answer for stalled, trickle")
    parser.add_argument(
        "--make-image", action="store_true", help="make a task's image for stalled, trickle"
    )
    parser.add_argument(
        "--trickle-rate", type=float, default=1024.0, help="bytes a second a trickle reads"
    )
    parser.add_argument("--pid", type=int, default=0, help="the server's pid: sample its RSS")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:  # the plain loop works too, more slowly
        report = asyncio.run(main_async(args))
    else:
        report = uvloop.run(main_async(args))
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
