"""Prometheus metrics, in a registry of the app's own (no process globals).

One process (`scenemint serve`) keeps its figures in memory. Several (`--workers N`) share
them through prometheus_client's multiprocess mode: `serve` gives the group a directory of
its own, empty at the start (`shared_directory`: PROMETHEUS_MULTIPROC_DIR, read by
prometheus_client when it is first imported in each worker), every worker writes its
figures there, and every scrape, whichever worker answers it, reads all of them
(`Metrics.render`): counters and histograms are summed over the workers, those of workers
that died included (a count never goes back); each gauge says how it is combined (its
`multiprocess_mode`). Samples `_created` exist only in one process.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import values as _values
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_LIVE_GAUGE_FILE = re.compile(r"gauge_live[a-z]+_(\d+)\.db$")

_ROUTES = (
    "/api/images/generate",
    "/api/prompts/enhance",
    "/api/quota/status",
    "/api/quota/check-in",
    "/healthz",
    "/readyz",
    "/metrics",
    "/docs",
    "/openapi.json",
)


def route_of(path: str) -> str:
    """A bounded label for a path: templates for task ids, "other" for anything unknown."""
    if path.startswith("/api/images/tasks/"):
        if path.endswith("/image"):
            return "/api/images/tasks/{id}/image"
        if path.endswith("/events"):
            return "/api/images/tasks/{id}/events"
        return "/api/images/tasks/{id}"
    return path if path in _ROUTES else "other"


class SharedDirectoryError(Exception):
    """PROMETHEUS_MULTIPROC_DIR names something the workers cannot share figures in."""


@contextmanager
def shared_directory() -> Iterator[Path]:
    """The directory the workers of one `serve --workers N` share their figures in, for
    as long as they run: PROMETHEUS_MULTIPROC_DIR if it is set (its figures of an earlier
    run removed first: they would be summed in), else a temporary one, removed at the end.
    Set in the environment before the workers start: they read it there."""
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        path = Path(given)
        try:
            path.mkdir(parents=True, exist_ok=True)
            for old in path.glob("*.db"):
                old.unlink()
            probe = path / f".scenemint-probe-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as exc:
            raise SharedDirectoryError(
                f"{MULTIPROC_ENV}={given!r} is not usable: {exc.strerror or exc}"
                " (a directory this service may write, used by nothing else)"
            ) from None
        yield path
        return
    path = Path(tempfile.mkdtemp(prefix="scenemint-metrics-"))
    os.environ[MULTIPROC_ENV] = str(path)
    try:
        yield path
    finally:
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(path, ignore_errors=True)


def _shared_path() -> Path | None:
    """The multiprocess directory this process writes its figures to, if any."""
    given = os.environ.get(MULTIPROC_ENV)
    if not given:
        return None
    if _values.ValueClass.__name__ != "MmapedValue":
        raise RuntimeError(
            f"{MULTIPROC_ENV} was set after prometheus_client was imported in this process:"
            " its figures would not be shared; set it before the process starts"
        )
    return Path(given)


class Metrics:
    def __init__(self) -> None:
        # several workers: the figures go to files there (prometheus_client decided that
        # when it was imported), and a scrape reads every worker's
        self.shared = _shared_path()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "scenemint_http_requests",
            "HTTP requests answered",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "scenemint_http_request_duration_seconds",
            "Time to answer (streams: until closed)",
            ["route"],
            registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
        )
        self.upstream_calls = Counter(
            "scenemint_upstream_calls",
            "Upstream calls by upstream (its name), kind and HTTP status",
            ["upstream", "kind", "status"],
            registry=r,
        )
        self.upstream_failures = Counter(
            "scenemint_upstream_failures",
            "Upstream failures by upstream, kind and reason",
            ["upstream", "kind", "reason"],
            registry=r,
        )
        self.breaker_open = Gauge(
            "scenemint_upstream_breaker_open",
            "1 while an upstream's circuit breaker for an operation is open (in any worker:"
            " each has its own)",
            ["upstream", "operation"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.failovers = Counter(
            "scenemint_failovers",
            "Tasks that moved on to another upstream, by the one they left and the one they"
            " went to",
            ["upstream", "to"],
            registry=r,
        )
        self.tasks = Counter(
            "scenemint_tasks", "Generation tasks by outcome", ["outcome"], registry=r
        )
        self.credits_charged = Counter(
            "scenemint_credits_charged", "Credits charged for generations", registry=r
        )
        self.credits_refunded = Counter(
            "scenemint_credits_refunded", "Credits given back for failed generations", registry=r
        )
        self.reconcile_errors = Counter(
            "scenemint_reconcile_errors",
            "Rows a reconcile round could not settle (each is tried again next round)",
            registry=r,
        )
        self.image_copies = Counter(
            "scenemint_image_copies", "Images copied into the image store", registry=r
        )
        self.image_copy_failures = Counter(
            "scenemint_image_copy_failures",
            "Image copies that failed (each is tried again until the fetch deadline)",
            ["reason"],
            registry=r,
        )
        self.image_store_bytes = Gauge(
            "scenemint_image_store_bytes",
            "Bytes of the live images in the image store (as of the last sweep)",
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.image_sweeps = Counter(
            "scenemint_image_sweeps", "Retention sweeps run by this process", registry=r
        )
        self.images_expired = Counter(
            "scenemint_images_expired", "Images deleted by the retention rule", registry=r
        )
        self.image_orphans_removed = Counter(
            "scenemint_image_orphans_removed",
            "Objects of no task (left by a copy killed before its ledger write) removed",
            registry=r,
        )
        self.job_errors = Counter(
            "scenemint_job_errors",
            "Work items (image copies, generation jobs) that raised; each is tried again",
            ["worker"],
            registry=r,
        )
        self.connections_closed = Counter(
            "scenemint_connections_closed",
            "Client connections the server closed or refused, by reason (head_timeout, idle,"
            " body_rate, send_timeout, head_too_large, url_too_long, too_many)",
            ["reason"],
            registry=r,
        )
        self.open_streams = Gauge(
            "scenemint_open_streams",
            "Responses streaming right now (all workers)",
            ["kind"],
            registry=r,
            multiprocess_mode="livesum",
        )

    def render(self) -> bytes:
        """The exposition: this process's figures, or every worker's when they share."""
        if self.shared is None:
            return generate_latest(self.registry)
        _forget_dead_workers(self.shared)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self.shared))  # type: ignore[no-untyped-call]
        return generate_latest(registry)

    def close(self) -> None:
        """This worker ends: its gauges stop counting (its counts stay, summed in)."""
        if self.shared is not None:
            mark_process_dead(os.getpid(), str(self.shared))  # type: ignore[no-untyped-call]


def _forget_dead_workers(path: Path) -> None:
    """The live gauges of workers that are gone (killed: no `close`) stop counting."""
    for name in glob.glob(os.path.join(path, "gauge_live*_*.db")):
        found = _LIVE_GAUGE_FILE.search(name)
        if found is None:
            continue
        pid = int(found.group(1))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            mark_process_dead(pid, str(path))  # type: ignore[no-untyped-call]
        except PermissionError:
            pass  # alive, someone else's
