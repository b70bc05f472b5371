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


def ok(data: Any) -> Response:
    body = {"code": 0, "message": "ok", "data": data}
    return Response(json.dumps(body, ensure_ascii=False).encode(), media_type=_JSON)


def failure(
    code: str,
    status: int,
    *,
    accept_language: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    message = message_for(code, chinese=prefers_chinese(accept_language))
    body = {"code": -1, "message": message, "error": code}
    return Response(
        json.dumps(body, ensure_ascii=False).encode(),
        status_code=status,
        media_type=_JSON,
        headers=headers,
    )


def error_response(exc: BaseException, accept_language: str | None) -> Response:
    """Map any exception to its envelope: ours by code and status, anything else as 500."""
    if isinstance(exc, ScenemintError):
        if exc.status >= 500:
            log.warning("answering %s %s: %s", exc.status, exc.code, exc.detail or "-")
        return failure(exc.code, exc.status, accept_language=accept_language)
    if isinstance(exc, RequestValidationError):
        return failure("bad_request", 400, accept_language=accept_language)
    if isinstance(exc, StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
            exc.status_code, "bad_request"
        )
        return failure(
            code,
            exc.status_code,
            accept_language=accept_language,
            headers=dict(exc.headers) if exc.headers else None,
        )
    log.exception("unexpected error", exc_info=exc)
    return failure("internal_error", 500, accept_language=accept_language)


def install_error_handlers(app: FastAPI) -> None:
    async def handle(request: Request, exc: Exception) -> Response:
        return error_response(exc, request.headers.get("accept-language"))

    for kind in (ScenemintError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(kind, handle)
