"""The OpenAPI document: every public route with the answers it really gives.

FastAPI describes the routes it routes (generate, enhancement, quota) from their
signatures, which say little: a 200 of any shape and a 422 that never happens (bodies are
read by `bodies.py`, and bad ones get 400 envelopes). The task routes are answered below
the framework (`fastpath.py`) and FastAPI does not see them at all. This module writes the
truth over that: the task routes' path items, and for every operation its success answer
and each failure status with the envelope and the `error` codes it can carry. The tests
check the document against real answers (tests/test_fuzz.py, schemathesis' response
checks), so a code added to a route without being added here fails them.
"""

from __future__ import annotations

from typing import Any

from ..models import SIZES

_ENVELOPE_OK = {"type": "integer", "enum": [0]}
_ENVELOPE_FAILED = {"type": "integer", "enum": [-1]}

SCHEMAS: dict[str, Any] = {
    "Task": {
        "type": "object",
        "description": "A generation task. An id this service did not make answers the"
        ' "missing" shape: `{"id", "mode": "text", "status": "failed", "error"}`, so that'
        " pollers stop.",
        "required": ["id", "mode", "status"],
        "properties": {
            "id": {"type": "string", "description": "A UUID v4 made by this service."},
            "mode": {"type": "string", "enum": ["text", "image"]},
            "prompt": {"type": "string", "description": "The trimmed prompt (generate only)."},
            "size": {"type": "string", "enum": list(SIZES)},
            "status": {"type": "string", "enum": ["queued", "running", "completed", "failed"]},
            "image": {
                "type": "string",
                "description": "Where the finished image is (this service's image route).",
            },
            "error": {
                "type": "string",
                "description": "Why it failed, in the reader's language; the credit was returned.",
            },
            "queuePosition": {
                "type": "integer",
                "minimum": 1,
                "description": "A queued job of an OpenAI-compatible upstream: its place in"
                " its queue (1 = next).",
            },
            "revisedPrompt": {"type": "string"},
            "createdAt": {"type": "string", "format": "date-time"},
            "updatedAt": {"type": "string", "format": "date-time"},
            "remainingCredits": {
                "type": "integer",
                "description": "The balance after the charge (generate only).",
            },
        },
    },
    "Quota": {
        "type": "object",
        "required": ["balance", "signedToday", "cap", "dailyGrant"],
        "properties": {
            "balance": {"type": "integer"},
            "signedToday": {"type": "boolean"},
            "cap": {"type": "integer"},
            "dailyGrant": {"type": "integer"},
        },
    },
    "TaskAnswer": {
        "type": "object",
        "required": ["code", "message", "data"],
        "properties": {
            "code": _ENVELOPE_OK,
            "message": {"type": "string"},
            "data": {"$ref": "#/components/schemas/Task"},
        },
    },
    "QuotaAnswer": {
        "type": "object",
        "required": ["code", "message", "data"],
        "properties": {
            "code": _ENVELOPE_OK,
            "message": {"type": "string"},
            "data": {"$ref": "#/components/schemas/Quota"},
        },
    },
}

_STRING = {"type": "string"}
_SIZE = {
    "type": "string",
    "default": "1:1",
    "examples": list(SIZES),
    "description": "`1:1`, `16:9` or `9:16`; anything else (or nothing) becomes `1:1`.",
}
_FINGERPRINT = {
    "type": "string",
    "description": "8 to 256 characters of `A-Z a-z 0-9 _ -` (trimmed): the anonymous"
    " user's browser fingerprint, whose credits are spent.",
}
_GENERATE_FIELDS: dict[str, Any] = {
    "prompt": {
        "type": "string",
        "description": "Trimmed; not empty, at most SCENEMINT_MAX_PROMPT_CHARS (4000).",
    },
    "size": _SIZE,
    "fingerprint": _FINGERPRINT,
}
_GENERATE_BODY = {
    "type": "object",
    "required": ["prompt", "fingerprint"],
    "properties": _GENERATE_FIELDS,
}
_GENERATE_FORM = {
    **_GENERATE_BODY,
    "properties": {
        **_GENERATE_FIELDS,
        "image": {
            "type": "string",
            "format": "binary",
            "description": "A reference image (an edit): declared `image/*`, really PNG,"
            " JPEG, WebP or GIF, at most SCENEMINT_MAX_REFERENCE_BYTES (10 MiB).",
        },
    },
}
_FINGERPRINT_BODY = {
    "type": "object",
    "required": ["fingerprint"],
    "properties": {"fingerprint": _FINGERPRINT},
}
_ENHANCE_BODY = {
    "type": "object",
    "required": ["prompt", "direction"],
    "properties": {
        "prompt": _STRING,
        "direction": {"type": "string", "enum": ["details", "creative"]},
    },
}

