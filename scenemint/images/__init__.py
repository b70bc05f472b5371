"""The image store: where finished images live once the upstream has made them.

base.py     the interface, content-hash keys
verify.py   is it an image we serve (Pillow, with its decompression-bomb limit)
files.py    a local directory (the default)
s3.py       S3-compatible object storage (obstore)
"""

from __future__ import annotations

from pathlib import Path

from .base import ImageStore, ObjectBody, ObjectInfo, digest_of, is_key, key_for
from .files import FileImageStore
from .verify import ImageInfo, NotAnImage, verify_image

__all__ = [
    "FileImageStore",
    "ImageInfo",
    "ImageStore",
    "NotAnImage",
    "ObjectBody",
    "ObjectInfo",
    "digest_of",
    "is_key",
    "key_for",
    "open_image_store",
    "verify_image",
]


def open_image_store(url: str, *, data_dir: Path, timeout: float = 60.0) -> ImageStore:
    """`file:///path`, `s3://bucket/prefix`, or (empty) `<data dir>/images`."""
    if not url:
        return FileImageStore(data_dir / "images")
    if url.startswith("file://"):
        return FileImageStore(Path(url[len("file://") :]))
    if url.startswith("s3://"):
        from .s3 import S3ImageStore

        return S3ImageStore(url, timeout=timeout)
    raise ValueError("SCENEMINT_IMAGE_STORE must be file:///path or s3://bucket/prefix")
