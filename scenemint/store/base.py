"""What the service needs from a store: credits (the quota component) and the task ledger.

Credits and ledger share one store because a charge and its ledger row, and a refund and
the row's new state, must change together in one transaction. The ledger row is the task:
its state, its version (bumped by every change), its lease (who may act on it, until when,
by the store's clock) and whether its answer was handed to the client.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from ..settlement import FINISHED, Decision, ImageRecord, State

DAILY_GRANT = 10
CAP = 100


@dataclass(frozen=True, slots=True)
class QuotaStatus:
    balance: int
    signed_today: bool
    cap: int = CAP
    daily_grant: int = DAILY_GRANT

    def to_json(self) -> dict[str, Any]:
        return {
            "balance": self.balance,
            "signedToday": self.signed_today,
            "cap": self.cap,
            "dailyGrant": self.daily_grant,
        }


@dataclass(frozen=True, slots=True)
class NewTask:
    """What a charge records about the generation it pays for (and what a resubmission needs).

    The row starts in `state`, leased to `lease_owner` for `lease_seconds`: the request that
    charges it owns it until it writes the outcome or its lease lapses.
    """

    id: str
    fingerprint: str
    mode: str  # "text" or "image"
    prompt: str
    size: str
    reference_path: str | None = None
    reference_name: str | None = None
    reference_type: str | None = None
    state: State = State.SUBMITTING
    lease_owner: str | None = None
    lease_seconds: float = 0.0
    idempotency_key: str | None = None
    request_hash: str | None = None
    kind: str = "task"  # "task": an async task API's; "sync": a job our runners send
    upstream: str = "default"  # the upstream it is sent to
    # the charging request sends it at once (sent_at is written with the charge): whoever
    # finds the row later knows a request may have left for its upstream
    sending: bool = False


@dataclass(frozen=True, slots=True)
class Attempt:
    """An upstream a task left for another, and why."""

    upstream: str
    why: str
    at: float


@dataclass(frozen=True, slots=True)
class LedgerTask:
    id: str
    fingerprint: str
    mode: str
    prompt: str
    size: str
    state: str
    version: int
    refunded: bool
    lease_owner: str | None
    lease_until: float
    handed_at: float | None
    idempotency_key: str | None
    request_hash: str | None
    image_url: str | None
    revised_prompt: str | None
    error_code: str | None
    error: str | None
    reference_path: str | None
    reference_name: str | None
    reference_type: str | None
    created_at: float
    updated_at: float
    image_key: str | None = None
    image_type: str | None = None
    image_bytes: int | None = None
    image_width: int | None = None
    image_height: int | None = None
    image_stored_at: float | None = None
    image_expired_at: float | None = None
    upstream_done_at: float | None = None
    fetch_attempts: int = 0
    fetch_error: str | None = None
    kind: str = "task"
    # when a request (may have) left for its current upstream; None: never sent there
    sent_at: float | None = None
    upstream: str = "default"  # the upstream that holds it
    attempts: tuple[Attempt, ...] = ()  # the upstreams it left before, in order

    @property
    def tried(self) -> tuple[str, ...]:
        """Every upstream this task was sent to (or queued for), the current one last."""
        return (*(attempt.upstream for attempt in self.attempts), self.upstream)

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    @property
    def handed(self) -> bool:
        return self.handed_at is not None


@dataclass(frozen=True, slots=True)
class Charge:
    """One credit taken for one task; the row as created and the balance after the charge."""

    task: LedgerTask
    balance: int


class KeyInUse(Exception):
    """The idempotency key already names a task of this fingerprint: nothing was charged."""

    def __init__(self, task: LedgerTask) -> None:
        super().__init__(f"idempotency key in use by task {task.id}")
        self.task = task


@dataclass(frozen=True, slots=True)
class UpstreamCounts:
    in_flight: int = 0
    completed: int = 0
    failed: int = 0


@dataclass(slots=True)
class AuditReport:
    accounts: int = 0
    tasks: int = 0
    grants: int = 0
    charges: int = 0
    refunds: int = 0
    tasks_by_state: dict[str, int] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


class QuotaStore(Protocol):
    """The quota component: balances, daily check-in, and one-credit charges."""

    async def status(self, fingerprint: str) -> QuotaStatus: ...

    async def check_in(self, fingerprint: str) -> QuotaStatus: ...

    async def spend(self, task: NewTask) -> Charge:
        """Take one credit and record the task; raises NoCredits, or KeyInUse (nothing charged)."""
        ...


class Store(QuotaStore, Protocol):
    """QuotaStore plus the task ledger, changed only by settlement decisions."""

    def now(self) -> float:
        """The store's clock (seconds since the epoch): leases are compared against it."""
        ...

    async def get_task(self, task_id: str) -> LedgerTask | None: ...

    async def task_by_key(self, fingerprint: str, key: str) -> LedgerTask | None: ...

    async def apply(
        self, row: LedgerTask, decision: Decision, *, owner: str | None = None
    ) -> LedgerTask | None:
        """Write `decision` if the row is still at `row.version` (and the guard holds);
        a FAILED decision refunds in the same transaction. None when stale: nothing changed."""
        ...

    async def claim(self, row: LedgerTask, *, owner: str, seconds: float) -> LedgerTask | None:
        """Take the lease of a row nobody holds (at `row.version`); None when someone else did."""
        ...

    async def renew(self, row: LedgerTask, *, owner: str, seconds: float) -> bool:
        """Extend a lease we hold; False when it is no longer ours."""
        ...

    async def settleable(self, *, limit: int) -> list[LedgerTask]:
        """Unfinished rows that no live lease holds, oldest first."""
        ...

    async def claim_fetching(self, *, owner: str, seconds: float, limit: int) -> list[LedgerTask]:
        """Lease up to `limit` `fetching` rows nobody holds (their images are to be copied);
        on PostgreSQL several instances claim side by side (`FOR UPDATE SKIP LOCKED`)."""
        ...

    async def claim_jobs(
        self, *, upstream: str, owner: str, seconds: float, limit: int
    ) -> list[LedgerTask]:
        """Lease up to `limit` queued sync jobs of `upstream` nobody holds, oldest first
        (handed only: a job is the client's before it runs); several instances side by side
        on PostgreSQL."""
        ...

    async def queue_position(self, row: LedgerTask) -> int:
        """1 + how many queued sync jobs of its upstream were created before `row`."""
        ...

    async def claim_legacy_copy(
        self, row: LedgerTask, *, owner: str, seconds: float
    ) -> LedgerTask | None:
        """Lease a completed row whose image was never copied (completed before the image
        store existed); None when someone else holds it."""
        ...

    async def attach_image(
        self, row: LedgerTask, image: ImageRecord, *, owner: str
    ) -> LedgerTask | None:
        """Record the copied image of a legacy completed row we hold (no money moves)."""
        ...

    async def claim_named(self, name: str, *, owner: str, seconds: float) -> bool:
        """Take (or renew) a named lease, such as the retention sweep's."""
        ...

    async def expire_images(self, *, stored_before: float, limit: int) -> int:
        """Mark the images stored before `stored_before` expired; how many were marked."""
        ...

    async def purgeable_keys(self, *, limit: int) -> list[str]:
        """Keys of expired images that no unexpired task still uses, not yet removed."""
        ...

    async def image_purged(self, key: str) -> None: ...

    async def image_keys(self) -> dict[str, tuple[str, int]]:
        """Every image key the ledger knows -> ("live", "expired" or "purged", its recorded
        size in bytes) (for the audit)."""
        ...

    async def images_pending_copy(self) -> int:
        """Completed rows of before the image store whose image is not copied yet."""
        ...

    async def stored_bytes(self) -> int:
        """Bytes of the distinct live images (for the metric)."""
        ...

    async def forget_keys(self, *, created_before: float) -> int: ...

    async def stale_references(self, *, limit: int) -> list[tuple[str, str]]: ...

    async def reference_dropped(self, task_id: str) -> None: ...

    async def audit(self) -> AuditReport: ...

    async def versions(self, ids: list[str]) -> dict[str, int]:
        """The current version of each of `ids` that exists (task events)."""
        ...

    async def remember_upstreams(self, described: dict[str, str]) -> None:
        """Keep the (non-secret) description of each configured upstream, by name."""
        ...

    async def remembered_upstreams(self) -> dict[str, str]:
        """name -> description of every upstream ever configured."""
        ...

    async def upstream_counts(self, *, since: float) -> dict[str, UpstreamCounts]:
        """Per upstream: tasks unfinished now, completed and failed since `since`."""
        ...

    async def ping(self) -> None: ...

    async def probe_write(self) -> None:
        """Raise StoreUnavailable unless the database accepts a write (readiness)."""
        ...

    async def close(self) -> None: ...
