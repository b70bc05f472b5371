"""Input rules: prompts, fingerprints, reference images."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import BadRequest, PayloadTooLarge

_FINGERPRINT = re.compile(r"[A-Za-z0-9_-]{8,256}")
_IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]{1,255}")
_SURROGATE = re.compile("[\ud800-\udfff]")
_MEDIA_TYPE = re.compile(r"image/[a-z0-9.+-]{1,64}")

# magic numbers of the formats the upstream accepts
_SIGNATURES: tuple[tuple[str, bytes], ...] = (
    ("image/png", b"\x89PNG\r\n\x1a\n"),
    ("image/jpeg", b"\xff\xd8\xff"),
    ("image/gif", b"GIF87a"),
    ("image/gif", b"GIF89a"),
)
_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/gif": "gif", "image/webp": "webp"}


def clean_prompt(prompt: object, *, max_chars: int) -> str:
    text = prompt.strip() if isinstance(prompt, str) else ""
    if not text:
        raise BadRequest("empty_prompt")
    if len(text) > max_chars:
        raise BadRequest("prompt_too_long", detail=f"{len(text)} > {max_chars} characters")
    check_text(text)
    return text


def check_text(text: str) -> None:
    """Refuse what no database or encoder downstream may be handed: NUL (PostgreSQL text
    cannot hold it) and unpaired surrogates (not encodable as UTF-8)."""
    if "\x00" in text or _SURROGATE.search(text):
        raise BadRequest("invalid_text", detail="NUL or an unpaired surrogate")


def clean_fingerprint(fingerprint: object) -> str:
    text = fingerprint.strip() if isinstance(fingerprint, str) else ""
    if not _FINGERPRINT.fullmatch(text):
        raise BadRequest("invalid_fingerprint")
    return text


def clean_idempotency_key(key: object) -> str | None:
    """An Idempotency-Key header: None when absent, else 1 to 255 printable ASCII characters.

    Compared as received (HTTP itself drops spaces around a header value).
    """
    if key is None:
        return None
    if not isinstance(key, str) or not _IDEMPOTENCY_KEY.fullmatch(key):
        raise BadRequest("invalid_idempotency_key")
    return key


def sniff_image_type(data: bytes) -> str | None:
    """The image type the bytes really are, or None when they are none of PNG, JPEG, WebP, GIF."""
    for mime, signature in _SIGNATURES:
        if data.startswith(signature):
            return mime
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


@dataclass(frozen=True, slots=True)
class Reference:
    """A validated reference image for an edit task."""

    data: bytes
    filename: str
    content_type: str


def check_reference(
    data: bytes, *, filename: str | None, content_type: str | None, max_bytes: int
) -> Reference:
    if not data:
        raise BadRequest("empty_image")
    if len(data) > max_bytes:
        raise PayloadTooLarge("image_too_large", detail=f"{len(data)} bytes", limit=max_bytes)
    declared = (content_type or "").split(";")[0].strip().lower()
    if not declared.startswith("image/"):
        raise BadRequest("invalid_image", detail=f"declared type {declared!r}")
    sniffed = sniff_image_type(data)
    if sniffed is None:
        raise BadRequest("invalid_image", detail="bytes are not PNG, JPEG, WebP or GIF")
    # the declared type goes upstream (and into the ledger) only when it is a plain token
    content_type = declared if _MEDIA_TYPE.fullmatch(declared) else sniffed
    return Reference(
        data=data, filename=_safe_filename(filename, sniffed), content_type=content_type
    )


def _safe_filename(filename: str | None, mime: str) -> str:
    # The name goes into a multipart header upstream: no quotes, no line breaks, no paths.
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable() and ch not in '"\r\n;').strip()
    return name[:200] or f"reference.{_EXTENSIONS[mime]}"
