"""The public routes. Each binds the request, calls the service, and wraps the answer."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.background import BackgroundTask
from starlette.responses import Response

from ..errors import ImageMissing
from ..messages import prefers_chinese
from ..service import ImageService
from ..validation import clean_fingerprint
from .bodies import read_generate, read_json
from .envelope import ok, ok_body_encoded
from .images import serve_image
from .streaming import ClosingStreamResponse, unless_client_leaves


async def get_service(request: Request) -> ImageService:
    # async: FastAPI runs a plain `def` dependency in its thread pool, a hop per request
    service: ImageService = request.app.state.service
    return service


ServiceDep = Annotated[ImageService, Depends(get_service)]
router = APIRouter()


def _json_body(schema: dict[str, Any], *, multipart: bool = False) -> dict[str, Any]:
    """OpenAPI description of a body we read ourselves (to keep our own limits and errors)."""
    content: dict[str, Any] = {"application/json": {"schema": schema}}
    if multipart:
        form = {
            **schema,
            "properties": {**schema["properties"], "image": {"type": "string", "format": "binary"}},
        }
        content["multipart/form-data"] = {"schema": form}
    return {"requestBody": {"required": True, "content": content}}


_STRING = {"type": "string"}
_GENERATE = {
    "type": "object",
    "required": ["prompt", "fingerprint"],
    "properties": {
        "prompt": _STRING,
        "size": {"type": "string", "enum": ["1:1", "16:9", "9:16"]},
        "fingerprint": _STRING,
    },
}
_FINGERPRINT = {
    "type": "object",
    "required": ["fingerprint"],
    "properties": {"fingerprint": _STRING},
}
_ENHANCE = {
    "type": "object",
    "required": ["prompt", "direction"],
    "properties": {
        "prompt": _STRING,
        "direction": {"type": "string", "enum": ["details", "creative"]},
    },
}


_IDEMPOTENCY_HEADER = {
    "parameters": [
        {
            "name": "Idempotency-Key",
            "in": "header",
            "required": False,
            "description": "Any string of 1 to 255 printable ASCII characters. The same key"
            " with the same body returns the same task without a second charge.",
            "schema": {"type": "string", "minLength": 1, "maxLength": 255},
        }
    ]
}


@router.post(
    "/api/images/generate",
    openapi_extra={**_json_body(_GENERATE, multipart=True), **_IDEMPOTENCY_HEADER},
)
async def generate(request: Request, service: ServiceDep) -> Response:
    """Charge one credit and submit a generation (JSON) or an edit (multipart with `image`)."""
    body = await read_generate(
        request,
        json_limit=service.settings.max_json_bytes,
        image_limit=service.settings.max_reference_bytes,
    )
    delivery = await service.generate_answer(
        prompt=body.prompt,
        size=body.size,
        fingerprint=body.fingerprint,
        reference=body.reference,
        idempotency_key=request.headers.get("idempotency-key"),
    )
    if await request.is_disconnected():  # nobody to give the task to: refunded
        await delivery.undelivered()
        return Response(status_code=499)
    # the task is the client's once its answer has been sent, not before (a crash in
    # between refunds it): the delivery is recorded after the body went out
    answer = ok(delivery.task.to_json(chinese=_chinese(request)))
    answer.background = BackgroundTask(delivery.delivered)
    return answer


@router.get("/api/images/tasks/{task_id}")
async def get_task(task_id: str, request: Request, service: ServiceDep) -> Response:
    """The task's current state; the "missing" shape for unknown ids."""
    data = await service.task_answer(task_id, chinese=_chinese(request))
    return Response(ok_body_encoded(data), media_type="application/json")


def _chinese(request: Request) -> bool:
    return prefers_chinese(request.headers.get("accept-language"))


# two routes, not one with methods=["GET", "HEAD"]: that one gives both operations the same
# OpenAPI operationId (an invalid schema, and a warning each time it is built)
@router.get("/api/images/tasks/{task_id}/image")
@router.head("/api/images/tasks/{task_id}/image", operation_id="head_task_image")
async def get_image(task_id: str, request: Request, service: ServiceDep) -> Response:
    """The finished image, from our image store. Immutable: cacheable for ever; single
    ranges, conditional requests, and (SCENEMINT_IMAGE_REDIRECT=presigned) redirects."""
    image = await service.image(task_id)
    try:
        return await serve_image(request, image, service.settings)
    except ImageMissing as missing:
        raise await service.image_missing(missing) from None


@router.post("/api/prompts/enhance", openapi_extra=_json_body(_ENHANCE))
async def enhance(request: Request, service: ServiceDep) -> Response:
    """Stream a rewrite of the prompt as OpenAI chat.completion.chunk SSE frames."""
    data = await read_json(request, limit=service.settings.max_json_bytes)
    opening = service.enhance(
        prompt=data.get("prompt"), direction=data.get("direction"), chinese=_chinese(request)
    )
    stream = await unless_client_leaves(request, opening)
    if stream is None:  # gone before the upstream answered: its request is already cancelled
        return Response(status_code=499)
    return ClosingStreamResponse(
        aiter(stream),
        close=stream.aclose,
        gauge=service.metrics.open_streams.labels("enhance"),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


@router.post("/api/quota/status", openapi_extra=_json_body(_FINGERPRINT))
async def quota_status(request: Request, service: ServiceDep) -> Response:
    """Balance, whether today's grant was taken, the cap and the daily grant."""
    data = await read_json(request, limit=service.settings.max_json_bytes)
    status = await service.store.status(clean_fingerprint(data.get("fingerprint")))
    return ok(status.to_json())


@router.post("/api/quota/check-in", openapi_extra=_json_body(_FINGERPRINT))
async def quota_check_in(request: Request, service: ServiceDep) -> Response:
    """Take today's grant (once per calendar day, up to the cap)."""
    data = await read_json(request, limit=service.settings.max_json_bytes)
    status = await service.store.check_in(clean_fingerprint(data.get("fingerprint")))
    return ok(status.to_json())


@router.get("/healthz", include_in_schema=False)
async def healthz() -> Response:
    return ok({"status": "alive"})


@router.get("/readyz", include_in_schema=False)
async def readyz(service: ServiceDep) -> Response:
    """Ready when the database and the data directory accept a write and the upstream answers
    a task listing with our key; the body says whether chat (enhancement) is available."""
    return ok(await service.ready())


@router.get("/metrics", include_in_schema=False)
async def metrics(service: ServiceDep) -> Response:
    return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)
