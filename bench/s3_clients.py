#!/usr/bin/env python3
"""Side-by-side benchmark of two async S3 clients, obstore and aiobotocore, against moto.

    python bench/s3_clients.py              # 5 alternating rounds, 64 objects per phase (~1 min)
    python bench/s3_clients.py --quick      # 1 round, 32 objects per phase (~15 s)

Needs `obstore`, `aiobotocore` and `moto[server]` in the running interpreter's environment.
moto is started as `python -m moto.server -H 127.0.0.1 -p PORT` on a free port (its own
process, so its memory and CPU are not counted as the client's) and stopped at the end.

Every measurement runs in a fresh child process of this script (`--child ...`), one per
library and phase, so that import cost, RSS and RSS growth belong to one library only. The
rounds alternate the library order (A B, B A, A B, ...) to spread drift and warm-cache
effects evenly; medians over the rounds are reported.

What is measured, per library:

- import: (in the put and get children) wall time of `import obstore` +
  `from obstore.store import S3Store`, resp. `from aiobotocore.session import get_session` +
  `from aiobotocore.config import AioConfig`, and VmRSS after it; then the time and VmRSS
  after creating one client (aiobotocore loads the S3 service model here; its client is
  entered with `async with`, as a service would).
  A third child per round does only this, with aiohttp imported first (the service imports
  it anyway), to show what the library itself adds.
- put: OBJECTS objects of 4 MiB, each one single PUT (obstore `use_multipart=False`,
  aiobotocore `put_object`), CONCURRENCY workers; objects/s, MiB/s, client CPU seconds/GiB.
  Connections are warmed up first with CONCURRENCY tiny PUTs.
- get: the same objects read back with a streaming GET in CHUNK-sized pieces (obstore
  `GetResult.stream(min_chunk_size=CHUNK)`, aiobotocore `Body.iter_chunks(CHUNK)`), the bytes
  counted and dropped, CONCURRENCY workers; MiB/s and client CPU. Connections are warmed up
  with CONCURRENCY one-byte ranged GETs. VmRSS is sampled every 2 ms from a thread during the
  measured part; growth = peak minus the VmRSS right before it (after gc.collect()).
- size: `du -sck` over the site-packages entries (package dirs, modules, .dist-info) of the
  library and its transitive requirements (markers evaluated, extras ignored), and the same
  minus what the `scenemint` distribution already pulls in, if it is installed.

moto is single-process Python and shares the machine's cores with the client, so the
absolute MiB/s mostly measure moto; the client CPU seconds per GiB and the RSS figures are
the ones that tell the libraries apart. stdout gets a table; the full result, with the
machine description, is written to bench/s3_clients.json (or --json PATH).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib.metadata as md
import json
import os
import platform
import re
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
MiB = 1024 * 1024
LIBS = ("obstore", "aiobotocore")
BUCKET = "bench"
REGION = "us-east-1"
KEY_ID = "testing"
SECRET = "testing"


def say(message: str) -> None:
    print(f"[s3bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- child side


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class RssSampler:
    """Peak VmRSS of this process, sampled every `interval` s from a thread."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mib())
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self.peak = rss_mib()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mib())


async def run_workers(n: int, concurrency: int, one: Any) -> None:
    it = iter(range(n))

    async def worker() -> None:
        for i in it:
            await one(i)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


class ObstoreClient:
    def __init__(self, endpoint: str, concurrency: int) -> None:
        import obstore
        from obstore.store import S3Store

        self.obs = obstore
        self.store = S3Store(
            BUCKET,
            endpoint=endpoint,
            region=REGION,
            access_key_id=KEY_ID,
            secret_access_key=SECRET,
            virtual_hosted_style_request=False,
            client_options={"allow_http": True, "connect_timeout": "5s", "timeout": "60s"},
        )

    async def __aenter__(self) -> ObstoreClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def put(self, key: str, data: bytes) -> None:
        await self.obs.put_async(self.store, key, data, use_multipart=False)

    async def get_stream(self, key: str, chunk: int) -> int:
        resp = await self.obs.get_async(self.store, key)
        n = 0
        async for part in resp.stream(min_chunk_size=chunk):
            n += len(part)
        return n

    async def get_first_byte(self, key: str) -> None:
        await self.obs.get_range_async(self.store, key, start=0, length=1)

    async def delete_many(self, keys: list[str]) -> None:
        await self.obs.delete_async(self.store, keys)