# every route: refused by the connection layer before it is routed (web/server.py)
_SERVER = {
    "408": ("The request head or body did not arrive in time.", ["request_timeout"]),
    "414": ("The request line is over 8 KiB.", ["path_too_long"]),
    "431": ("The request head is over 64 KiB.", ["headers_too_large"]),
}
_INTERNAL = {"500": ("A bug: the log has its request id.", ["internal_error"])}
_JSON_BODY_400 = ["bad_request", "invalid_json", "json_too_deep", "unsupported_media_type"]
_STORE = ["store_unavailable"]
_UPSTREAM = {
    "502": ("The upstream failed.", ["upstream_failed"]),
    "503": (
        "No upstream can take it now (breakers open, not configured), or the database is"
        " unavailable. `Retry-After` when a wait helps.",
        ["upstream_unavailable", "upstream_not_configured", *_STORE],
    ),
    "504": ("The upstream did not answer in time.", ["upstream_timeout"]),
}

_SSE_EVENT = {
    "type": "object",
    "description": "One server-sent event.",
    "required": ["data"],
    "properties": {
        "data": {"type": "string"},
        "id": {"type": "string"},
        "event": {"type": "string"},
    },
}
_SSE = {"text/event-stream": {"schema": _SSE_EVENT}}
_IMAGE = {"image/*": {"schema": {"type": "string", "format": "binary"}}}

_TASK_ID = {
    "name": "task_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "A task id from generate. Any other id answers the missing shape.",
}
_IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "Any string of 1 to 255 printable ASCII characters. The same key with the"
    " same body returns the same task without a second charge; a retry while the first is"
    " still being worked on answers 409 `idempotency_in_progress` with `Retry-After`.",
    "schema": {"type": "string", "minLength": 1, "maxLength": 255},
}


def _failure(description: str, codes: list[str]) -> dict[str, Any]:
    return {
        "description": description,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["code", "message", "error"],
                    "properties": {
                        "code": _ENVELOPE_FAILED,
                        "message": {
                            "type": "string",
                            "description": "For people: English, or Simplified Chinese when"
                            " Accept-Language prefers zh.",
                        },
                        "error": {"type": "string", "enum": sorted(codes)},
                        "retryAfter": {
                            "type": "integer",
                            "description": "Seconds to wait before trying again (also the"
                            " Retry-After header).",
                        },
                        "limit": {
                            "type": "integer",
                            "description": "413: the limit in bytes (the message says it too).",
                        },
                    },
                }
            }
        },
    }


def _answers(success: dict[str, Any], failures: dict[str, tuple[str, list[str]]]) -> dict[str, Any]:
    out = dict(success)
    for status, (description, codes) in {**failures, **_SERVER, **_INTERNAL}.items():
        out[status] = _failure(description, codes)
    return out


def _json(schema: str, description: str) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{schema}"}
    return {"description": description, "content": {"application/json": {"schema": ref}}}


def _body(schema: dict[str, Any], form: dict[str, Any] | None = None) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": schema}}
    if form is not None:
        content["multipart/form-data"] = {"schema": form}
    return {"required": True, "content": content}


