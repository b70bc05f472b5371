"""Plain data: the upstream's task, our public task shape, and the rules between them."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass, field
from typing import Any

SIZES = ("1:1", "16:9", "9:16")
DEFAULT_SIZE = "1:1"
MISSING_TASK_ERROR = "task not found or expired"

# upstream status -> public status; anything unknown is "queued" so pollers keep polling
_STATUS = {
    "queued": "queued",
    "running": "running",
    "success": "completed",
    "completed": "completed",
    "error": "failed",
    "failed": "failed",
}
TERMINAL = frozenset({"completed", "failed"})


def normalize_size(size: object) -> str:
    value = size.strip() if isinstance(size, str) else ""
    return value if value in SIZES else DEFAULT_SIZE


def map_status(upstream_status: object) -> str:
    return _STATUS.get(upstream_status, "queued") if isinstance(upstream_status, str) else "queued"


def map_mode(upstream_mode: object) -> str:
    return "image" if upstream_mode in ("edit", "image") else "text"


def new_task_id() -> str:
    return str(uuid.uuid4())


def is_task_id(value: str) -> bool:
    """Task ids are UUIDs we made; anything else is not ours and never goes upstream."""
    if len(value) != 36:
        return False
    try:
        return str(uuid.UUID(value)) == value.lower()
    except ValueError:
        return False


def rfc3339(moment: dt.datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def rfc3339_from_epoch(seconds: float) -> str:
    return rfc3339(dt.datetime.fromtimestamp(seconds, tz=dt.UTC))


def parse_timestamp(value: object) -> str | None:
    """Upstream timestamps may lack a timezone; they are UTC then. Unparseable → None."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return rfc3339_from_epoch(float(value))
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip().replace("Z", "+00:00").replace("z", "+00:00")
    try:
        return rfc3339(dt.datetime.fromisoformat(text))
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class UpstreamTask:
    """The fields of a chatgpt2api task object that we use."""

    id: str
    status: str  # already mapped to the public status
    mode: str  # already mapped: "text" or "image"
    image_url: str | None = None
    revised_prompt: str | None = None
    error: str | None = None
    created_at: str | None = None
    updated_at: str | None = None

    @classmethod
    def from_json(cls, obj: Any) -> UpstreamTask:
        """Read a task object; raises ValueError when it is not one."""
        if not isinstance(obj, dict) or not isinstance(obj.get("id"), str) or not obj["id"]:
            raise ValueError("task object without an id")
        first: dict[str, Any] = {}
        data = obj.get("data")
        if isinstance(data, list) and data and isinstance(data[0], dict):
            first = data[0]
        url = first.get("url")
        revised = first.get("revised_prompt")
        error = obj.get("error")
        return cls(
            id=obj["id"],
            status=map_status(obj.get("status")),
            mode=map_mode(obj.get("mode")),
            image_url=url.strip() if isinstance(url, str) and url.strip() else None,
            revised_prompt=revised if isinstance(revised, str) and revised else None,
            error=_error_text(error),
            created_at=parse_timestamp(obj.get("created_at")),
            updated_at=parse_timestamp(obj.get("updated_at")),
        )


def _error_text(error: object) -> str | None:
    if isinstance(error, str):
        return error.strip() or None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"].strip() or None
    return None


@dataclass(frozen=True, slots=True)
class TaskListing:
    """The answer of `GET /api/image-tasks?ids=...`."""

    items: dict[str, UpstreamTask]
    missing: frozenset[str]

    @classmethod
    def from_json(cls, obj: Any) -> TaskListing:
        # "items" is required: a listing without it must not read as "every task is missing"
        if not isinstance(obj, dict) or not isinstance(obj.get("items"), list):
            raise ValueError("task listing of an unexpected shape")
        items = {}
        for raw in obj.get("items") or []:
            task = UpstreamTask.from_json(raw)
            items[task.id] = task
        missing = obj.get("missing_ids") or []
        if not isinstance(missing, list):
            raise ValueError("missing_ids is not a list")
        return cls(items=items, missing=frozenset(str(m) for m in missing))


@dataclass(slots=True)
class Task:
    """The public task shape (SPEC §3). `to_json` omits empty optional fields."""

    id: str
    mode: str = "text"
    status: str = "queued"
    size: str | None = None
    image: str | None = None
    error: str | None = None
    revised_prompt: str | None = None
    created_at: str | None = None
    updated_at: str | None = None
    prompt: str | None = None
    remaining_credits: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "mode": self.mode}
        if self.prompt is not None:
            out["prompt"] = self.prompt
        if self.size:
            out["size"] = self.size
        if self.image:
            out["image"] = self.image
        out["status"] = self.status
        if self.error:
            out["error"] = self.error
        if self.revised_prompt:
            out["revisedPrompt"] = self.revised_prompt
        if self.created_at:
            out["createdAt"] = self.created_at
        if self.updated_at:
            out["updatedAt"] = self.updated_at
        if self.remaining_credits is not None:
            out["remainingCredits"] = self.remaining_credits
        return out


def missing_task(task_id: str) -> Task:
    """The answer for an id the upstream does not know or we never made: pollers stop."""
    return Task(id=task_id, mode="text", status="failed", error=MISSING_TASK_ERROR)


def image_path(task_id: str) -> str:
    return f"/api/images/tasks/{task_id}/image"
