"""The task-event figures' tools (used by bench/run.py): raw event-stream watchers, and the
ledger read and written from outside the service, as another instance reads and writes it.

A watcher is one connection speaking HTTP/1.0, so that its event stream is the raw body
(no chunked framing): 10,000 of them cost this process little, and each event's arrival
time is taken when its `data:` line is read.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from typing import Any

from scenemint.settlement import Decision, ErrorCode, Guard, State
from scenemint.store import SQLStore


class Watcher:
    """One `GET /api/images/tasks/{id}/events`: `events` are (arrival unix time, data)."""

    def __init__(self, host: str, port: int, task_id: str) -> None:
        self.host = host
        self.port = port
        self.task_id = task_id
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.first = asyncio.Event()
        self.error: str | None = None

    def status_seen(self, status: str) -> float | None:
        """When the first event with `status` arrived."""
        for moment, data in self.events:
            if data.get("status") == status:
                return moment
        return None

    async def run(self) -> None:
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port, limit=1 << 16)
        except OSError as exc:
            self.error = f"connect: {exc}"
            return
        try:
            path = f"/api/images/tasks/{self.task_id}/events"
            writer.write(
                f"GET {path} HTTP/1.0\r\nHost: {self.host}\r\n"
                "Accept: text/event-stream\r\n\r\n".encode()
            )
            head = await reader.readuntil(b"\r\n\r\n")
            if b" 200 " not in head.split(b"\r\n", 1)[0]:
                self.error = head.split(b"\r\n", 1)[0].decode(errors="replace")
                return
            while line := await reader.readline():
                if line.startswith(b"data:"):
                    self.events.append((time.time(), json.loads(line[5:])))
                    self.first.set()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            writer.close()


async def open_watchers(
    host: str, port: int, task_ids: list[str], *, rate: int = 2000
) -> tuple[list[Watcher], list[asyncio.Task[None]]]:
    """One watcher per entry of `task_ids`, opened at about `rate` a second (a burst of
    10,000 would only measure the listen backlog), each running in its own task."""
    watchers = [Watcher(host, port, task_id) for task_id in task_ids]
    tasks: list[asyncio.Task[None]] = []
    for n, watcher in enumerate(watchers):
        tasks.append(asyncio.create_task(watcher.run()))
        if n % 100 == 99:
            await asyncio.sleep(100 / rate)
    return watchers, tasks


async def all_first(watchers: list[Watcher], timeout: float) -> int:
    """Wait until every watcher has its first event (or `timeout`): how many have one."""
    waits = [asyncio.ensure_future(w.first.wait()) for w in watchers]
    _, pending = await asyncio.wait(waits, timeout=timeout)
    for wait in pending:
        wait.cancel()
    return sum(1 for w in watchers if w.first.is_set())


async def close(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def ledger_times(database_url: str, ids: list[str]) -> dict[str, float]:
    """The moment each task's ledger row was last written (its `updated_at`, unix time)."""
    store = await SQLStore.open(database_url)
    try:
        rows = [await store.get_task(task_id) for task_id in ids]
    finally:
        await store.close()
    return {row.id: row.updated_at for row in rows if row is not None}


async def refund_elsewhere(database_url: str, ids: list[str], gap: float) -> dict[str, float]:
    """Fail and refund each task, `gap` seconds apart, from this process — as another
    instance's reconciler does — through the store's own conditional write; the unix time
    each write began."""
    store = await SQLStore.open(database_url)
    written: dict[str, float] = {}
    try:
        for task_id in ids:
            row = await store.get_task(task_id)
            if row is None:
                raise RuntimeError(f"task {task_id} is not in {database_url.split(':')[0]}")
            decision = Decision(State.FAILED, Guard.FREE, error_code=ErrorCode.TIMED_OUT)
            started = time.time()  # the change begins: its own write time counts as delay
            if await store.apply(row, decision) is None:
                raise RuntimeError(f"task {task_id} changed under the bench")
            written[task_id] = started
            await asyncio.sleep(gap)
    finally:
        await store.close()
    return written


def percentile(values: list[float], q: float) -> float:
    """The `q` quantile (0..1) of `values`, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summary(values_ms: list[float]) -> str:
    return (
        f"p50 {statistics.median(values_ms):.0f} ms, p90 {percentile(values_ms, 0.9):.0f} ms,"
        f" max {max(values_ms):.0f} ms over {len(values_ms)}"
    )
