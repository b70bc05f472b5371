"""/metrics with `scenemint serve --workers N`: every scrape, whichever worker answers it,
reports the whole group (prometheus_client's multiprocess mode, `metrics.py`)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
from pathlib import Path

import httpx
import pytest

from scenemint.metrics import MULTIPROC_ENV, Metrics
from tests.fake_upstream import FakeUpstream
from tests.service_runner import ServiceProcess
from tests.test_processes import FP, env_for, wait_until

SAMPLE = re.compile(r"^(\w+)\{([^}]*)\} (\S+)$", re.M)


def fresh(url: str) -> httpx.Response:
    """One request on a connection of its own: the kernel hands it to either worker."""
    with httpx.Client(timeout=10, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        return client.get(url)


def sample(server: ServiceProcess, name: str, **labels: str) -> float:
    """The value of one sample of a scrape (labels in any order; 0 when it is absent)."""
    for found, text, value in SAMPLE.findall(fresh(server.url + "/metrics").text):
        if found == name and dict(re.findall(r'(\w+)="([^"]*)"', text)) == labels:
            return float(value)
    return 0.0


def healthz_count(server: ServiceProcess) -> float:
    name = "scenemint_http_requests_total"
    return sample(server, name, route="/healthz", method="GET", status="200")


def open_streams(server: ServiceProcess) -> float:
    return sample(server, "scenemint_open_streams", kind="events")


def two_workers(upstream: FakeUpstream, tmp_path: Path, **env: str) -> ServiceProcess:
    server = ServiceProcess(
        env_for(upstream, SCENEMINT_DATA_DIR=str(tmp_path / "data"), **env),
        cwd=str(tmp_path),
        args=("--workers", "2"),
    ).wait_ready()
    wait_until(
        lambda: server.log().count("Application startup complete") >= 2,
        what="both workers started",
    )
    return server


def test_every_scrape_counts_the_requests_of_both_workers(upstream, tmp_path):
    server = two_workers(upstream, tmp_path)
    try:
        before = healthz_count(server)
        for _ in range(300):
            assert fresh(server.url + "/healthz").status_code == 200
        # each worker alone answered about half of them: every scrape must see all 300
        seen = [healthz_count(server) - before for _ in range(12)]
        assert seen == [300.0] * 12, seen
        pids = set(re.findall(r"Started server process \[(\d+)\]", server.log()))
        assert len(pids) == 2
    finally:
        server.stop()


def test_an_open_stream_counts_once_whichever_worker_is_asked_and_stops_counting(
    upstream, tmp_path
):
    server = two_workers(upstream, tmp_path)
    try:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            client.post("/api/quota/check-in", json={"fingerprint": FP})
            task = client.post(
                "/api/images/generate", json={"prompt": "a fox", "fingerprint": FP}
            ).json()["data"]
        reading = threading.Event()
        done = threading.Event()

        def follow() -> None:
            with (
                httpx.Client(timeout=30) as client,
                client.stream(
                    "GET", f"{server.url}/api/images/tasks/{task['id']}/events"
                ) as response,
            ):
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        reading.set()
                    if done.is_set():
                        return

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        assert reading.wait(10)
        assert [open_streams(server) for _ in range(8)] == [1.0] * 8
        upstream.complete_task(task["id"])  # the stream ends after the completed event
        follower.join(10)
        wait_until(lambda: open_streams(server) == 0.0, what="the stream no longer counted")
        assert [open_streams(server) for _ in range(8)] == [0.0] * 8
    finally:
        done.set()
        server.stop()


def test_a_given_directory_is_emptied_at_the_start(upstream, tmp_path):
    """PROMETHEUS_MULTIPROC_DIR of an earlier run: its figures are not summed in again."""
    shared = tmp_path / "metrics"
    for run in range(2):
        server = two_workers(upstream, tmp_path, **{MULTIPROC_ENV: str(shared)})
        try:
            for _ in range(20):
                fresh(server.url + "/healthz")
            assert 20 <= healthz_count(server) < 40, run  # wait_ready's own few, and ours
        finally:
            server.stop()
        assert list(shared.glob("*.db")), "the workers wrote their figures there"


def test_a_directory_set_after_prometheus_client_was_imported_is_refused(monkeypatch, tmp_path):
    """Figures that would silently stay per worker: a loud error instead."""
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    with pytest.raises(RuntimeError, match="set after prometheus_client was imported"):
        Metrics()


def test_workers_stop_when_their_supervisor_is_killed_outright(upstream, tmp_path):
    """SIGKILL (or the OOM killer) on `serve --workers 2` cannot stop its workers: they see
    their supervisor gone and stop themselves, freeing the port for a restart."""
    server = two_workers(upstream, tmp_path)
    workers = [int(pid) for pid in re.findall(r"Started server process \[(\d+)\]", server.log())]
    assert len(workers) == 2
    try:
        server.kill()
        wait_until(lambda: not any(alive(pid) for pid in workers), what="both workers gone")
        with pytest.raises(httpx.ConnectError):
            httpx.get(server.url + "/healthz", timeout=2)
        restarted = ServiceProcess(
            env_for(upstream, SCENEMINT_DATA_DIR=str(tmp_path / "data")),
            cwd=str(tmp_path),
            port=server.port,
        ).wait_ready()
        restarted.stop()
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        server.stop()


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
