#!/usr/bin/env python3
"""A chaos run of the credit promise: two instances on PostgreSQL, a faulty upstream,
SIGKILLs and terminated database connections; then every credit is accounted for.

    python bench/chaos.py                    # 30 s of chaos, then settle and check (~1 min)
    python bench/chaos.py --seconds 120      # longer
    python bench/chaos.py --seed 7 --clients 16 --json /tmp/chaos.json
    python bench/chaos.py --seconds 60 --aim 1 --kill-every 0.5 1.5   # hunt crash windows

What runs, all on 127.0.0.1:

- the fake chatgpt2api upstream of `tests/fake_upstream.py`, in a thread of this process,
  with random faults on every submission (5xx before processing, a 4xx refusal, the
  connection dropped before the upstream processed it and after it did, a 502 after it did,
  slow answers before and after processing), on listings (5xx, drops, slow answers, garbage)
  and on image files (5xx, drops); every task it accepts lives on its own (queued → running
  → success) or fails later, is forgotten by the upstream, or never finishes (age limit);
- two `scenemint serve` processes on one throwaway PostgreSQL database (created on the
  server of `SCENEMINT_TEST_POSTGRES_URL`, else postgresql://postgres@127.0.0.1:5432, and
  dropped at the end), with short leases and reconcile intervals;
- concurrent clients, each on its own fingerprints (checked in first; a fresh fingerprint
  when the credits run out): half send an `Idempotency-Key` and retry with it after a
  timeout, a dropped connection, a 503 or a 409 in progress, as the Python client does; the
  others send no key and give up after such an error. Every client polls the tasks it got
  and downloads some images. Each request's outcome is recorded;
- every few seconds one instance is SIGKILLed and restarted on the same port (never both
  down), and every few seconds `pg_terminate_backend` ends every connection to the database.
  A share of both (`--aim`, default half) is timed: it waits until the upstream answers an
  accepted submission and strikes 0-15 ms later (a kill hits the instance that sent it,
  found by its connection in /proc; two in three aimed kills wait for a client without a
  key), when the ledger write and the client's answer are in flight. Random timing alone
  rarely lands in those few milliseconds.

Then the faults stop, both instances are restarted (SIGTERM), everything settles (bounded),
and the run checks:

(a) `python -m scenemint audit credits` passes on the database;
(b) for every fingerprint: balance = grants − the tasks it received an id for (an answer
    with status 200) whose final state is not `failed` (read from the database directly);
    which is: no task is left charged that its client never received;
(c) no client got an HTTP 500;
(d) no request hung beyond its client timeout (generate: the submit timeout + 12 s; the
    others 15 s), and no task was left unfinished (every row settled in time).

It prints a summary table and the offending tasks (ledger row, journal, the client requests
of that generation, kills around it, the service log lines that name it), writes the figures
to `bench/chaos.json` (or `--json`), and exits 1 on any violation. Service logs, the
per-request record (`requests.jsonl`), the jobs (`jobs.jsonl`) and the event timeline
(`events.json`) stay in the work directory when something failed; the database is dropped
unless `--keep`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import httpx
import psycopg
from aiohttp import web
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.fake_upstream import TINY_PNG, FakeUpstream, _Fault  # noqa: E402

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
SUBMIT_PATHS = ("/api/image-tasks/generations", "/api/image-tasks/edits")
LIST_PATH = "/api/image-tasks"
FILES_PREFIX = "/files/"
UNFINISHED = ("submitting", "queued", "running")


def say(message: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def log_time(at: float) -> str:
    """A timestamp in the service log's format (logging's asctime)."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)) + f",{int(at % 1 * 1000):03d}"


# --------------------------------------------------------------------------- settings


@dataclass
class Config:
    seconds: float = 30.0  # chaos phase
    clients: int = 12
    upstreams: int = 2  # failing independently; 2: priorities 1, 2; 3: 1, 1, 2
    seed: int | None = None
    kill_every: tuple[float, float] = (2.0, 5.0)
    terminate_every: tuple[float, float] = (1.5, 4.0)
    lease_seconds: float = 2.0
    reconcile_interval: float = 1.0
    submit_timeout: float = 3.0
    poll_timeout: float = 2.0
    task_max_age: float = 20.0
    resubmit_window: float = 10.0
    handoff_grace: float = 4.0  # longer than the keyed clients' pauses between retries
    settle_timeout: float = 0.0  # 0: task_max_age + 30
    generate_timeout: float = 0.0  # 0: submit_timeout + 12 (the server's bound plus a margin)
    request_timeout: float = 15.0  # every other request
    aim_share: float = 0.5  # kills timed to an accepted submission's answer
    edit_share: float = 0.15
    download_share: float = 0.3
    keep: bool = False
    workdir: str | None = None
    json_path: str = str(ROOT / "bench" / "chaos.json")
    quiet: bool = False

    def __post_init__(self) -> None:
        if not self.settle_timeout:
            self.settle_timeout = self.task_max_age + 30.0
        if not self.generate_timeout:
            self.generate_timeout = self.submit_timeout + 12.0


# --------------------------------------------------------------------------- the upstream


@dataclass
class Fate:
    running_at: float
    end_at: float
    end: str  # success, error, forget, stuck


