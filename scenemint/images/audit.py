"""The image store against the ledger: `scenemint audit images`, and the leftovers the
retention sweeper removes on its own.

A copy stores the object first and writes the ledger after: a process killed (or a database
that fails) between the two leaves an object that belongs to no task. That is expected after
a fault and harms nobody; the sweeper removes such objects once they are `ORPHAN_GRACE` old
(a copy in flight writes its ledger row within its lease, far sooner). The audit tells them
apart from what is really wrong — a live task whose image is missing or has another size, an
object whose images the ledger says were purged — and only the latter fail it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..store import Store
from .base import ImageStore

#: objects of no task at least this old are removed by the sweeper (seconds)
ORPHAN_GRACE = 3600.0


@dataclass(slots=True)
class ImageAudit:
    live: int = 0  # distinct images of unexpired completed tasks
    expired: int = 0  # expired, not yet removed by the sweep
    objects: int = 0  # objects in the store
    legacy: int = 0  # completed before the image store: copied on their first request
    orphans: int = 0  # objects of no task still there: expected leftovers of a fault
    overdue: int = 0  # of those, older than the grace (the sweeper has not run since)
    deleted: int = 0  # objects of no task deleted (`delete_orphans_before`)
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


async def orphans(store: Store, images: ImageStore) -> list[str]:
    """Keys of the objects that belong to no task of the ledger."""
    known = await store.image_keys()
    return sorted([key async for key in images.list_keys() if key not in known])


async def remove_orphan(store: Store, images: ImageStore, key: str, *, before: float) -> bool:
    """Delete an object of no task last written before `before`; False when it is younger,
    gone already, or a task claimed it meanwhile (the ledger is asked again last)."""
    info = await images.head(key)
    if info is None or info.modified >= before:
        return False
    if key in await store.image_keys():
        return False
    await images.delete(key)
    return True


async def audit_images(
    store: Store, images: ImageStore, *, delete_orphans_before: float | None = None
) -> ImageAudit:
    """Every live image of the ledger has its object (of the recorded size), and no object's
    images were purged behind its back. Objects of no task are counted, not violations:
    with `delete_orphans_before` (seconds since the epoch) those last written before then
    are deleted."""
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
        elif status == "purged" and key in stored:
            report.violations.append(f"object {key}: its tasks' images were purged, it was not")
    overdue_before = time.time() - ORPHAN_GRACE
    for key in sorted(stored - set(known)):
        if delete_orphans_before is not None and await remove_orphan(
            store, images, key, before=delete_orphans_before
        ):
            report.deleted += 1
            continue
        info = await images.head(key)
        if info is None:
            continue  # gone meanwhile
        report.orphans += 1
        if info.modified < overdue_before:
            report.overdue += 1
    return report
