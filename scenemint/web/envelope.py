"""The envelope every JSON answer wears, and the one place errors become envelopes."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from ..errors import ScenemintError
from ..messages import message_for, prefers_chinese

log = logging.getLogger("scenemint.web")

_JSON = "application/json"


def ok_body(data: Any) -> bytes:
    return json.dumps({"code": 0, "message": "ok", "data": data}, ensure_ascii=False).encode()


def ok(data: Any) -> Response:
    return Response(ok_body(data), media_type=_JSON)


def failure_body(code: str, *, accept_language: str | None = None) -> bytes:
    message = message_for(code, chinese=prefers_chinese(accept_language))
    body = {"code": -1, "message": message, "error": code}
    return json.dumps(body, ensure_ascii=False).encode()


def error_parts(
    exc: BaseException, accept_language: str | None
) -> tuple[int, bytes, dict[str, str] | None]:
    """Map any exception to (status, envelope, headers): ours by code and status, else 500."""
    headers: dict[str, str] | None = None
    if isinstance(exc, ScenemintError):
        if exc.status >= 500:
            log.warning("answering %s %s: %s", exc.status, exc.code, exc.detail or "-")
        code, status = exc.code, exc.status
    elif isinstance(exc, RequestValidationError):
        code, status = "bad_request", 400
    elif isinstance(exc, StarletteHTTPException):
        status = exc.status_code
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
            status, "bad_request"
        )
        headers = dict(exc.headers) if exc.headers else None
    else:
        log.exception("unexpected error", exc_info=exc)
        code, status = "internal_error", 500
    return status, failure_body(code, accept_language=accept_language), headers


def error_response(exc: BaseException, accept_language: str | None) -> Response:
    status, body, headers = error_parts(exc, accept_language)
    return Response(body, status_code=status, media_type=_JSON, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    async def handle(request: Request, exc: Exception) -> Response:
        return error_response(exc, request.headers.get("accept-language"))

    for kind in (ScenemintError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(kind, handle)