class ChaosUpstream(FakeUpstream):
    """The fake upstream with random faults per request and tasks that live on their own.

    Faults are rolled in `_take_faults` (the fake's own hook, so recording and fault
    application stay the fake's); "slow after processing" wraps the processed answer.
    """

    def __init__(self, seed: int, name: str = "default", api_key: str | None = None) -> None:
        super().__init__(**({"api_key": api_key} if api_key else {}))
        self.name = name
        self.chaos = False
        self._rng = random.Random(seed)
        self.counts: Counter[str] = Counter()
        self._fates: dict[str, Fate] = {}
        self._fate_lock = threading.Lock()
        self.fates_started: Counter[str] = Counter()
        self.fates_applied: Counter[str] = Counter()
        self._stop = threading.Event()
        self._life: threading.Thread | None = None
        # who waits for the next accepted submission's answer (aimed kills and terminations)
        self._waiters: list[tuple[threading.Event, list[int], str]] = []

    def next_accepted_answer(self, timeout: float, *, prompt_has: str = "") -> int | None:
        """Wait for the next accepted submission (whose prompt contains `prompt_has`) whose
        answer is leaving; the local port of the service connection that asked (to find its
        process), or None."""
        waiter: tuple[threading.Event, list[int], str] = (threading.Event(), [], prompt_has)
        with self._fate_lock:
            self._waiters.append(waiter)
        try:
            return waiter[1][0] if waiter[0].wait(timeout) else None
        finally:
            with self._fate_lock, contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    # -- faults (server thread) -----------------------------------------------------------

    def _take_faults(self, record: Any) -> tuple[float, Any, Any]:
        delay, fault, hold = super()._take_faults(record)
        path, method = record.path, record.method
        if method == "POST" and path in SUBMIT_PATHS:
            kind = "submit"
        elif method == "GET" and path == LIST_PATH:
            kind = "list"
        elif path.startswith(FILES_PREFIX):
            kind = "file"
        else:
            kind = "other"
        self.counts[f"{kind}.requests"] += 1
        if not self.chaos or fault is not None or kind == "other":
            return delay, fault, hold
        rng = self._rng
        roll = rng.random()
        chosen: _Fault | None = None
        name = "ok"
        if kind == "submit":
            status = rng.choice((500, 502, 503, 504))
            if roll < 0.07:
                name, chosen = "5xx_before", _Fault("fail", path, 1, status=status)
            elif roll < 0.13:
                name, chosen = "drop_before", _Fault("drop", path, 1)
            elif roll < 0.20:
                name = "drop_after"
                chosen = _Fault("drop", path, 1, after_processing=True)
            elif roll < 0.25:
                # a 5xx once the task exists: the outcome is unknown. Not a 503: a 503 says
                # the request was not taken (HTTP's Service Unavailable), and the service
                # may send the task to another upstream on one
                name = "5xx_after"
                after = rng.choice((500, 502, 504))
                chosen = _Fault("fail", path, 1, status=after, after_processing=True)
            elif roll < 0.27:
                name = "refused_400"
                chosen = _Fault(
                    "fail", path, 1, status=400, body=b'{"error":{"message":"policy (chaos)"}}'
                )
            elif roll < 0.35:
                name = "slow_after"
                record.chaos_slow_after = rng.uniform(0.3, 4.5)
            elif roll < 0.40:  # not taken, the upstream's reason: the task may move on
                name = "busy_429"
                chosen = _Fault(
                    "fail", path, 1, status=429, body=b'{"error":{"message":"busy (chaos)"}}'
                )
            if rng.random() < 0.10:
                delay = max(delay, rng.uniform(0.3, 4.5))
                self.counts["submit.slow_before"] += 1
        elif kind == "list":
            if roll < 0.04:
                name = "5xx"
                chosen = _Fault("fail", path, 1, status=rng.choice((500, 502, 503, 504)))
            elif roll < 0.07:
                name, chosen = "drop", _Fault("drop", path, 1)
            elif roll < 0.08:
                name, chosen = "garbage", _Fault("garbage", path, 1)
            if rng.random() < 0.08:
                delay = max(delay, rng.uniform(0.2, 2.5))
                self.counts["list.slow"] += 1
        else:  # file
            if roll < 0.04:
                name, chosen = "5xx", _Fault("fail", path, 1, status=502)
            elif roll < 0.06:
                name, chosen = "drop", _Fault("drop", path, 1)
        self.counts[f"{kind}.{name}"] += 1
        record.chaos_fault = name
        return delay, chosen, hold

    def _route(self, request: web.Request, record: Any) -> Any:
        reply = super()._route(request, record)
        if (
            self._waiters
            and record.path in SUBMIT_PATHS
            and getattr(record, "chaos_fault", "ok") == "ok"
            and isinstance(reply, web.Response)
            and reply.status == 200
            and request.transport is not None
        ):
            # an accepted submission's answer leaves now: tell the aimed killer who asked
            peer = request.transport.get_extra_info("peername")
            body = record.json if isinstance(record.json, dict) else record.form
            prompt = str(body.get("prompt", ""))
            with self._fate_lock:
                waiters = [w for w in self._waiters if w[2] in prompt]
                self._waiters = [w for w in self._waiters if w not in waiters]
            for done, slot, _ in waiters:
                slot.append(int(peer[1]) if peer else 0)
                done.set()
        slow = getattr(record, "chaos_slow_after", None)
        if slow is None or not isinstance(reply, web.StreamResponse):
            return reply

        async def late(_: web.Request) -> web.StreamResponse:
            await asyncio.sleep(slow)  # the task exists already; its answer comes late
            return reply

        return late

    def _submit(self, task_id: str, *, mode: str, model: Any, size: Any) -> dict[str, Any]:
        with self._lock:
            new = task_id not in self._tasks
        task = super()._submit(task_id, mode=mode, model=model, size=size)
        if new:
            self._schedule(task_id)
        return task

    # -- task lives (lifecycle thread) ----------------------------------------------------

    def _schedule(self, task_id: str) -> None:
        rng = self._rng
        now = time.monotonic()
        running_at = now + rng.uniform(0.1, 1.0)
        end_at = running_at + rng.uniform(0.2, 3.0)
        roll = rng.random()
        if not self.chaos:
            end = "error" if roll < 0.15 else "success"
        elif roll < 0.18:
            end = "error"  # a late failure: accepted, running, then failed
        elif roll < 0.22:
            end = "forget"  # the upstream loses it (restart): missing from listings
        elif roll < 0.25:
            end = "stuck"  # never finishes: the age limit must refund it
        elif roll < 0.32:
            end = "quota"  # a late failure about capacity: it may move on
        else:
            end = "success"
        self.fates_started[end] += 1
        with self._fate_lock:
            self._fates[task_id] = Fate(running_at, end_at, end)

    def start_lifecycle(self) -> None:
        self._life = threading.Thread(target=self._lifecycle, name="chaos-lifecycle", daemon=True)
        self._life.start()

    def stop_lifecycle(self) -> None:
        self._stop.set()
        if self._life is not None:
            self._life.join(5)

    def _lifecycle(self) -> None:
        while not self._stop.wait(0.1):
            now = time.monotonic()
            with self._fate_lock:
                due = [(i, f) for i, f in self._fates.items() if f.running_at <= now]
            for task_id, fate in due:
                task = self.task(task_id)
                if task is None:
                    with self._fate_lock:
                        self._fates.pop(task_id, None)
                    continue
                if fate.end_at > now or fate.end == "stuck":
                    if task["status"] == "queued":
                        self.set_task(task_id, status="running")
                    continue
                if fate.end == "success":
                    self.complete_task(task_id, revised_prompt="chaos")
                elif fate.end == "error":
                    self.fail_task(task_id, "late failure (chaos)")
                elif fate.end == "quota":
                    self.fail_task(task_id, "no available image quota")
                else:
                    self.forget_task(task_id)
                self.fates_applied[fate.end] += 1
                with self._fate_lock:
                    self._fates.pop(task_id, None)
            with self._lock:  # the fake records every request: keep memory flat
                if len(self._requests) > 5000:
                    del self._requests[:]

    def calm(self) -> None:
        """No more faults; stuck tasks finish (the age limit may have refunded them first)."""
        self.chaos = False
        self.clear_faults()
        now = time.monotonic()
        with self._fate_lock:
            for fate in self._fates.values():
                if fate.end == "stuck":
                    fate.end, fate.end_at = "success", now + 0.5


# --------------------------------------------------------------------------- PostgreSQL


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


def _with_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.update(params)
    return urlunsplit(parts._replace(query=urlencode(query, quote_via=quote)))


