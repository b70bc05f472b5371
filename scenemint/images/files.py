"""The image store on a local directory (the default: `<data dir>/images`).

An object is written to a temporary name in the same directory, fsynced, then renamed: a
crash or a full disk never leaves a half-written object under a key. Reads stream the file
in chunks from a thread, never the whole file into memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

from ..errors import ImageStoreUnavailable
from .base import CHUNK, ObjectBody, ObjectInfo, is_key

log = logging.getLogger("scenemint.images")


class FileImageStore:
    kind = "file"

    def __init__(self, root: Path) -> None:
        self.root = root

    def local_path(self, key: str) -> Path | None:
        if not is_key(key):
            return None
        return self.root / key

    def _path(self, key: str) -> Path:
        path = self.local_path(key)
        if path is None:
            raise ValueError(f"not an image key: {key!r}")
        return path

    async def put(self, key: str, data: bytes, *, content_type: str) -> None:
        path = self._path(key)
        try:
            await asyncio.to_thread(_write_atomically, path, data)
        except OSError as exc:
            raise _unavailable("write", key, exc) from exc

    async def head(self, key: str) -> ObjectInfo | None:
        try:
            stat = await asyncio.to_thread(os.stat, self._path(key))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _unavailable("stat", key, exc) from exc
        return ObjectInfo(key=key, size=stat.st_size, modified=stat.st_mtime)

    async def read(
        self, key: str, *, start: int = 0, end: int | None = None, size: int | None = None
    ) -> ObjectBody | None:
        path = self._path(key)
        info = await self.head(key)  # before any byte is promised: a lost file is a clean error
        if info is None:
            return None
        if size is None:
            size = info.size
        elif info.size != size:
            raise ImageStoreUnavailable(detail=f"image {key} has {info.size} bytes, not {size}")
        stop = size if end is None else min(end, size)
        # the file is opened when the body is first read: a body never read holds nothing
        return ObjectBody(size=size, start=start, end=stop, chunks=_chunks(path, start, stop))

    async def presigned_url(self, key: str, *, expires_in: float) -> str | None:
        return None

    async def delete(self, key: str) -> None:
        try:
            await asyncio.to_thread(self._path(key).unlink, missing_ok=True)
        except OSError as exc:
            raise _unavailable("delete", key, exc) from exc

    async def list_keys(self) -> AsyncIterator[str]:
        try:
            found = await asyncio.to_thread(_list, self.root)
        except OSError as exc:
            raise _unavailable("list", "*", exc) from exc
        for key in found:
            yield key

    async def probe(self) -> None:
        probe = self.root / ".probe"
        try:
            await asyncio.to_thread(_write_atomically, probe, b"ok")
            await asyncio.to_thread(probe.unlink, missing_ok=True)
        except OSError as exc:
            raise _unavailable("probe", ".probe", exc) from exc

    async def close(self) -> None:
        return None


async def _chunks(path: Path, start: int, stop: int) -> AsyncIterator[bytes]:
    """The bytes start..stop of a file, read in a thread chunk by chunk; closed on every path."""
    key = f"{path.parent.name}/{path.name}"
    try:
        fd = await asyncio.to_thread(os.open, path, os.O_RDONLY)
    except OSError as exc:
        raise _unavailable("open", key, exc) from exc
    try:
        offset = start
        while offset < stop:
            try:
                data = await asyncio.to_thread(os.pread, fd, min(CHUNK, stop - offset), offset)
            except OSError as exc:
                raise _unavailable("read", key, exc) from exc
            if not data:
                raise ImageStoreUnavailable(detail=f"image {key} ended early")
            offset += len(data)
            yield data
    finally:
        os.close(fd)


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # the rename itself survives a crash once this is done
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def _list(root: Path) -> list[str]:
    if not root.exists():
        return []
    keys = []
    for child in root.iterdir():
        if not child.is_dir() or len(child.name) != 2:
            continue
        for item in child.iterdir():
            key = f"{child.name}/{item.name}"
            if is_key(key):
                keys.append(key)
    return sorted(keys)


def _unavailable(action: str, key: str, exc: OSError) -> ImageStoreUnavailable:
    reason = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
    log.error("image store (files): cannot %s %s: %s", action, key, exc.strerror or reason)
    return ImageStoreUnavailable(detail=f"files: cannot {action} {key}: {reason}")
