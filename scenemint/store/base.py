"""What the service needs from a store: credits (the quota component) and the task ledger.

Credits and ledger share one store because a charge and its ledger row, and a refund and
the row's new state, must change together in one transaction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

DAILY_GRANT = 10
CAP = 100

# ledger row states; "submitting" means: credit taken, upstream's answer not yet heard
SUBMITTING = "submitting"
UNFINISHED_STATES = ("submitting", "queued", "running")


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
    """What a charge records about the generation it pays for (and what a resubmission needs)."""

    id: str
    fingerprint: str
    mode: str  # "text" or "image"
    prompt: str
    size: str
    reference_path: str | None = None
    reference_name: str | None = None
    reference_type: str | None = None


@dataclass(frozen=True, slots=True)
class Charge:
    """One credit taken for one task; refundable exactly once through `Store.fail_task`."""

    task_id: str
    fingerprint: str
    balance: int  # after the charge


@dataclass(frozen=True, slots=True)
class LedgerTask:
    id: str
    fingerprint: str
    mode: str
    prompt: str
    size: str
    state: str  # submitting, queued, running, completed, failed
    refunded: bool
    image_url: str | None
    revised_prompt: str | None
    error: str | None
    reference_path: str | None
    reference_name: str | None
    reference_type: str | None
    upstream_created_at: str | None
    upstream_updated_at: str | None
    created_at: float
    updated_at: float

    @property
    def finished(self) -> bool:
        return self.state in ("completed", "failed")


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
        """Take one credit and record the task as submitting; raises NoCredits."""
        ...

    async def fail_task(self, task_id: str, *, error: str) -> bool:
        """Mark the task failed and refund its charge; True only for the call that refunded."""
        ...


class Store(QuotaStore, Protocol):
    """QuotaStore plus the task ledger the service and the reconciler keep."""

    async def get_task(self, task_id: str) -> LedgerTask | None: ...

    async def update_task(
        self,
        task_id: str,
        *,
        state: str,
        image_url: str | None = None,
        revised_prompt: str | None = None,
        upstream_created_at: str | None = None,
        upstream_updated_at: str | None = None,
    ) -> LedgerTask | None:
        """Move an unfinished task to `state` (not "failed": use fail_task). Finished rows stay."""
        ...

    async def unfinished_tasks(self, *, older_than: float, limit: int) -> list[LedgerTask]: ...

    async def audit(self) -> AuditReport: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...
