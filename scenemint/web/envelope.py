"""The envelope every JSON answer wears, and the one place errors become envelopes."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from ..errors import ScenemintError
from ..messages import limit_sentence, message_for, prefers_chinese

log = logging.getLogger("scenemint.web")

_JSON = "application/json"
# every envelope describes a moment (a task's state, a balance, an error): no cache, no CDN
# in front of the service, may keep one (a cached `queued` would be polled for ever)
NO_STORE = "no-store"
_NO_STORE_HEADERS = {"Cache-Control": NO_STORE}


_OK_PREFIX = b'{"code": 0, "message": "ok", "data": '


def ok_body(data: Any) -> bytes:
    return json.dumps({"code": 0, "message": "ok", "data": data}, ensure_ascii=False).encode()


def ok_body_encoded(data: bytes) -> bytes:
    """The envelope around `data` that is JSON already (the same bytes `ok_body` makes)."""
    return _OK_PREFIX + data + b"}"


def ok(data: Any) -> Response:
    return Response(ok_body(data), media_type=_JSON, headers=_NO_STORE_HEADERS)


def failure_body(
    code: str,
    *,
    accept_language: str | None = None,
    retry_after: float | None = None,
    limit: int | None = None,
) -> bytes:
    chinese = prefers_chinese(accept_language)
    message = message_for(code, chinese=chinese)
    if limit is not None:
        message += limit_sentence(limit, chinese=chinese)
    body: dict[str, Any] = {"code": -1, "message": message, "error": code}
    if retry_after is not None:
        body["retryAfter"] = _seconds(retry_after)
    if limit is not None:
        body["limit"] = limit
    return json.dumps(body, ensure_ascii=False).encode()


def _seconds(value: float) -> int:
    return max(1, math.ceil(value))


def error_parts(
    exc: BaseException, accept_language: str | None
) -> tuple[int, bytes, dict[str, str]]:
    """Map any exception to (status, envelope, headers): ours by code and status, else 500."""
    headers: dict[str, str] = dict(_NO_STORE_HEADERS)
    retry_after: float | None = None
    limit: int | None = None
    if isinstance(exc, ScenemintError):
        limit = exc.limit
        if exc.status >= 500:
            log.warning("answering %s %s: %s", exc.status, exc.code, exc.detail or "-")
        code, status = exc.code, exc.status
        retry_after = exc.retry_after
        if retry_after is not None:
            headers["Retry-After"] = str(_seconds(retry_after))
    elif isinstance(exc, RequestValidationError):
        code, status = "bad_request", 400
    elif isinstance(exc, StarletteHTTPException):
        status = exc.status_code
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
            status, "bad_request"
        )
        headers.update(exc.headers or {})
    else:
        log.exception("unexpected error", exc_info=exc)
        code, status = "internal_error", 500
    body = failure_body(code, accept_language=accept_language, retry_after=retry_after, limit=limit)
    return status, body, headers


def error_response(exc: BaseException, accept_language: str | None) -> Response:
    status, body, headers = error_parts(exc, accept_language)
    return Response(body, status_code=status, media_type=_JSON, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    async def handle(request: Request, exc: Exception) -> Response:
        return error_response(exc, request.headers.get("accept-language"))

    for kind in (ScenemintError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(kind, handle)
