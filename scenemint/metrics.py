"""Prometheus metrics, in a registry of the app's own (no process globals).

With `--workers N` each worker keeps and serves its own figures.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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
        return (
            "/api/images/tasks/{id}/image" if path.endswith("/image") else "/api/images/tasks/{id}"
        )
    return path if path in _ROUTES else "other"


class Metrics:
    def __init__(self) -> None:
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
            "1 while an upstream's circuit breaker for an operation is open",
            ["upstream", "operation"],
            registry=r,
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
            "scenemint_open_streams", "Responses streaming right now", ["kind"], registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
