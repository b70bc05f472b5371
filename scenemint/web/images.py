"""Serving a stored image: conditional requests, single byte ranges, presigned redirects.

The image of a task never changes (its key is the SHA-256 of its bytes): the answer is
cacheable for ever, with a strong ETag, `Last-Modified`, 304 for `If-None-Match` /
`If-Modified-Since`, 206 for one `Range` (what browsers and CDNs send), 416 for a range
outside the image. Bodies are streamed from the store, never read whole into memory.
"""

from __future__ import annotations

import datetime
import email.utils
import os
from collections.abc import Mapping
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..config import Settings
from ..errors import ImageMissing, ImageStoreUnavailable
from ..service import StoredImage
from .server import ZEROCOPY
from .streaming import ClosingStreamResponse

IMMUTABLE = "public, max-age=31536000, immutable"
_PRESIGNED_SECONDS = 300
_REDIRECT_CACHE = "private, max-age=60"  # well inside the presigned URL's life


async def serve_image(request: Request, image: StoredImage, settings: Settings) -> Response:
    headers = {
        "ETag": image.etag,
        "Last-Modified": email.utils.formatdate(image.stored_at, usegmt=True),
        "Cache-Control": IMMUTABLE,
        "X-Content-Type-Options": "nosniff",
        "Accept-Ranges": "bytes",
    }
    if _not_modified(request.headers, image):
        return Response(status_code=304, headers=headers)
    if settings.image_redirect == "presigned":
        url = await image.store.presigned_url(image.key, expires_in=_PRESIGNED_SECONDS)
        if url is not None:
            return Response(
                status_code=302, headers={"Location": url, "Cache-Control": _REDIRECT_CACHE}
            )
    head_only = request.method == "HEAD"
    # ranges are for GET only (RFC 9110 §14.2): a HEAD answers the whole image's headers
    wanted = None if head_only else _range(request.headers, image)
    if isinstance(wanted, str):  # about this request, not the image: not cacheable for ever
        return Response(
            status_code=416,
            headers={
                "Content-Range": f"bytes */{image.size}",
                "Accept-Ranges": "bytes",
                "Cache-Control": "no-store",
                "X-Content-Type-Options": "nosniff",
            },
        )
    start, end = wanted if wanted is not None else (0, image.size)
    if head_only:  # promise only what a GET would send
        info = await image.store.head(image.key)
        if info is None:
            raise _missing(image)
        if info.size != image.size:
            raise _wrong_size(image, info.size)
        return Response(
            status_code=200,
            headers={**headers, "Content-Length": str(image.size)},
            media_type=image.content_type,
        )
    status = 206 if wanted is not None else 200
    if wanted is not None:
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{image.size}"
    headers["Content-Length"] = str(end - start)
    path = image.store.local_path(image.key)
    if path is not None and ZEROCOPY in request.scope.get("extensions", {}):
        # straight from the page cache to the socket (our server's zero-copy send)
        return FileRangeResponse(image, path, start, end, status_code=status, headers=headers)
    # the ledger knows the size: S3 reads with one GET; the file store checks the size
    # against the file before any byte is promised
    body = await image.store.read(image.key, start=start, end=end, size=image.size)
    if body is None:  # gone from the store although the ledger has it
        raise _missing(image)
    return ClosingStreamResponse(
        body.chunks, status_code=status, headers=headers, media_type=image.content_type
    )


def _missing(image: StoredImage) -> ImageMissing:
    return ImageMissing(image.task_id, detail=f"image {image.key} of {image.task_id} is missing")


def _wrong_size(image: StoredImage, size: int) -> ImageStoreUnavailable:
    # the same check as the file store's read (the audit reports it too)
    return ImageStoreUnavailable(detail=f"image {image.key} has {size} bytes, not {image.size}")


class FileRangeResponse(Response):
    """Bytes start..end of a local file, sent with the server's zero-copy extension."""

    def __init__(
        self,
        image: StoredImage,
        path: Path,
        start: int,
        end: int,
        *,
        status_code: int,
        headers: Mapping[str, str],
    ) -> None:
        self._image, self._path, self._start, self._end = image, path, start, end
        self.status_code = status_code
        self.media_type = image.content_type
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            fd = os.open(self._path, os.O_RDONLY)
        except FileNotFoundError as exc:  # nothing was sent yet
            raise _missing(self._image) from exc
        except OSError as exc:  # unreadable: nothing was sent yet
            raise ImageStoreUnavailable(
                detail=f"image file {self._path.name}: {exc.strerror or exc}"
            ) from exc
        try:
            size = os.fstat(fd).st_size
            if size != self._image.size:  # changed behind our back: say so before any byte
                raise _wrong_size(self._image, size)
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            await send(
                {
                    "type": ZEROCOPY,
                    "file": fd,
                    "offset": self._start,
                    "count": self._end - self._start,
                    "more_body": False,
                }
            )
        finally:
            os.close(fd)


def _not_modified(headers: Mapping[str, str], image: StoredImage) -> bool:
    match = headers.get("if-none-match")
    if match is not None:
        tags = {tag.strip().removeprefix("W/") for tag in match.split(",")}
        return "*" in tags or image.etag in tags
    since = headers.get("if-modified-since")
    if since:
        try:
            moment = email.utils.parsedate_to_datetime(since)
            if moment.tzinfo is None:  # HTTP dates are GMT, whatever the server's zone
                moment = moment.replace(tzinfo=datetime.UTC)
            return int(image.stored_at) <= moment.timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            return False  # not a date we can read: the whole image is a correct answer
    return False


def _range(headers: Mapping[str, str], image: StoredImage) -> tuple[int, int] | str | None:
    """(start, end) of one satisfiable range (end exclusive), "unsatisfiable", or None (the
    whole image: no Range, several ranges, an If-Range that no longer holds, nonsense)."""
    value = headers.get("range")
    if not value or not value.startswith("bytes="):
        return None
    if_range = headers.get("if-range")
    if if_range is not None and if_range.strip() != image.etag:
        return None
    spec = value[len("bytes=") :].strip()
    if "," in spec:
        return None  # several ranges: the whole image is a correct answer
    first, dash, last = spec.partition("-")
    if not dash:
        return None
    size = image.size
    first, last = first.strip(), last.strip()
    if (first and not _digits(first)) or (last and not _digits(last)) or not (first or last):
        return None  # nonsense (signs, underscores, odd digits): ignored, as RFC 9110 allows
    if not first:  # the last N bytes
        suffix = int(last)
        if suffix <= 0:
            return "unsatisfiable"
        return max(0, size - suffix), size
    start = int(first)
    end = int(last) + 1 if last else size
    if start >= size:
        return "unsatisfiable"
    if end <= start:
        return None
    return start, min(end, size)


def _digits(text: str) -> bool:
    """ASCII digits, at most 18 (`int` also takes signs, underscores and other scripts'
    digits, and refuses thousands of digits with an error)."""
    return len(text) <= 18 and text.isascii() and text.isdigit()
