#!/usr/bin/env python3
"""Hostile clients against a running service: does the server close them, and how fast?

    python bench/hostile_clients.py --url http://127.0.0.1:3000 --count 2000
    python bench/hostile_clients.py --slowloris 2000 --idle 10000 --partial 2000 --wait 30

Opens, all at the same time, three kinds of connections that a server without deadlines
holds for as long as the client likes:

- slowloris: sends `GET /healthz HTTP/1.1`, `Host:` and then one byte of a header line every
  `--drip` seconds, never ending the head;
- idle: connects and sends nothing;
- partial body: sends a complete `POST /api/quota/status` head with `Content-Length: 1000`
  and 10 bytes of the body, then nothing.

Each connection waits (dripping, for the slowloris ones) until the server closes it or
`--wait` seconds have passed since it was opened; then this script closes what is left.
While they are open, an honest client asks `GET /healthz` on a new connection every
`--probe-interval` seconds. The report gives, per kind: connections opened, closed by the
server (and how: 408, 503, closed without an answer, reset), left open by the server, and
the seconds from open to close (p50, p90, max); and the honest client's answers.
Progress goes to stderr; the report to stdout, with `--json` as one JSON object.

Everything runs in this one process on asyncio: `--count 10000` needs as many file
descriptors (the script lifts its soft limit to the hard one; see `ulimit -n`). The
service lifts its own. The server's limits are its own settings: `SCENEMINT_HEADER_TIMEOUT`
(10 s: slowloris, idle, and the partial body's grace), `SCENEMINT_BODY_MIN_RATE`,
`SCENEMINT_MAX_CONNECTIONS` (8192: past it a connection gets 503 at once).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

KINDS = ("slowloris", "idle", "partial")


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
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 30)
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
        kind: getattr(args, kind) if getattr(args, kind) is not None else args.count
        for kind in KINDS
    }
    total = sum(counts.values())
    limit = raise_open_files_limit()
    if total + 64 > limit:
        raise SystemExit(f"{total} connections need more file descriptors than {limit} (ulimit -n)")
    say(f"{host}:{port}: " + ", ".join(f"{n} {kind}" for kind, n in counts.items()))

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
