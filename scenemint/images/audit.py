"""`scenemint images audit`: the image store against the ledger."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..store import Store
from .base import ImageStore


@dataclass(slots=True)
class ImageAudit:
    live: int = 0  # distinct images of unexpired completed tasks
    expired: int = 0  # expired, not yet removed by the sweep
    objects: int = 0  # objects in the store
    legacy: int = 0  # completed before the image store: copied on their first request
    deleted: int = 0  # objects of no task deleted (`delete_orphans_before`)
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


async def audit_images(
    store: Store, images: ImageStore, *, delete_orphans_before: float | None = None
) -> ImageAudit:
    """Every live image of the ledger has its object (of the recorded size), and every
    object belongs to a task of the ledger (live, or expired and waiting for the sweep).

    With `delete_orphans_before` (seconds since the epoch), objects of no task (or of
    purged images) last written before then are deleted instead of reported: what a copy
    stored just before its ledger write failed. A copy in flight writes its ledger row
    within its lease, and a copy made again rewrites the object: a cut-off a day back
    never touches one."""
    report = ImageAudit()
    known = await store.image_keys()
    stored = {key async for key in images.list_keys()}
    report.objects = len(stored)
    report.legacy = await store.images_pending_copy()
    for key, (status, size) in sorted(known.items()):
        if status == "live":
            report.live += 1
            info = await images.head(key)
            if info is None:
                report.violations.append(f"image {key}: a completed task's image is missing")
            elif info.size != size:
                report.violations.append(
                    f"image {key}: {info.size} bytes stored, the ledger recorded {size}"
                )
        elif status == "expired":
            report.expired += 1
    leftovers = {key: "belongs to no task" for key in stored - set(known)}
    for key in stored:
        if known.get(key, ("",))[0] == "purged":
            leftovers[key] = "its tasks' images were purged, it was not"
    for key, why in sorted(leftovers.items()):
        if delete_orphans_before is not None:
            info = await images.head(key)
            if info is None:
                continue  # gone meanwhile
            if info.modified < delete_orphans_before:
                await images.delete(key)
                report.deleted += 1
                continue
        report.violations.append(f"object {key}: {why}")
    return report
