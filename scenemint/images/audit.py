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
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


async def audit_images(store: Store, images: ImageStore) -> ImageAudit:
    """Every live image of the ledger has its object (of the recorded size), and every
    object belongs to a task of the ledger (live, or expired and waiting for the sweep)."""
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
    for key in sorted(stored - set(known)):
        report.violations.append(f"object {key}: belongs to no task")
    for key in sorted(key for key in stored if known.get(key, ("",))[0] == "purged"):
        report.violations.append(f"object {key}: its tasks' images were purged, it was not")
    return report
