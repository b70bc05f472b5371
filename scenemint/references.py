"""Reference images of edit tasks, kept on disk until their task no longer needs them.

A reference is written before its credit is taken (so that a crash after the charge can be
followed by a resubmission with the same image) and removed by the settlement that ends
its task. Writes are atomic (temporary name, fsync, rename): a crash or a full disk never
leaves a half-written file under a task's name.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from pathlib import Path


class References:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path_for(self, task_id: str) -> Path:
        return self.directory / f"{task_id}.bin"

    async def save(self, task_id: str, data: bytes) -> Path:
        path = self.path_for(task_id)
        await asyncio.to_thread(write_atomically, path, data)
        return path

    async def load(self, path: str | None) -> bytes | None:
        """The bytes, or None when there is no file (any more)."""
        if not path:
            return None
        return await asyncio.to_thread(_read_or_none, Path(path))

    async def probe(self) -> None:
        """Raise OSError unless a file can be written (and removed) in the directory."""
        probe = self.directory / ".probe"
        await asyncio.to_thread(write_atomically, probe, b"ok")
        await asyncio.to_thread(probe.unlink, missing_ok=True)

    async def drop(self, path: str | Path | None) -> None:
        """Remove a reference file; raises OSError when it cannot (the caller retries later)."""
        if path:
            await asyncio.to_thread(Path(path).unlink, missing_ok=True)


def write_atomically(path: Path, data: bytes) -> None:
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


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