class Database:
    """A throwaway database (or, without CREATEDB, a schema) for the run."""

    def __init__(self, admin_url: str, run_id: str) -> None:
        self.admin_url = admin_url
        self.name = f"scenemint_chaos_{run_id}"
        self.app_name = f"scenemint-chaos-{run_id}"
        self.mode = "database"
        self.url = ""
        self.terminate_calls = 0
        self.terminated = 0
        self._conn: psycopg.Connection[Any] | None = None

    def create(self) -> None:
        try:
            with psycopg.connect(self.admin_url, autocommit=True) as conn:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.name)))
            self.url = _with_database(self.admin_url, self.name)
        except psycopg.errors.InsufficientPrivilege:
            # no CREATEDB: a schema in the given database; terminate by application_name
            self.mode = "schema"
            with psycopg.connect(self.admin_url, autocommit=True) as conn:
                conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(self.name)))
            self.url = _with_query(
                self.admin_url,
                options=f"-csearch_path={self.name}",
                application_name=self.app_name,
            )

    def drop(self) -> None:
        self.close()
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            if self.mode == "schema":
                conn.execute(
                    sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(self.name))
                )
                return
            try:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        sql.Identifier(self.name)
                    )
                )
            except psycopg.errors.SyntaxError:  # before PostgreSQL 13
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                    (self.name,),
                )
                drop = sql.SQL("DROP DATABASE IF EXISTS {}")
                conn.execute(drop.format(sql.Identifier(self.name)))

    def terminate_backends(self) -> int:
        """End every other connection to the run's database; how many were ended."""
        self.terminate_calls += 1
        for _ in range(2):
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = psycopg.connect(self.admin_url, autocommit=True)
                if self.mode == "schema":
                    query = (
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE application_name = %s AND pid <> pg_backend_pid()"
                    )
                    params = (self.app_name,)
                else:
                    query = (
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE datname = %s AND pid <> pg_backend_pid()"
                    )
                    params = (self.name,)
                rows = self._conn.execute(query, params).fetchall()
                ended = sum(1 for (done,) in rows if done)
                self.terminated += ended
                return ended
            except psycopg.Error:
                self.close()
        return 0

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None

    def query(self, statement: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            return [tuple(row) for row in conn.execute(statement, params).fetchall()]


# --------------------------------------------------------------------------- instances


class Instance:
    """One `scenemint serve` process slot: same port across restarts, one appended log."""

    def __init__(self, name: str, env: dict[str, str], workdir: Path) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**env, "HOST": "127.0.0.1", "PORT": str(self.port)}
        self.workdir = workdir
        self.log_path = workdir / f"service-{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.ready = False
        self.starts = 0
        self.start_failures = 0
        self.kills = 0
        self.killed_at = 0.0
        self.closed = False  # no more starts
        self.pids: list[int] = []

    def _mark(self, text: str, at: float | None = None) -> None:
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write(f"{log_time(at or time.time())} ===== chaos: {self.name} {text}\n")

    def start(self, timeout: float = 60.0) -> None:
        """Start and wait for /healthz; a start that fails (e.g. its connection was
        terminated during migrations) is tried again."""
        deadline = time.monotonic() + timeout
        while not self.closed:
            self.starts += 1
            self._mark(f"start #{self.starts}")
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(
                    [sys.executable, "-m", "scenemint", "serve"],
                    env=self.env,
                    cwd=self.workdir,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            self.pids.append(self.process.pid)
            if self.closed:  # the run ended meanwhile (interrupted)
                self._reap(signal.SIGTERM)
                return
            if self._wait_healthy(deadline):
                self.ready = True
                self._mark(f"ready (pid {self.process.pid})")
                return
            self.start_failures += 1
            self._mark(f"start #{self.starts} failed")
            self._reap(signal.SIGKILL)
            if time.monotonic() > deadline:
                raise RuntimeError(f"instance {self.name} did not start: see {self.log_path}")
            time.sleep(0.2)

    def _wait_healthy(self, deadline: float) -> bool:
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return True
            time.sleep(0.05)
        return False

    def _reap(self, sig: signal.Signals, wait: float = 15.0) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(wait)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

    def kill(self) -> int:
        """SIGKILL: a crash, no cleanup. Returns the pid."""
        self.ready = False
        pid = self.process.pid if self.process else -1
        self.killed_at = time.time()
        self._reap(signal.SIGKILL)
        self.kills += 1
        self._mark(f"SIGKILLed (pid {pid})", at=self.killed_at)
        return pid

    def close(self) -> None:
        """The end: stopped, and never started again."""
        self.closed = True
        self.stop()

    def stop(self) -> None:
        """SIGTERM (graceful), SIGKILL after 15 s."""
        self.ready = False
        self._reap(signal.SIGTERM)
        self._mark("stopped (SIGTERM)")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


# --------------------------------------------------------------------------- clients


@dataclass
class Req:
    """One HTTP request a client sent, and what it got."""

    route: str
    instance: str
    t0: float
    t1: float = 0.0
    job: str | None = None
    status: int | None = None
    error: str | None = None  # the envelope's machine code
    outcome: str = ""  # "http", "timeout", "connect_error", "transport:<Exc>"
    task_id: str | None = None
    task_status: str | None = None
    retry_after: float | None = None


@dataclass
class Job:
    """One generation a client wants, with all its attempts (a keyed job retries)."""

    id: str
    worker: int
    fingerprint: str
    prompt: str
    key: str | None
    edit: bool
    started: float
    requests: list[int] = field(default_factory=list)  # indexes into Run.requests
    task_id: str | None = None
    result: str = "pending"
    final_seen: str | None = None


class Clients:
    def __init__(self, run: Run) -> None:
        self.run = run
        self.cfg = run.cfg
        self.rng = random.Random(run.seed + 1)
        self.http: httpx.AsyncClient | None = None
        self.jobs: list[Job] = []
        self.requests: list[Req] = []
        self.fingerprints: list[str] = []
        self.tasks: set[asyncio.Task[Any]] = set()

    def _record(self, req: Req, job: Job | None) -> Req:
        self.requests.append(req)
        if job is not None:
            job.requests.append(len(self.requests) - 1)
        return req

    async def call(
        self,
        route: str,
        method: str,
        path: str,
        *,
        job: Job | None = None,
        timeout: float,
        **kwargs: Any,
    ) -> Req:
        """One logical request: a connection that cannot be made (nothing was sent) goes to
        the other instance, as a load balancer would; anything else is the answer."""
        assert self.http is not None
        order = list(self.run.instances)
        self.rng.shuffle(order)
        req = Req(route=route, instance=order[0].name, t0=time.time())
        for attempt in range(6):
            instance = order[attempt % len(order)]
            req = Req(route=route, instance=instance.name, t0=time.time(), job=job and job.id)
            try:
                async with asyncio.timeout(timeout):
                    answer = await self.http.request(
                        method, instance.url + path, timeout=timeout, **kwargs
                    )
            except (TimeoutError, httpx.TimeoutException) as exc:
                if isinstance(exc, httpx.ConnectTimeout):
                    req.outcome = "connect_timeout"
                else:
                    req.outcome = "timeout"
            except httpx.ConnectError:
                req.t1, req.outcome = time.time(), "connect_error"
                self._record(req, job)
                await asyncio.sleep(0.05 * (attempt + 1))
                continue
            except httpx.TransportError as exc:
                req.outcome = f"transport:{type(exc).__name__}"
            else:
                req.outcome, req.status = "http", answer.status_code
                try:
                    body = answer.json()
                except ValueError:
                    body = None
                if isinstance(body, dict):
                    req.error = body.get("error") if body.get("code") != 0 else None
                    if isinstance(body.get("retryAfter"), int | float):
                        req.retry_after = float(body["retryAfter"])
                    data = body.get("data")
                    if answer.status_code == 200 and isinstance(data, dict):
                        req.task_id = data.get("id")
                        req.task_status = data.get("status")
                elif answer.status_code != 200 or route not in ("image",):
                    req.error = "not_json"
            req.t1 = time.time()
            return self._record(req, job)
        return req

    # -- quota ----------------------------------------------------------------------------

    async def new_fingerprint(self, worker: int) -> str | None:
        fingerprint = f"chaos-{self.run.run_id}-w{worker}-f{len(self.fingerprints)}"
        self.fingerprints.append(fingerprint)
        while time.time() < self.run.settle_deadline:
            req = await self.call(
                "check_in",
                "POST",
                "/api/quota/check-in",
                json={"fingerprint": fingerprint},
                timeout=self.cfg.request_timeout,
            )
            if req.status == 200:
                return fingerprint
            await asyncio.sleep(0.2)
        return None

    # -- generate -------------------------------------------------------------------------

    async def generate(self, job: Job) -> None:
        headers = {"Idempotency-Key": job.key} if job.key else {}
        fields = {"prompt": job.prompt, "size": "1:1", "fingerprint": job.fingerprint}
        while True:
            if job.edit:
                body: dict[str, Any] = {
                    "data": fields,
                    "files": {"image": ("ref.png", TINY_PNG, "image/png")},
                }
            else:
                body = {"json": fields}
            req = await self.call(
                "generate",
                "POST",
                "/api/images/generate",
                job=job,
                headers=headers,
                timeout=self.cfg.generate_timeout,
                **body,
            )
            if req.status == 200 and req.task_id:
                job.task_id, job.result = req.task_id, "received"
                self.run.received[req.task_id].append(job.id)
                return
            if req.status == 402:
                job.result = "no_credits"
                return
            retry = (
                req.outcome in ("timeout", "connect_timeout", "connect_error")
                or req.outcome.startswith("transport:")
                or req.status in (503, 504)
                or (req.status == 409 and req.error == "idempotency_in_progress")
                or (req.status == 502 and req.error == "not_json")
            )
            if job.key is None or not retry or time.time() > self.run.settle_deadline:
                job.result = f"gave_up:{req.status or req.outcome}:{req.error or ''}"
                return
            await asyncio.sleep(min(req.retry_after or 0.3, 2.0) * self.rng.uniform(0.5, 1.5))

    # -- poll -----------------------------------------------------------------------------

    async def poll(self, job: Job) -> None:
        assert job.task_id is not None
        path = f"/api/images/tasks/{job.task_id}"
        while time.time() < self.run.settle_deadline and not self.run.stopping:
            req = await self.call("poll", "GET", path, job=job, timeout=self.cfg.request_timeout)
            if req.status == 200 and req.task_status in ("completed", "failed"):
                job.final_seen = req.task_status
                if req.task_status == "completed" and self.rng.random() < self.cfg.download_share:
                    await self.call(
                        "image", "GET", path + "/image", job=job, timeout=self.cfg.request_timeout
                    )
                return
            await asyncio.sleep(self.rng.uniform(0.3, 0.7))

    # -- one client -----------------------------------------------------------------------

    async def worker(self, worker: int) -> None:
        keyed = worker % 2 == 0
        fingerprint = await self.new_fingerprint(worker)
        pollers: set[asyncio.Task[None]] = set()
        number = 0
        while fingerprint is not None and time.time() < self.run.chaos_end:
            number += 1
            job = Job(
                id=f"w{worker}-n{number}",
                worker=worker,
                fingerprint=fingerprint,
                prompt=f"chaos {self.run.run_id} w{worker} n{number} {'key' if keyed else 'nokey'}",
                key=f"chaos-{uuid.uuid4().hex}" if keyed else None,
                edit=self.rng.random() < self.cfg.edit_share,
                started=time.time(),
            )
            self.jobs.append(job)
            await self.generate(job)
            if job.result == "no_credits":
                fingerprint = await self.new_fingerprint(worker)
                continue
            if job.task_id is not None:
                pollers.add(self.spawn(self.poll(job)))
                if len(pollers) >= 3:
                    _, pollers = await asyncio.wait(pollers, return_when=asyncio.FIRST_COMPLETED)
            await asyncio.sleep(self.rng.uniform(0.0, 0.3))
        if pollers:
            await asyncio.gather(*pollers)

    def spawn(self, work: Any) -> asyncio.Task[None]:
        """A client task the run cancels at its end (or when interrupted)."""
        task: asyncio.Task[None] = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task


# --------------------------------------------------------------------------- the run


class Run:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.seed = cfg.seed if cfg.seed is not None else random.randrange(1_000_000)
        self.rng = random.Random(self.seed)
        self.run_id = uuid.uuid4().hex[:8]
        self.events: list[dict[str, Any]] = []
        self.received: dict[str, list[str]] = defaultdict(list)
        self.instances: list[Instance] = []
        self.stopping = False
        self.chaos_start = self.chaos_end = self.settle_deadline = 0.0
        self.settled_at: float | None = None
        self.restart_seconds: list[float] = []
        self.clients = Clients(self)

    def event(self, kind: str, *, at: float | None = None, **details: Any) -> None:
        self.events.append({"t": at or time.time(), "kind": kind, **details})

    # -- chaos makers ---------------------------------------------------------------------

    async def nap(self, seconds: float) -> None:
        """Sleep, but not past the end of the chaos phase."""
        await asyncio.sleep(max(0.0, min(seconds, self.chaos_end - time.time())))

    async def killer(self, upstreams: list[ChaosUpstream]) -> None:
        turn = 0
        while True:
            await self.nap(self.rng.uniform(*self.cfg.kill_every))
            if time.time() >= self.chaos_end:
                return
            victim = self.instances[turn % 2]
            turn += 1
            aimed = self.rng.random() < self.cfg.aim_share
            if aimed:
                delay = self.rng.uniform(0.0, 0.015)
                # mostly at a client without a key: its lost answer cannot be asked again
                target = " nokey" if self.rng.random() < 2 / 3 else " key"
                upstream = self.rng.choice(upstreams)
                hit = await asyncio.to_thread(self.aimed_kill, upstream, delay, target)
                if hit is None:
                    continue
                victim, pid = hit
            else:
                other = next(i for i in self.instances if i is not victim)
                if not other.ready:
                    continue  # never both down
                pid = await asyncio.to_thread(victim.kill)
            self.event("kill", instance=victim.name, pid=pid, aimed=aimed, at=victim.killed_at)
            began = time.monotonic()
            await asyncio.to_thread(victim.start)
            self.restart_seconds.append(time.monotonic() - began)
            self.event("restarted", instance=victim.name, pid=victim.pids[-1])

    def aimed_kill(
        self, upstream: ChaosUpstream, delay: float, target: str
    ) -> tuple[Instance, int] | None:
        """SIGKILL the instance whose submission the upstream is answering right now, `delay`
        seconds after the answer left: the moment between the upstream's answer, the
        ledger's write and the client's answer."""
        port = upstream.next_accepted_answer(timeout=3.0, prompt_has=target)
        if not port:
            return None
        victim = owner_of_connection(self.instances, port, upstream.port)
        if victim is None:
            return None
        other = next(i for i in self.instances if i is not victim)
        if not other.ready:
            return None  # never both down
        time.sleep(delay)
        return victim, victim.kill()

    async def terminator(self, database: Database, upstreams: list[ChaosUpstream]) -> None:
        while True:
            await self.nap(self.rng.uniform(*self.cfg.terminate_every))
            if time.time() >= self.chaos_end:
                return
            aimed = self.rng.random() < self.cfg.aim_share
            delay = self.rng.uniform(0.0, 0.01)
            upstream = self.rng.choice(upstreams)

            def terminate(
                aimed: bool = aimed, delay: float = delay, upstream: ChaosUpstream = upstream
            ) -> tuple[int, float] | None:
                if aimed:  # while the ledger write of an accepted submission is in flight
                    if upstream.next_accepted_answer(timeout=3.0) is None:
                        return None
                    time.sleep(delay)
                return database.terminate_backends(), time.time()

            done = await asyncio.to_thread(terminate)
            if done is not None:
                self.event("pg_terminate_backend", ended=done[0], aimed=aimed, at=done[1])

    async def progress(self, database: Database) -> None:
        while not self.stopping:
            await asyncio.sleep(5)
            jobs = self.clients.jobs
            try:
                unfinished = await asyncio.to_thread(unfinished_count, database)
            except psycopg.Error:
                unfinished = -1
            say(
                f"t={time.time() - self.chaos_start:5.1f}s generations {len(jobs)}, received "
                f"{len(self.received)}, kills {sum(i.kills for i in self.instances)}, "
                f"terminations {database.terminate_calls} ({database.terminated} backends), "
                f"unfinished rows {unfinished}"
            )

    # -- the whole run --------------------------------------------------------------------

    async def main(self, database: Database, upstreams: list[ChaosUpstream], workdir: Path) -> None:
        cfg = self.cfg
        main_task = asyncio.current_task()
        if main_task is not None and threading.current_thread() is threading.main_thread():
            # SIGTERM ends the run like Ctrl-C: the caller stops the instances, drops the db
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
        env = service_env(cfg, database.url, upstreams, workdir)
        self.instances = [Instance(name, env, workdir) for name in ("a", "b")]
        for instance in self.instances:
            await asyncio.to_thread(instance.start)
        urls = ", ".join(i.url for i in self.instances)
        say(f"instances up at {urls}; chaos for {cfg.seconds:g}s")
        self.chaos_start = time.time()
        self.chaos_end = self.chaos_start + cfg.seconds
        self.settle_deadline = self.chaos_end + cfg.settle_timeout
        for upstream in upstreams:
            upstream.chaos = True
        limits = httpx.Limits(max_connections=400, max_keepalive_connections=100)
        tasks = self.clients.tasks
        async with httpx.AsyncClient(limits=limits) as http:
            self.clients.http = http
            try:
                makers = [
                    asyncio.create_task(self.killer(upstreams)),
                    asyncio.create_task(self.terminator(database, upstreams)),
                ]
                tasks.update(makers)
                tasks.add(asyncio.create_task(self.progress(database)))
                workers = [self.clients.spawn(self.clients.worker(w)) for w in range(cfg.clients)]
                await self.nap(self.chaos_end - time.time())
                await asyncio.gather(*makers)  # a restart may still be running
                for upstream in upstreams:
                    upstream.calm()
                self.event("calm")
                say("faults stopped; restarting both instances (SIGTERM) and settling")
                for instance in self.instances:  # one at a time: clients always have one
                    await asyncio.to_thread(instance.stop)
                    self.event("stop", instance=instance.name)
                    await asyncio.to_thread(instance.start)
                    self.event("restarted", instance=instance.name, pid=instance.pids[-1])
                while time.time() < self.settle_deadline:
                    clients_done = all(w.done() for w in workers)
                    if clients_done and await asyncio.to_thread(unfinished_count, database) == 0:
                        self.settled_at = time.time()
                        break
                    await asyncio.sleep(0.5)
            finally:
                self.stopping = True
                for task in list(tasks):
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        for instance in self.instances:
            await asyncio.to_thread(instance.stop)


def owner_of_connection(
    instances: list[Instance], local_port: int, remote_port: int
) -> Instance | None:
    """The instance whose process holds the TCP connection 127.0.0.1:local → :remote
    (Linux /proc; None elsewhere or when it is gone)."""
    wanted = f":{local_port:04X}", f":{remote_port:04X}"
    inode = None
    with contextlib.suppress(OSError), open("/proc/net/tcp", encoding="ascii") as table:
        for line in table:
            fields = line.split()
            if len(fields) > 9 and fields[1].endswith(wanted[0]) and fields[2].endswith(wanted[1]):
                inode = fields[9]
                break
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for instance in instances:
        if not instance.alive() or instance.process is None:
            continue
        fd_dir = f"/proc/{instance.process.pid}/fd"
        with contextlib.suppress(OSError):
            for fd in os.listdir(fd_dir):
                with contextlib.suppress(OSError):
                    if os.readlink(f"{fd_dir}/{fd}") == target:
                        return instance
    return None


PRIORITIES = {1: [1], 2: [1, 2], 3: [1, 1, 2]}


def upstreams_env(upstreams: list[ChaosUpstream], workdir: Path) -> dict[str, str]:
    """One upstream: today's variables. Several: an upstreams file (priorities 1, 2 or
    1, 1, 2), each key in a variable of its own."""
    if len(upstreams) == 1:
        return {
            "CHATGPT2API_BASE_URL": upstreams[0].base_url,
            "CHATGPT2API_API_KEY": upstreams[0].api_key,
        }
    env: dict[str, str] = {}
    tables = []
    for upstream, priority in zip(upstreams, PRIORITIES[len(upstreams)], strict=True):
        variable = f"CHAOS_KEY_{upstream.name.upper().replace('-', '_')}"
        env[variable] = upstream.api_key
        tables.append(
            f'[[upstream]]\nname = "{upstream.name}"\nbase_url = "{upstream.base_url}"\n'
            f'api_key_env = "{variable}"\npriority = {priority}\n'
        )
    file = workdir / "upstreams.toml"
    file.write_text("\n".join(tables))
    env["SCENEMINT_UPSTREAMS_FILE"] = str(file)
    return env


def service_env(
    cfg: Config, url: str, upstreams: list[ChaosUpstream], workdir: Path
) -> dict[str, str]:
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {
        **os.environ,
        "PYTHONPATH": pythonpath,  # this checkout's scenemint, whatever is installed
        **upstreams_env(upstreams, workdir),
        "SCENEMINT_DATABASE_URL": url,
        "SCENEMINT_DATA_DIR": str(workdir / "data"),  # shared: edits can be resubmitted
        "SCENEMINT_LEASE_SECONDS": f"{cfg.lease_seconds:g}",
        "SCENEMINT_RECONCILE_INTERVAL": f"{cfg.reconcile_interval:g}",
        "SCENEMINT_RECONCILE_DEADLINE": "10",
        "SCENEMINT_SUBMIT_TIMEOUT": f"{cfg.submit_timeout:g}",
        "SCENEMINT_SUBMIT_ATTEMPTS": "3",
        "SCENEMINT_CONNECT_TIMEOUT": "1",
        "SCENEMINT_POLL_TIMEOUT": f"{cfg.poll_timeout:g}",
        "SCENEMINT_POLL_MIN_INTERVAL": "0",
        "SCENEMINT_IMAGE_FIRST_BYTE_TIMEOUT": "3",
        "SCENEMINT_IMAGE_IDLE_TIMEOUT": "3",
        "SCENEMINT_TASK_MAX_AGE": f"{cfg.task_max_age:g}",
        "SCENEMINT_RESUBMIT_WINDOW": f"{cfg.resubmit_window:g}",
        "SCENEMINT_HANDOFF_GRACE": f"{cfg.handoff_grace:g}",
        # the breaker would turn the upstream's chaos into fast 503s: measure the ledger
        "SCENEMINT_BREAKER_MIN_CALLS": "1000000",
        "SCENEMINT_BREAKER_THRESHOLD": "1000000",
        "SCENEMINT_LOG_LEVEL": "INFO",
        "SCENEMINT_LOG_FORMAT": "text",
    }


def unfinished_count(database: Database) -> int:
    rows = database.query(
        "SELECT COUNT(*) FROM tasks WHERE state IN ('submitting', 'queued', 'running')"
    )
    return int(rows[0][0])


# --------------------------------------------------------------------------- checks


def run_audit(url: str, workdir: Path) -> tuple[int, str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
        ),
        "SCENEMINT_DATABASE_URL": url,
    }
    done = subprocess.run(
        [sys.executable, "-m", "scenemint", "audit", "credits"],
        env=env,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.returncode, (done.stdout + done.stderr).strip()


TASK_COLUMNS = (
    "id, fingerprint, state, error_code, error, refunded, version, lease_owner, lease_until,"
    " handed_at, idempotency_key, prompt, mode, created_at, updated_at, upstream, attempts"
)


def read_ledger(database: Database) -> dict[str, Any]:
    tasks = {
        row[0]: dict(zip([c.strip() for c in TASK_COLUMNS.split(",")], row, strict=True))
        for row in database.query(f"SELECT {TASK_COLUMNS} FROM tasks")
    }
    accounts = dict(database.query("SELECT fingerprint, balance FROM accounts"))
    grants: dict[str, int] = defaultdict(int)
    for fingerprint, total in database.query(
        "SELECT fingerprint, SUM(amount) FROM journal WHERE kind = 'grant' GROUP BY fingerprint"
    ):
        grants[fingerprint] = int(total)
    journal: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for task_id, kind, at in database.query(
        "SELECT task_id, kind, created_at FROM journal WHERE task_id IS NOT NULL ORDER BY id"
    ):
        journal[task_id].append((kind, float(at)))
    return {"tasks": tasks, "accounts": accounts, "grants": grants, "journal": journal}


def check(
    run: Run, ledger: dict[str, Any], audit: tuple[int, str], upstreams: list[ChaosUpstream]
) -> dict[str, list[Any]]:
    """Every violation, by class."""
    tasks: dict[str, dict[str, Any]] = ledger["tasks"]
    violations: dict[str, list[Any]] = defaultdict(list)
    # never paid twice: a task is made (or being made) at one upstream at most
    making = {u.name: u.tasks for u in upstreams}
    for task_id in tasks:
        at = [
            name
            for name, known in making.items()
            if known.get(task_id, {}).get("status") in ("queued", "running", "success")
        ]
        if len(at) > 1:
            violations["made_at_two_upstreams"].append({"task": task_id, "upstreams": at})
    if audit[0] != 0:
        violations["audit"].append(audit[1])
    received = run.received
    # (b) balance = grants − received tasks that did not fail
    fingerprints = set(ledger["accounts"]) | {t["fingerprint"] for t in tasks.values()}
    for fingerprint in sorted(fingerprints):
        kept = [
            task_id
            for task_id, task in tasks.items()
            if task["fingerprint"] == fingerprint
            and task_id in received
            and task["state"] != "failed"
        ]
        expected = ledger["grants"].get(fingerprint, 0) - len(kept)
        balance = int(ledger["accounts"].get(fingerprint, 0))
        if balance != expected:
            violations["balance"].append(
                {"fingerprint": fingerprint, "balance": balance, "expected": expected}
            )
    for task_id, task in tasks.items():
        if task["state"] in UNFINISHED:
            violations["unfinished"].append(task_id)
        elif task["state"] != "failed" and task_id not in received:
            violations["charged_not_received"].append(task_id)
    for task_id in received:
        if task_id not in tasks:
            violations["received_unknown_id"].append(task_id)
    # the final state a client saw must be the ledger's
    for job in run.clients.jobs:
        if job.final_seen and job.task_id in tasks:
            state = tasks[job.task_id]["state"]
            if state != job.final_seen:
                violations["client_saw_other_final"].append(
                    {"task": job.task_id, "client_saw": job.final_seen, "ledger": state}
                )
    # (c) no 500, (d) no hang
    for index, req in enumerate(run.clients.requests):
        if req.status == 500:
            violations["http_500"].append(index)
        if req.outcome in ("timeout", "connect_timeout"):
            violations["hang"].append(index)
    return violations


# --------------------------------------------------------------------------- reporting


def read_logs(run: Run) -> list[tuple[str, str]]:
    lines: list[tuple[str, str]] = []
    for instance in run.instances:
        with contextlib.suppress(OSError):
            text = instance.log_path.read_text(encoding="utf-8", errors="replace")
            lines.extend((instance.name, line) for line in text.splitlines())
    return lines


_REQUEST_ID = re.compile(r" \[([^\]\s]+)\] ")


def log_evidence(logs: list[tuple[str, str]], needle: str, limit: int = 40) -> list[str]:
    """Log lines naming `needle`, plus the other lines of the same requests."""
    hits = [(name, line) for name, line in logs if needle in line]
    request_ids = {
        match.group(1)
        for _, line in hits
        if (match := _REQUEST_ID.search(line)) and match.group(1) != "-"
    }
    chosen = [
        f"{name}: {line}"
        for name, line in logs
        if needle in line
        or ((match := _REQUEST_ID.search(line)) is not None and match.group(1) in request_ids)
    ]
    return chosen[:limit]


def describe_task(
    run: Run, ledger: dict[str, Any], logs: list[tuple[str, str]], task_id: str
) -> dict[str, Any]:
    task = ledger["tasks"].get(task_id)
    info: dict[str, Any] = {"task": task_id, "ledger": task}
    info["journal"] = [
        {"kind": kind, "at": log_time(at)} for kind, at in ledger["journal"].get(task_id, [])
    ]
    jobs = [job for job in run.clients.jobs if task and job.prompt == task["prompt"]]
    jobs += [job for job in run.clients.jobs if job.task_id == task_id and job not in jobs]
    info["client"] = [
        {
            "job": job.id,
            "key": job.key,
            "edit": job.edit,
            "result": job.result,
            "final_seen": job.final_seen,
            "requests": [
                {
                    "route": r.route,
                    "instance": r.instance,
                    "start": log_time(r.t0),
                    "end": log_time(r.t1),
                    "outcome": r.outcome,
                    "status": r.status,
                    "error": r.error,
                    "task_status": r.task_status,
                }
                for r in (run.clients.requests[i] for i in job.requests)
                if r.route == "generate"
            ],
        }
        for job in jobs
    ]
    if task:
        low = float(task["created_at"]) - 2
        high = float(task["handed_at"] or task["updated_at"]) + 3
        info["events_nearby"] = [
            {**event, "t": log_time(event["t"])}
            for event in run.events
            if low <= event["t"] <= high
        ]
    info["log"] = log_evidence(logs, task_id)
    return info


def summarize(run: Run, ledger: dict[str, Any], upstreams: list[ChaosUpstream]) -> dict[str, Any]:
    clients = run.clients
    routes: dict[str, Counter[str]] = defaultdict(Counter)
    for req in clients.requests:
        label = str(req.status) if req.outcome == "http" else req.outcome
        if req.error:
            label += f" {req.error}"
        routes[req.route][label] += 1
    generate_latency = sorted(
        r.t1 - r.t0 for r in clients.requests if r.route == "generate" and r.outcome == "http"
    )
    states = Counter(task["state"] for task in ledger["tasks"].values())
    error_codes = Counter(
        task["error_code"] for task in ledger["tasks"].values() if task["state"] == "failed"
    )
    received_states = Counter(
        ledger["tasks"][task_id]["state"] for task_id in run.received if task_id in ledger["tasks"]
    )
    results = Counter(job.result.split(":")[0] for job in clients.jobs)

    def pct(values: list[float], q: float) -> float | None:
        if not values:
            return None
        return round(values[min(len(values) - 1, int(q * len(values)))], 3)

    kills = [e for e in run.events if e["kind"] == "kill"]
    terminations = [e for e in run.events if e["kind"] == "pg_terminate_backend"]
    moved = [t for t in ledger["tasks"].values() if t.get("attempts")]
    saved = [t for t in moved if t["state"] == "completed" and t["id"] in run.received]
    counts: Counter[str] = Counter()
    fates: Counter[str] = Counter()
    for upstream in upstreams:
        counts.update(upstream.counts)
        fates.update(upstream.fates_started)
    return {
        "upstreams": [u.name for u in upstreams],
        "tasks_by_upstream": dict(Counter(t["upstream"] for t in ledger["tasks"].values())),
        "tasks_moved_on": len(moved),
        "saved_by_failover": len(saved),
        "moves_by_reason": dict(
            Counter(
                _reason(attempt["why"])
                for task in moved
                for attempt in json.loads(task["attempts"])
            ).most_common()
        ),
        "generations": len(clients.jobs),
        "generations_keyed": sum(1 for job in clients.jobs if job.key),
        "generations_edit": sum(1 for job in clients.jobs if job.edit),
        "generate_requests": sum(1 for r in clients.requests if r.route == "generate"),
        "job_results": dict(results),
        "tasks_received": len(run.received),
        "received_final_states": dict(received_states),
        "ledger_tasks": len(ledger["tasks"]),
        "ledger_states": dict(states),
        "failed_by_code": {str(k): v for k, v in error_codes.items()},
        "fingerprints": len(ledger["accounts"]),
        "requests": len(clients.requests),
        "requests_by_route": {route: dict(c) for route, c in sorted(routes.items())},
        "generate_answers_over_bound": sum(
            1 for latency in generate_latency if latency > run.cfg.submit_timeout + 2.0
        ),
        "generate_latency_s": {
            "p50": pct(generate_latency, 0.5),
            "p99": pct(generate_latency, 0.99),
            "max": generate_latency[-1] if generate_latency else None,
        },
        "kills": len(kills),
        "kills_aimed": sum(1 for e in kills if e.get("aimed")),
        "restart_seconds_max": round(max(run.restart_seconds), 2) if run.restart_seconds else None,
        "instance_starts": {i.name: i.starts for i in run.instances},
        "instance_start_failures": {i.name: i.start_failures for i in run.instances},
        "terminate_rounds": len(terminations),
        "terminate_rounds_aimed": sum(1 for e in terminations if e.get("aimed")),
        "backends_terminated": sum(e["ended"] for e in terminations),
        "upstream": dict(sorted(counts.items())),
        "upstream_task_fates": dict(fates),
        "settle_seconds": round(run.settled_at - run.chaos_end, 1) if run.settled_at else None,
    }


def _reason(why: str) -> str:
    """A move's reason, short: `submit: HTTP 429: ...` -> `submit: HTTP 429`."""
    return ": ".join(why.split(": ")[:2])[:60]


def print_table(summary: dict[str, Any], violations: dict[str, list[Any]]) -> None:
    rows = [
        ("upstreams", ", ".join(summary["upstreams"])),
        ("  ledger rows by upstream", summary["tasks_by_upstream"]),
        (
            "  tasks moved on / saved by failover",
            (f"{summary['tasks_moved_on']} / {summary['saved_by_failover']}"),
        ),
        ("  moves by reason", summary["moves_by_reason"]),
        ("generations (client jobs)", summary["generations"]),
        (
            "  with Idempotency-Key / edits",
            f"{summary['generations_keyed']} / {summary['generations_edit']}",
        ),
        ("  generate requests (incl. retries)", summary["generate_requests"]),
        ("  job results", summary["job_results"]),
        ("task ids received", summary["tasks_received"]),
        ("  their final states", summary["received_final_states"]),
        ("ledger rows", summary["ledger_tasks"]),
        ("  by state", summary["ledger_states"]),
        ("  failed, by code", summary["failed_by_code"]),
        ("fingerprints", summary["fingerprints"]),
        ("client requests", summary["requests"]),
        (
            "generate latency p50/p99/max s",
            "{p50} / {p99} / {max}".format(
                **{
                    k: (round(v, 2) if v is not None else "-")
                    for k, v in summary["generate_latency_s"].items()
                }
            ),
        ),
        (
            "generate answers slower than submit timeout + 2 s",
            summary["generate_answers_over_bound"],
        ),
        (
            "SIGKILLs, aimed (max restart s)",
            f"{summary['kills']}, {summary['kills_aimed']} ({summary['restart_seconds_max']})",
        ),
        (
            "instance starts (failed)",
            f"{summary['instance_starts']} ({summary['instance_start_failures']})",
        ),
        (
            "pg_terminate_backend rounds, aimed (backends)",
            f"{summary['terminate_rounds']}, {summary['terminate_rounds_aimed']} "
            f"({summary['backends_terminated']})",
        ),
        ("settled after calm, s", summary["settle_seconds"]),
        ("violations", {kind: len(items) for kind, items in violations.items()} or 0),
    ]
    width = max(len(name) for name, _ in rows)
    print()
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print("\n  requests by route and outcome:")
    for route, outcomes in summary["requests_by_route"].items():
        text = ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items(), key=lambda i: -i[1]))
        print(f"    {route:<9} {text}")
    upstream = summary["upstream"]
    print("  upstream faults: " + ", ".join(f"{k} {v}" for k, v in upstream.items()))
    print(
        "  upstream task fates: "
        + ", ".join(f"{k} {v}" for k, v in summary["upstream_task_fates"].items())
    )
    print()


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="chaos phase (default 30)")
    parser.add_argument("--clients", type=int, default=12, help="concurrent clients (12)")
    parser.add_argument(
        "--upstreams",
        type=int,
        default=2,
        choices=(1, 2, 3),
        help="upstreams failing independently (2: priorities 1 and 2; 3: 1, 1, 2)",
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument(
        "--kill-every",
        type=float,
        nargs=2,
        default=(2.0, 5.0),
        metavar=("MIN", "MAX"),
        help="seconds between SIGKILLs, after the last restart (2 5)",
    )
    parser.add_argument(
        "--terminate-every",
        type=float,
        nargs=2,
        default=(1.5, 4.0),
        metavar=("MIN", "MAX"),
        help="seconds between pg_terminate_backend rounds (1.5 4)",
    )
    parser.add_argument(
        "--aim",
        type=float,
        default=0.5,
        help="share of kills and terminations timed to land just after the upstream"
        " accepted a submission (0.5)",
    )
    parser.add_argument(
        "--task-max-age", type=float, default=20.0, help="SCENEMINT_TASK_MAX_AGE (20)"
    )
    parser.add_argument(
        "--settle-timeout",
        type=float,
        default=0.0,
        help="longest wait for everything to settle (default: max age + 30)",
    )
    parser.add_argument(
        "--json",
        dest="json_path",
        default=str(ROOT / "bench" / "chaos.json"),
        help="where the figures go (bench/chaos.json)",
    )
    parser.add_argument("--workdir", default=None, help="logs and records (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir and the database")
    args = parser.parse_args(argv)
    return Config(
        seconds=args.seconds,
        clients=args.clients,
        upstreams=args.upstreams,
        seed=args.seed,
        kill_every=tuple(args.kill_every),
        terminate_every=tuple(args.terminate_every),
        task_max_age=args.task_max_age,
        aim_share=args.aim,
        settle_timeout=args.settle_timeout,
        json_path=args.json_path,
        workdir=args.workdir,
        keep=args.keep,
    )


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        # outside the event loop (see Run.main), SIGTERM cleans up like Ctrl-C
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    run = Run(cfg)
    admin_url = os.environ.get("SCENEMINT_TEST_POSTGRES_URL", "").strip() or DEFAULT_ADMIN_URL
    if cfg.workdir:
        workdir = Path(cfg.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        workdir = Path(tempfile.mkdtemp(prefix="scenemint-chaos-"))
    database = Database(admin_url, run.run_id)
    database.create()
    upstreams = [
        ChaosUpstream(
            seed=run.seed + n,
            name="default" if cfg.upstreams == 1 else f"pool-{chr(ord('a') + n)}",
            api_key=f"chaos-key-{n}-SECRET-{secrets.token_hex(4)}",
        )
        for n in range(cfg.upstreams)
    ]
    say(
        f"seed {run.seed}, run {run.run_id}, database {database.name} ({database.mode}), "
        f"work dir {workdir}"
    )
    failed = True
    try:
        for upstream in upstreams:
            upstream.start()
            upstream.start_lifecycle()
        try:
            asyncio.run(run.main(database, upstreams, workdir))
        except (asyncio.CancelledError, KeyboardInterrupt):
            say("interrupted: stopping")
            return 130
        finally:
            for instance in run.instances:
                instance.close()
            for upstream in upstreams:
                upstream.stop_lifecycle()
                upstream.stop()
        database.close()
        audit = run_audit(database.url, workdir)
        ledger = read_ledger(database)
        violations = check(run, ledger, audit, upstreams)
        summary = summarize(run, ledger, upstreams)
        failed = bool(violations)
        report(run, cfg, summary, violations, ledger, audit, workdir)
    finally:
        # the database goes unless asked for (the offenders are in the JSON); the work dir
        # (logs, requests.jsonl, events.json) stays when something failed
        if cfg.keep:
            say(f"kept: database {database.name} ({database.url})")
        else:
            with contextlib.suppress(psycopg.Error):
                database.drop()
        if cfg.keep or failed:
            say(f"kept: work dir {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


def revision() -> str | None:
    """The checkout's commit (with "+dirty" when scenemint/ has changes), if it is a git one."""
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "scenemint"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def report(
    run: Run,
    cfg: Config,
    summary: dict[str, Any],
    violations: dict[str, list[Any]],
    ledger: dict[str, Any],
    audit: tuple[int, str],
    workdir: Path,
) -> None:
    with open(workdir / "requests.jsonl", "w", encoding="utf-8") as out:
        for req in run.clients.requests:
            out.write(json.dumps(asdict(req)) + "\n")
    with open(workdir / "jobs.jsonl", "w", encoding="utf-8") as out:
        for job in run.clients.jobs:
            out.write(json.dumps(asdict(job)) + "\n")
    with open(workdir / "events.json", "w", encoding="utf-8") as out:
        json.dump(run.events, out, indent=1)
    print_table(summary, violations)
    print("  audit: " + audit[1].replace("\n", "\n         "))
    logs = read_logs(run) if violations else []
    details: dict[str, list[Any]] = {}
    for kind, items in violations.items():
        shown: list[Any] = []
        for item in items[:20]:
            if kind in ("charged_not_received", "unfinished", "received_unknown_id"):
                shown.append(describe_task(run, ledger, logs, item))
            elif kind == "client_saw_other_final":
                shown.append({**item, **describe_task(run, ledger, logs, item["task"])})
            elif kind in ("http_500", "hang"):
                req = run.clients.requests[item]
                entry: dict[str, Any] = asdict(req)
                entry["start"], entry["end"] = log_time(req.t0), log_time(req.t1)
                if req.route == "generate" and req.job:
                    job = next((j for j in run.clients.jobs if j.id == req.job), None)
                    entry["prompt"] = job.prompt if job else None
                    ids = [
                        t
                        for t, task in ledger["tasks"].items()
                        if job and task["prompt"] == job.prompt
                    ]
                    entry["ledger"] = [describe_task(run, ledger, logs, t) for t in ids]
                entry["log_near"] = [
                    f"{name}: {line}"
                    for name, line in logs
                    if name == req.instance
                    and (" ERROR " in line or "Traceback" in line or "chaos:" in line)
                    and log_time(req.t0 - 1) <= line[:23] <= log_time(req.t1 + 1)
                ][:30]
                shown.append(entry)
            else:
                shown.append(item)
        details[kind] = shown
        print(f"VIOLATION {kind}: {len(items)}", file=sys.stderr)
        for entry in shown:
            print(
                "  " + json.dumps(entry, indent=2, default=str).replace("\n", "\n  "),
                file=sys.stderr,
            )
    result = {
        "ok": not violations,
        "seed": run.seed,
        "run": run.run_id,
        "revision": revision(),
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("json_path", "workdir")},
        "summary": summary,
        "violations": {kind: len(items) for kind, items in violations.items()},
        "offenders": details,
        "audit": audit[1],
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    Path(cfg.json_path).parent.mkdir(parents=True, exist_ok=True)
    with open(cfg.json_path, "w", encoding="utf-8") as out:
        json.dump(result, out, indent=2, default=str)
        out.write("\n")
    verdict = "PASSED" if not violations else "FAILED"
    print(
        f"chaos {verdict}: {summary['generations']} generations, {summary['kills']} kills, "
        f"{summary['terminate_rounds']} terminations ({summary['backends_terminated']} "
        f"backends), {sum(len(v) for v in violations.values())} violations; "
        f"figures in {cfg.json_path}"
    )


if __name__ == "__main__":
    sys.exit(main())
