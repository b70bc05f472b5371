"""Plain data: the upstream's task, our public task shape, and the rules between them."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from dataclasses import dataclass
from typing import Any

from .messages import message_for
from .settlement import Fault

SIZES = ("1:1", "16:9", "9:16")
DEFAULT_SIZE = "1:1"
# error codes of failed tasks with a meaning of their own here (see settlement.ErrorCode)
# an id this service never made (or no longer knows): the original's "task not found or
# expired", so that pollers stop; a task of ours its upstream forgot says more (task_expired)
MISSING_TASK = "task_unknown"
UPSTREAM_FAILURE = "generation_failed"

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


_TASK_ID = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)


def is_task_id(value: str) -> bool:
    """Task ids are UUIDs we made (the canonical hyphenated form); anything else is not ours
    and never goes upstream. A pattern, not `uuid.UUID`: every poll asks (it was 6 % of the
    poll path's CPU)."""
    return len(value) == 36 and _TASK_ID.fullmatch(value) is not None


def rfc3339_from_epoch(seconds: float) -> str:
    """Our own clock's moments for clients: RFC 3339, UTC, whole seconds."""
    moment = dt.datetime.fromtimestamp(seconds, tz=dt.UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class UpstreamTask:
    """The fields of a chatgpt2api task object that we use.

    Its timestamps are not among them: `createdAt` and `updatedAt` are this service's own
    (the upstream writes local time without a zone, and nothing here may depend on it).
    """

    id: str
    status: str  # already mapped to the public status
    mode: str  # already mapped: "text" or "image"
    image_url: str | None = None
    revised_prompt: str | None = None
    error: str | None = None
    fault: Fault | None = None  # a failed task: whose fault (`upstream.router.late_fault`)

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
            image_url=clean_text(url, limit=8192) if isinstance(url, str) else None,
            revised_prompt=clean_text(revised) if isinstance(revised, str) else None,
            error=_error_text(error),
        )


def _error_text(error: object) -> str | None:
    if isinstance(error, str):
        return clean_text(error)
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return clean_text(error["message"])
    return None


def clean_text(value: str, *, limit: int = 4000) -> str | None:
    """Upstream text as we keep it: no NUL, no unpaired surrogate (no database or encoder
    downstream may choke on it: a task must never be stuck behind a write refused for its
    text), at most `limit` characters, None when empty."""
    text = value.replace("\x00", "").encode("utf-8", "replace").decode("utf-8").strip()
    return text[:limit] or None


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


@dataclass(frozen=True, slots=True)
class Task:
    """The public task shape (SPEC §3). `to_json` omits empty optional fields.

    A failed task carries our `error_code`; its `error` text is the upstream's own words when
    the upstream failed the generation, otherwise our message for the code, in the reader's
    language.
    """

    id: str
    mode: str = "text"
    status: str = "queued"
    size: str | None = None
    image: str | None = None
    error_code: str | None = None
    error: str | None = None
    revised_prompt: str | None = None
    created_at: str | None = None
    updated_at: str | None = None
    prompt: str | None = None
    remaining_credits: int | None = None
    queue_position: int | None = None

    def error_text(self, *, chinese: bool = False) -> str | None:
        if self.status != "failed":
            return None
        if self.error and self.error_code in (None, UPSTREAM_FAILURE):
            return self.error
        return message_for(self.error_code or UPSTREAM_FAILURE, chinese=chinese)

    def to_json(self, *, chinese: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "mode": self.mode}
        if self.prompt is not None:
            out["prompt"] = self.prompt
        if self.size:
            out["size"] = self.size
        if self.image:
            out["image"] = self.image
        out["status"] = self.status
        error = self.error_text(chinese=chinese)
        if error:
            out["error"] = error
        if self.queue_position is not None:
            out["queuePosition"] = self.queue_position
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
    return Task(id=task_id, mode="text", status="failed", error_code=MISSING_TASK)


def image_path(task_id: str) -> str:
    return f"/api/images/tasks/{task_id}/image"
