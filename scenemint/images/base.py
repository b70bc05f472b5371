"""What the service needs from an image store: put an object once, read it (or part of it),
delete it, list what is there. Objects are named by the SHA-256 of their bytes, so a put is
idempotent and an object never changes: anything cached about it holds for ever.

Two implementations: `files.FileImageStore` (a directory; the default) and `s3.S3ImageStore`
(S3-compatible object storage, for several instances). Each translates its library's
exceptions into `ImageStoreUnavailable` (503) or, for an object that is not there, a
`None`/`FileNotFoundError`-free answer.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

CHUNK = 256 * 1024  # bytes per read when streaming an object out


def key_for(data: bytes) -> str:
    """The object key of `data`: its SHA-256, fanned out by its first two hex digits."""
    digest = hashlib.sha256(data).hexdigest()
    return f"{digest[:2]}/{digest}"


def is_key(value: str) -> bool:
    head, _, digest = value.partition("/")
    return len(digest) == 64 and head == digest[:2] and all(c in "0123456789abcdef" for c in digest)


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
