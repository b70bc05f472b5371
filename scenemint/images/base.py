"""What the service needs from an image store: put an object once, read it (or part of it),
delete it, list what is there. An object is named by the SHA-256 of its bytes and the task
it belongs to (`key_for`), so a put is idempotent and an object never changes: anything
cached about it holds for ever. Each task has an object of its own, even when two tasks
got the same bytes: the retention sweep deletes an expired task's object knowing that no
other task can ever come to use it (a shared object could be deleted under a task that
stored the same bytes between the sweep's look at the ledger and its delete).

Two implementations: `files.FileImageStore` (a directory; the default) and `s3.S3ImageStore`
(S3-compatible object storage, for several instances). Each translates its library's
exceptions into `ImageStoreUnavailable` (503) or, for an object that is not there, a
`None`/`FileNotFoundError`-free answer.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

CHUNK = 256 * 1024  # bytes per read when streaming an object out


_HEX = frozenset("0123456789abcdef")
_TASK_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def key_for(data: bytes, task_id: str) -> str:
    """The object key of task `task_id`'s image `data`: the SHA-256 of the bytes (fanned out
    by its first two hex digits), then the task id."""
    digest = hashlib.sha256(data).hexdigest()
    return f"{digest[:2]}/{digest}-{task_id}"


def digest_of(key: str) -> str:
    """The SHA-256 (hex) of the bytes stored under `key`: the image's strong ETag."""
    return key.partition("/")[2][:64]


def is_key(value: str) -> bool:
    """A key of `key_for`, or of the first image store (the digest alone, shared by the tasks
    that got the same bytes; still read, never written)."""
    head, _, name = value.partition("/")
    digest, task_id = name[:64], name[64:]
    if len(digest) != 64 or head != digest[:2] or not _HEX.issuperset(digest):
        return False
    return not task_id or (task_id[0] == "-" and _TASK_ID.fullmatch(task_id[1:]) is not None)


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int
    modified: float  # seconds since the epoch


@dataclass(frozen=True, slots=True)
class ObjectBody:
    """An open read of an object, or of the bytes `start`..`end` (end exclusive) of it."""

    size: int  # of the whole object
    start: int
    end: int
    chunks: AsyncIterator[bytes]

    @property
    def length(self) -> int:
        return self.end - self.start


class ImageStore(Protocol):
    """Where finished images live. Keys come from `key_for`."""

    kind: str  # "file" or "s3", for logs and metrics

    async def put(self, key: str, data: bytes, *, content_type: str) -> None:
        """Store `data` under `key` atomically: readers see all of it or nothing."""
        ...

    async def head(self, key: str) -> ObjectInfo | None: ...

    async def read(
        self, key: str, *, start: int = 0, end: int | None = None, size: int | None = None
    ) -> ObjectBody | None:
        """Open the object (or a range of it); None when it is not there. With `size` (the
        ledger knows it) the store does not ask for it: a missing object then fails the
        read itself (ImageStoreUnavailable)."""
        ...

    def local_path(self, key: str) -> Path | None:
        """The file of the object when the store is a local directory (else None)."""
        ...

    async def presigned_url(self, key: str, *, expires_in: float) -> str | None:
        """A short-lived URL that reads the object directly (None: not supported)."""
        ...

    async def delete(self, key: str) -> None:
        """Remove the object; removing one that is not there is no error."""
        ...

    def list_keys(self) -> AsyncIterator[str]:
        """Every key in the store (for the audit)."""
        ...

    async def probe(self) -> None:
        """Raise ImageStoreUnavailable unless the store accepts a write (readiness)."""
        ...

    async def close(self) -> None: ...