class AiobotocoreClient:
    def __init__(self, endpoint: str, concurrency: int) -> None:
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session

        self._cm = get_session().create_client(
            "s3",
            endpoint_url=endpoint,
            region_name=REGION,
            aws_access_key_id=KEY_ID,
            aws_secret_access_key=SECRET,
            config=AioConfig(
                s3={"addressing_style": "path"},
                max_pool_connections=max(concurrency, 10),
                connect_timeout=5,
                read_timeout=60,
            ),
        )
        self.s3: Any = None

    async def __aenter__(self) -> AiobotocoreClient:
        self.s3 = await self._cm.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._cm.__aexit__(None, None, None)

    async def put(self, key: str, data: bytes) -> None:
        await self.s3.put_object(Bucket=BUCKET, Key=key, Body=data)

    async def get_stream(self, key: str, chunk: int) -> int:
        resp = await self.s3.get_object(Bucket=BUCKET, Key=key)
        n = 0
        async with resp["Body"] as body:
            async for part in body.iter_chunks(chunk):
                n += len(part)
        return n

    async def get_first_byte(self, key: str) -> None:
        resp = await self.s3.get_object(Bucket=BUCKET, Key=key, Range="bytes=0-0")
        async with resp["Body"] as body:
            await body.read()

    async def delete_many(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            await self.s3.delete_objects(Bucket=BUCKET, Delete={"Objects": batch, "Quiet": True})


def child_import(lib: str) -> None:
    if lib == "obstore":
        import obstore  # noqa: F401
        from obstore.store import S3Store  # noqa: F401
    else:
        from aiobotocore.config import AioConfig  # noqa: F401
        from aiobotocore.session import get_session  # noqa: F401


async def child_main(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"lib": args.lib, "phase": args.phase}
    if args.phase == "import":  # the service imports aiohttp anyway: what does the library add?
        import aiohttp  # noqa: F401
    out["rss_start_mib"] = rss_mib()
    t = time.perf_counter()
    child_import(args.lib)
    out["import_s"] = time.perf_counter() - t
    out["rss_after_import_mib"] = rss_mib()

    cls = ObstoreClient if args.lib == "obstore" else AiobotocoreClient
    t = time.perf_counter()
    client = cls(args.endpoint, args.concurrency)
    async with client:
        out["client_create_s"] = time.perf_counter() - t
        out["rss_after_client_mib"] = rss_mib()
        size, n, conc = args.size, args.objects, args.concurrency
        keys = [f"{args.prefix}obj-{i:05d}.bin" for i in range(n)]
        if args.phase == "import":
            pass
        elif args.phase == "put":
            payload = os.urandom(size)
            warm = [f"{args.prefix}warm-{i:03d}" for i in range(conc)]
            await asyncio.gather(*(client.put(k, b"w") for k in warm))
            await client.delete_many(warm)
            gc.collect()
            rss0 = rss_mib()
            c0, t0 = cpu_s(), time.perf_counter()
            with RssSampler() as sampler:
                await run_workers(n, conc, lambda i: client.put(keys[i], payload))
            wall, cpu = time.perf_counter() - t0, cpu_s() - c0
            out.update(
                wall_s=wall,
                objects_per_s=n / wall,
                mib_per_s=n * size / MiB / wall,
                cpu_s=cpu,
                cpu_s_per_gib=cpu / (n * size / (1024 * MiB)),
                rss_growth_mib=sampler.peak - rss0,
            )
        else:
            await asyncio.gather(*(client.get_first_byte(keys[i % n]) for i in range(conc)))
            gc.collect()
            rss0 = rss_mib()
            total = 0

            async def one(i: int) -> None:
                nonlocal total
                got = await client.get_stream(keys[i], args.chunk)  # not `total += await`:
                total += got  # that reads `total` before the await and loses updates

            c0, t0 = cpu_s(), time.perf_counter()
            with RssSampler() as sampler:
                await run_workers(n, conc, one)
            wall, cpu = time.perf_counter() - t0, cpu_s() - c0
            if total != n * size:
                raise RuntimeError(f"{args.lib}: read {total} bytes, expected {n * size}")
            out.update(
                wall_s=wall,
                objects_per_s=n / wall,
                mib_per_s=total / MiB / wall,
                cpu_s=cpu,
                cpu_s_per_gib=cpu / (total / (1024 * MiB)),
                rss_before_mib=rss0,
                rss_peak_mib=sampler.peak,
                rss_growth_mib=sampler.peak - rss0,
            )
            await client.delete_many(keys)
    # obstore resolves each asyncio future from a tokio thread (pyo3-async-runtimes), which
    # may still be inside loop.call_soon_threadsafe() for a moment after the coroutine
    # returned; if the interpreter finalizes in that window, CPython ends that thread with
    # pthread_exit and the process aborts (SIGABRT, exit 134). A short pause avoids that.
    await asyncio.sleep(0.05)
    return out


# --------------------------------------------------------------------------- parent side


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(method: str, url: str, timeout: float = 2.0) -> int:
    req = urllib.request.Request(url, method=method, data=b"" if method == "PUT" else None)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            resp.read()
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


@contextlib.contextmanager
def moto_server() -> Any:
    port = free_port()
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    t = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto exited with {proc.returncode}: {' '.join(cmd)}")
            try:
                if http("GET", endpoint + "/moto-api/", timeout=0.5) == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("moto did not become ready within 30 s")
            time.sleep(0.02)
        ready_s = time.perf_counter() - t
        say(f"moto ready on {endpoint} in {ready_s:.2f} s ({' '.join(cmd[1:])})")
        yield endpoint, ready_s, cmd
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_child(
    args: argparse.Namespace, lib: str, phase: str, prefix: str, endpoint: str
) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        lib,
        phase,
        "--endpoint",
        endpoint,
        "--prefix",
        prefix,
        "--objects",
        str(args.objects),
        "--concurrency",
        str(args.concurrency),
        "--size",
        str(args.size),
        "--chunk",
        str(args.chunk),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    lines = res.stdout.strip().splitlines()
    if res.returncode != 0 and not (lines and lines[-1].startswith("{")):
        raise RuntimeError(
            f"child {lib} {phase} failed with exit code {res.returncode}:\n{res.stderr[-3000:]}"
        )
    out = dict(json.loads(lines[-1]))
    out["exit_code"] = res.returncode  # non-zero with a result: it crashed while exiting
    if res.returncode != 0:
        say(f"note: child {lib} {phase} printed its result, then exited with {res.returncode}")
    return out


# ---- installed size


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dist_closure(name: str) -> set[str]:
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pragma: no cover - packaging is almost always there
        Requirement = None  # type: ignore[assignment,misc]
    seen: set[str] = set()
    todo = [name]
    while todo:
        n = _norm(todo.pop())
        if n in seen:
            continue
        try:
            dist = md.distribution(n)
        except md.PackageNotFoundError:
            continue
        seen.add(n)
        for spec in dist.requires or []:
            if Requirement is not None:
                req = Requirement(spec)
                if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                    continue
                todo.append(req.name)
            else:
                if "extra ==" in spec:
                    continue
                todo.append(re.split(r"[ ;<>=!~\[(]", spec, maxsplit=1)[0])
    return seen


def dist_paths(names: set[str]) -> set[Path]:
    out: set[Path] = set()
    for n in names:
        dist = md.distribution(n)
        base = Path(str(dist.locate_file(""))).resolve()
        for f in dist.files or []:
            parts = Path(f).parts
            if not parts or parts[0] == "..":
                continue
            p = base / parts[0]
            if p.exists():
                out.add(p)
    return out


def du_mib(paths: set[Path]) -> float:
    if not paths:
        return 0.0
    res = subprocess.run(
        ["du", "-sck", *sorted(map(str, paths))],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(res.stdout.strip().splitlines()[-1].split()[0]) / 1024


def installed_sizes() -> dict[str, Any]:
    service: set[str] = set()
    with contextlib.suppress(md.PackageNotFoundError):
        md.distribution("scenemint")
        service = dist_closure("scenemint") - {"scenemint"}
    out: dict[str, Any] = {}
    for lib in LIBS:
        closure = dist_closure(lib)
        extra = closure - service
        out[lib] = {
            "version": md.version(lib),
            "distributions": sorted(f"{n}=={md.version(n)}" for n in closure),
            "mib": round(du_mib(dist_paths(closure)), 1),
            "marginal_distributions": sorted(extra),
            "marginal_mib": round(du_mib(dist_paths(extra)), 1),
        }
    return out


# ---- report


def med(rows: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in rows))


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    summary: dict[str, dict[str, float]] = {}
    for lib in LIBS:
        put = [r for r in runs if r["lib"] == lib and r["phase"] == "put"]
        get = [r for r in runs if r["lib"] == lib and r["phase"] == "get"]
        both = put + get
        imp = [r for r in runs if r["lib"] == lib and r["phase"] == "import"]
        summary[lib] = {
            "put_objects_per_s": med(put, "objects_per_s"),
            "put_mib_per_s": med(put, "mib_per_s"),
            "put_cpu_s_per_gib": med(put, "cpu_s_per_gib"),
            "put_rss_growth_mib": med(put, "rss_growth_mib"),
            "get_mib_per_s": med(get, "mib_per_s"),
            "get_cpu_s_per_gib": med(get, "cpu_s_per_gib"),
            "get_rss_growth_mib": med(get, "rss_growth_mib"),
            "get_rss_growth_max_mib": max(r["rss_growth_mib"] for r in get),
            "import_ms": med(both, "import_s") * 1000,
            "rss_start_mib": med(both, "rss_start_mib"),
            "rss_after_import_mib": med(both, "rss_after_import_mib"),
            "client_create_ms": med(both, "client_create_s") * 1000,
            "rss_after_client_mib": med(both, "rss_after_client_mib"),
            "import_ms_aiohttp_loaded": med(imp, "import_s") * 1000,
            "rss_added_by_import_aiohttp_loaded_mib": med(
                [{"d": r["rss_after_import_mib"] - r["rss_start_mib"]} for r in imp], "d"
            ),
            "rss_added_by_import_and_client_aiohttp_loaded_mib": med(
                [{"d": r["rss_after_client_mib"] - r["rss_start_mib"]} for r in imp], "d"
            ),
        }
        for k, v in summary[lib].items():
            summary[lib][k] = round(v, 2)
    return summary


ROWS = [
    ("PUT 4 MiB x{n}, {c} concurrent: objects/s", "put_objects_per_s", "{:.1f}"),
    ("PUT MiB/s", "put_mib_per_s", "{:.1f}"),
    ("PUT client CPU s/GiB", "put_cpu_s_per_gib", "{:.2f}"),
    ("GET streamed ({chunk} KiB chunks), {c} concurrent: MiB/s", "get_mib_per_s", "{:.1f}"),
    ("GET client CPU s/GiB", "get_cpu_s_per_gib", "{:.2f}"),
    ("GET RSS growth MiB (median)", "get_rss_growth_mib", "{:.1f}"),
    ("GET RSS growth MiB (worst run)", "get_rss_growth_max_mib", "{:.1f}"),
    ("import time ms", "import_ms", "{:.0f}"),
    ("RSS at interpreter start MiB", "rss_start_mib", "{:.1f}"),
    ("RSS after import MiB", "rss_after_import_mib", "{:.1f}"),
    ("client creation ms", "client_create_ms", "{:.0f}"),
    ("RSS after client creation MiB", "rss_after_client_mib", "{:.1f}"),
    ("import time ms, aiohttp already imported", "import_ms_aiohttp_loaded", "{:.0f}"),
    (
        "RSS added by import, aiohttp already imported",
        "rss_added_by_import_aiohttp_loaded_mib",
        "{:.1f}",
    ),
    (
        "RSS added by import + client, aiohttp already imported",
        "rss_added_by_import_and_client_aiohttp_loaded_mib",
        "{:.1f}",
    ),
]


def table(args: argparse.Namespace, summary: dict[str, Any], sizes: dict[str, Any]) -> str:
    head = f"| {'figure (median of ' + str(args.rounds) + ' rounds)':<58} |"
    head += "".join(f" {lib + ' ' + sizes[lib]['version']:>20} |" for lib in LIBS)
    lines = [head, "|" + "-" * 60 + "|" + "|".join("-" * 22 for _ in LIBS) + "|"]
    fmt = {"n": args.objects, "c": args.concurrency, "chunk": args.chunk // 1024}
    for label, key, spec in ROWS:
        cells = "".join(f" {spec.format(summary[lib][key]):>20} |" for lib in LIBS)
        lines.append(f"| {label.format(**fmt):<58} |{cells}")
    for label, key in (
        ("installed MiB, with all dependencies", "mib"),
        ("installed MiB not already pulled in by scenemint", "marginal_mib"),
    ):
        cells = "".join(f" {sizes[lib][key]:>20.1f} |" for lib in LIBS)
        lines.append(f"| {label:<58} |{cells}")
    return "\n".join(lines)


def parent_main(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    sizes = installed_sizes()
    runs: list[dict[str, Any]] = []
    with moto_server() as (endpoint, ready_s, cmd):
        if http("PUT", f"{endpoint}/{BUCKET}") != 200:
            raise RuntimeError("could not create the bucket in moto")
        for r in range(args.rounds):
            order = LIBS if r % 2 == 0 else tuple(reversed(LIBS))
            for lib in order:
                prefix = f"{lib}/r{r}/"
                for phase in ("import", "put", "get"):
                    res = run_child(args, lib, phase, prefix, endpoint)
                    res["round"] = r
                    runs.append(res)
                    if phase == "import":
                        continue
                    say(
                        f"round {r + 1}/{args.rounds} {lib:<11} {phase}: "
                        f"{res['mib_per_s']:7.1f} MiB/s  cpu {res['cpu_s_per_gib']:5.2f} s/GiB  "
                        f"rss +{res['rss_growth_mib']:.1f} MiB"
                    )
    summary = summarize(runs)
    print(table(args, summary, sizes))
    result = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "settings": {
            "rounds": args.rounds,
            "objects_per_phase": args.objects,
            "object_bytes": args.size,
            "concurrency": args.concurrency,
            "stream_chunk_bytes": args.chunk,
        },
        "moto": {"command": " ".join(cmd[1:]), "ready_s": round(ready_s, 3)},
        "summary": summary,
        "sizes": sizes,
        "runs": runs,
        "total_s": round(time.perf_counter() - started, 1),
    }
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    say(f"done in {result['total_s']} s; wrote {args.json}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--child", nargs=2, metavar=("LIB", "PHASE"), help=argparse.SUPPRESS)
    p.add_argument("--endpoint", help=argparse.SUPPRESS)
    p.add_argument("--prefix", default="", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="1 round, 32 objects per phase")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--objects", type=int, default=64, help="objects per phase (default 64)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--size", type=int, default=4 * MiB, help="object size in bytes")
    p.add_argument("--chunk", type=int, default=64 * 1024, help="stream chunk size in bytes")
    p.add_argument("--json", default=str(BENCH / "s3_clients.json"))
    args = p.parse_args()
    if args.child:
        args.lib, args.phase = args.child
        print(json.dumps(asyncio.run(child_main(args))))
        return
    if args.quick:
        args.rounds, args.objects = 1, 32
    parent_main(args)


if __name__ == "__main__":
    main()