_IMAGE_DESCRIPTION = (
    "The finished image from this service's image store: a strong ETag (the SHA-256 of"
    " the bytes), Last-Modified, Accept-Ranges, immutable caching. `If-None-Match` or"
    " `If-Modified-Since` answer 304; one `Range` (GET only) 206, outside the image 416."
)

OPERATIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("/api/images/generate", "post"): {
        "summary": "Charge one credit and start a generation (or an edit)",
        "description": "JSON, or multipart with the same fields and an `image` file (an"
        " edit). Answers the new task with `prompt` and `remainingCredits`; poll it, or follow"
        " its events. A refused request changes nothing.",
        "parameters": [_IDEMPOTENCY_KEY],
        "requestBody": _body(_GENERATE_BODY, _GENERATE_FORM),
        "responses": _answers(
            {"200": _json("TaskAnswer", "The task, charged and sent (or queued).")},
            {
                "400": (
                    "Bad input: nothing was charged.",
                    [
                        *_JSON_BODY_400,
                        "invalid_form",
                        "empty_prompt",
                        "prompt_too_long",
                        "invalid_fingerprint",
                        "invalid_text",
                        "empty_image",
                        "invalid_image",
                        "too_many_files",
                        "invalid_idempotency_key",
                        "store_rejected",
                    ],
                ),
                "402": ("No credits left: check in tomorrow.", ["no_credits"]),
                "409": (
                    "The Idempotency-Key belongs to another request, or its first request"
                    " is still being worked on (retry after `Retry-After`).",
                    ["idempotency_key_reused", "idempotency_in_progress"],
                ),
                "413": (
                    "The body (SCENEMINT_MAX_JSON_BYTES) or the image"
                    " (SCENEMINT_MAX_REFERENCE_BYTES) is too large; the message says the limit.",
                    ["payload_too_large", "image_too_large"],
                ),
                **_UPSTREAM,
            },
        ),
    },
    ("/api/images/tasks/{task_id}", "get"): {
        "summary": "A task's current state",
        "description": "Asks the task's upstream at most once per SCENEMINT_POLL_MIN_INTERVAL"
        " however many poll it.",
        "parameters": [_TASK_ID],
        "responses": _answers(
            {"200": _json("TaskAnswer", "The task, or the missing shape for an unknown id.")},
            {
                **_UPSTREAM,
                "503": (
                    "The task's upstream or the database is unavailable.",
                    ["upstream_unavailable", "upstream_not_configured", *_STORE],
                ),
            },
        ),
    },
    ("/api/images/tasks/{task_id}/events", "get"): {
        "summary": "A task's answers, pushed as server-sent events",
        "description": "A `text/event-stream`: the task's current answer at once (`data:` the"
        " same JSON as the poll's `data`, `id:` its version), then one event per change; it"
        " ends after `completed` or `failed` (the last event is what a poll then answers)."
        " `: ping` comments every SCENEMINT_STREAM_PING_INTERVAL while nothing changes. An"
        " unknown id sends the missing shape and ends. On shutdown the current answer is sent"
        " once more, then the stream ends: reconnect (the first event is the current state,"
        " nothing is lost). However many watch a task, the upstream is asked about it once a"
        " second.",
        "parameters": [_TASK_ID],
        "responses": _answers({"200": {"description": "The event stream.", "content": _SSE}}, {}),
    },
    ("/api/images/tasks/{task_id}/image", "get"): {
        "summary": "The finished image",
        "description": _IMAGE_DESCRIPTION,
        "parameters": [_TASK_ID],
        "responses": _answers(
            {
                "200": {"description": "The image.", "content": _IMAGE},
                "206": {"description": "The range asked for.", "content": _IMAGE},
                "302": {
                    "description": "SCENEMINT_IMAGE_REDIRECT=presigned: a short-lived URL of"
                    " the object in S3."
                },
                "304": {"description": "Not modified."},
                "416": {"description": "The range is outside the image."},
            },
            {
                "404": ("The task is not completed (or not ours).", ["image_not_ready"]),
                "410": ("The retention rule deleted the image.", ["image_expired"]),
                "503": (
                    "The image store or the database is unavailable.",
                    ["image_store_unavailable", *_STORE],
                ),
            },
        ),
    },
    ("/api/images/tasks/{task_id}/image", "head"): {
        "summary": "The finished image's headers",
        "description": "The headers a GET would answer, without the body; `Range` is"
        " ignored (200).",
        "operationId": "head_task_image",
        "parameters": [_TASK_ID],
        "responses": _answers(
            {
                "200": {"description": "The image's headers."},
                "304": {"description": "Not modified."},
            },
            {
                "404": ("The task is not completed (or not ours).", ["image_not_ready"]),
                "410": ("The retention rule deleted the image.", ["image_expired"]),
                "503": (
                    "The image store or the database is unavailable.",
                    ["image_store_unavailable", *_STORE],
                ),
            },
        ),
    },
    ("/api/prompts/enhance", "post"): {
        "summary": "Stream a rewrite of the prompt",
        "description": "OpenAI `chat.completion.chunk` frames as server-sent events, ending"
        ' with `data: [DONE]`; a stream that fails after it began ends with `data: {"error":'
        ' {"message", "code"}}` and `data: [DONE]`. Costs no credit.',
        "requestBody": _body(_ENHANCE_BODY),
        "responses": _answers(
            {"200": {"description": "The stream.", "content": _SSE}},
            {
                "400": (
                    "Bad input.",
                    [
                        *_JSON_BODY_400,
                        "empty_prompt",
                        "prompt_too_long",
                        "invalid_direction",
                        "invalid_text",
                    ],
                ),
                "413": ("The body is over SCENEMINT_MAX_JSON_BYTES.", ["payload_too_large"]),
                "502": ("The chat model failed.", ["enhance_failed"]),
                "503": (
                    "No chat model is configured or available.",
                    ["enhance_unavailable", "enhance_not_configured"],
                ),
                "504": ("The chat model did not answer in time.", ["enhance_timeout"]),
            },
        ),
    },
    ("/api/quota/status", "post"): {
        "summary": "A fingerprint's credits",
        "requestBody": _body(_FINGERPRINT_BODY),
        "responses": _answers(
            {"200": _json("QuotaAnswer", "Balance, today's grant taken or not, cap, grant.")},
            {
                "400": ("Bad input.", [*_JSON_BODY_400, "invalid_fingerprint", "invalid_text"]),
                "413": ("The body is over SCENEMINT_MAX_JSON_BYTES.", ["payload_too_large"]),
                "503": ("The database is unavailable.", _STORE),
            },
        ),
    },
    ("/api/quota/check-in", "post"): {
        "summary": "Take today's credits",
        "description": "Once per calendar day (SCENEMINT_QUOTA_TIMEZONE): adds the daily"
        " grant up to the cap.",
        "requestBody": _body(_FINGERPRINT_BODY),
        "responses": _answers(
            {"200": _json("QuotaAnswer", "The balance after the check-in.")},
            {
                "400": ("Bad input.", [*_JSON_BODY_400, "invalid_fingerprint", "invalid_text"]),
                "413": ("The body is over SCENEMINT_MAX_JSON_BYTES.", ["payload_too_large"]),
                "503": ("The database is unavailable.", _STORE),
            },
        ),
    },
}


def complete(document: dict[str, Any]) -> dict[str, Any]:
    """FastAPI's document of its own routes, completed: the task routes added, and every
    operation's request and answers as they really are."""
    paths: dict[str, Any] = document.setdefault("paths", {})
    for (path, method), operation in OPERATIONS.items():
        item = paths.setdefault(path, {})
        framework = item.get(method, {})
        item[method] = {
            "summary": operation["summary"],
            "operationId": operation.get("operationId")
            or framework.get("operationId")
            or f"{method}_{path.strip('/').replace('/', '_').replace('{', '').replace('}', '')}",
            **{k: v for k, v in operation.items() if k not in ("summary", "operationId")},
        }
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):  # the 422 that never happens
        schemas.pop(name, None)
    schemas.update(SCHEMAS)
    if not schemas:
        components.pop("schemas")
    return document
