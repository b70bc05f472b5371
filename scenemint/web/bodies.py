"""Reading request bodies without trusting them: size caps by Content-Length before reading
and by counting while reading (a length may be absent or lie), and strict parsing."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from ..errors import BadRequest, PayloadTooLarge
from ..validation import Reference, check_reference

_FORM_OVERHEAD = 64 * 1024  # room for the text fields and multipart headers around the image
_MAX_FIELDS = 8
_MAX_FIELD_BYTES = 32 * 1024
MAX_JSON_DEPTH = 32  # our bodies are flat objects; anything this deep is not for us


@dataclass(frozen=True, slots=True)
class GenerateInput:
    prompt: Any
    size: Any
    fingerprint: Any
    reference: Reference | None


def _declared_length(request: Request, limit: int, code: str, announced: int) -> None:
    raw = request.headers.get("content-length")
    if raw is None:
        return
    try:
        length = int(raw)
    except ValueError as exc:
        raise BadRequest("bad_request", detail="invalid Content-Length") from exc
    if length > limit:
        raise PayloadTooLarge(code, detail=f"Content-Length {length} > {limit}", limit=announced)


async def _counted(
    request: Request, limit: int, code: str, announced: int
) -> AsyncGenerator[bytes, None]:
    """The body's chunks; PayloadTooLarge (saying `announced`) once past `limit` bytes."""
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise PayloadTooLarge(code, detail=f"body over {limit} bytes", limit=announced)
            yield chunk
    except ClientDisconnect as exc:
        raise BadRequest("bad_request", detail="client went away mid-body") from exc


async def read_json(request: Request, *, limit: int) -> dict[str, Any]:
    _declared_length(request, limit, "payload_too_large", limit)
    chunks = _counted(request, limit, "payload_too_large", limit)
    body = b"".join([chunk async for chunk in chunks])
    try:
        data = json.loads(body)
    except RecursionError as exc:
        raise BadRequest("json_too_deep") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest("invalid_json") from exc
    if not isinstance(data, dict):
        raise BadRequest("invalid_json", detail="body is not a JSON object")
    if _depth(data) > MAX_JSON_DEPTH:
        raise BadRequest("json_too_deep", detail=f"nested deeper than {MAX_JSON_DEPTH}")
    return data


def _depth(value: Any) -> int:
    """How deeply `value` nests lists and objects (iteratively: no recursion to exhaust)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_JSON_DEPTH:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_generate(request: Request, *, json_limit: int, image_limit: int) -> GenerateInput:
    """The generate body: JSON, or multipart with an optional `image` file part."""
    kind = media_type(request)
    if kind == "multipart/form-data":
        return await _read_generate_form(request, image_limit=image_limit)
    if kind in ("application/json", "") or kind.endswith("+json"):
        data = await read_json(request, limit=json_limit)
        return GenerateInput(data.get("prompt"), data.get("size"), data.get("fingerprint"), None)
    raise BadRequest("unsupported_media_type", detail=f"content type {kind!r}")


class _ClosingDelimiter:
    """Watches a multipart body go by for its closing delimiter (`--boundary--`).

    The parser accepts a body that just stops; a body without its closing delimiter was cut
    short (a truncated part), and must not be charged as something it is not.
    """

    def __init__(self, boundary: bytes) -> None:
        self._delimiter = b"--" + boundary + b"--"
        self._tail = b"\r\n"  # the delimiter may open the body
        self.found = False

    async def watch(self, chunks: AsyncGenerator[bytes, None]) -> AsyncGenerator[bytes, None]:
        async for chunk in chunks:
            if not self.found:
                window = self._tail + chunk
                self.found = b"\r\n" + self._delimiter in window
                self._tail = window[-(len(self._delimiter) + 1) :]
            yield chunk
        if not self.found:
            # raised inside the parser's read loop: it closes the files of every part
            raise BadRequest("invalid_form", detail="multipart body without its closing boundary")


def _boundary(request: Request) -> bytes:
    _, _, params = request.headers.get("content-type", "").partition(";")
    for param in params.split(";"):
        name, _, value = param.strip().partition("=")
        if name.strip().lower() == "boundary" and value.strip().strip('"'):
            return value.strip().strip('"').encode("latin-1")
    raise BadRequest("invalid_form", detail="multipart without a boundary")


async def _read_generate_form(request: Request, *, image_limit: int) -> GenerateInput:
    limit = image_limit + _FORM_OVERHEAD
    # the form's own bytes are allowed on top; the limit said is the image's
    _declared_length(request, limit, "image_too_large", image_limit)
    closing = _ClosingDelimiter(_boundary(request))
    parser = MultiPartParser(
        request.headers,
        closing.watch(_counted(request, limit, "image_too_large", image_limit)),
        max_files=1,
        max_fields=_MAX_FIELDS,
        max_part_size=_MAX_FIELD_BYTES,
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        code = "too_many_files" if "files" in str(exc).lower() else "invalid_form"
        raise BadRequest(code, detail=str(exc)) from exc
    try:
        fields: dict[str, str] = {}
        upload: UploadFile | None = None
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if name != "image":
                    raise BadRequest("invalid_form", detail=f"unexpected file field {name!r}")
                upload = value
            elif name in fields:
                raise BadRequest("invalid_form", detail=f"field {name!r} given twice")
            else:
                fields[name] = value
        reference = None
        if upload is not None:
            data = await upload.read(image_limit + 1)
            reference = check_reference(
                data,
                filename=upload.filename,
                content_type=upload.content_type,
                max_bytes=image_limit,
            )
        return GenerateInput(
            fields.get("prompt"), fields.get("size"), fields.get("fingerprint"), reference
        )
    finally:
        await form.close()
