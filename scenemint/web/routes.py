"""The public routes. Each binds the request, calls the service, and wraps the answer.

The task routes (poll, image, events) are answered below the framework (`fastpath.py`);
the OpenAPI document of all of them is `openapi.py`'s.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.background import BackgroundTask
from starlette.responses import Response

from ..messages import prefers_chinese
from ..service import ImageService
from ..validation import clean_fingerprint
from .bodies import read_generate, read_json
from .envelope import ok
from .streaming import ClosingStreamResponse, unless_client_leaves


async def get_service(request: Request) -> ImageService:
    # async: FastAPI runs a plain `def` dependency in its thread pool, a hop per request
    service: ImageService = request.app.state.service
    return service


ServiceDep = Annotated[ImageService, Depends(get_service)]
router = APIRouter()


@router.post("/api/images/generate")
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


@router.post("/api/prompts/enhance")
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


def _chinese(request: Request) -> bool:
    return prefers_chinese(request.headers.get("accept-language"))


@router.post("/api/quota/status")
async def quota_status(request: Request, service: ServiceDep) -> Response:
    """Balance, whether today's grant was taken, the cap and the daily grant."""
    data = await read_json(request, limit=service.settings.max_json_bytes)
    status = await service.store.status(clean_fingerprint(data.get("fingerprint")))
    return ok(status.to_json())


@router.post("/api/quota/check-in")
async def quota_check_in(request: Request, service: ServiceDep) -> Response:
    """Take today's grant (once per calendar day, up to the cap)."""
    data = await read_json(request, limit=service.settings.max_json_bytes)
    status = await service.store.check_in(clean_fingerprint(data.get("fingerprint")))
    return ok(status.to_json())


@router.api_route("/healthz", methods=["GET", "HEAD"], include_in_schema=False)
async def healthz() -> Response:
    return ok({"status": "alive"})


@router.api_route("/readyz", methods=["GET", "HEAD"], include_in_schema=False)
async def readyz(service: ServiceDep) -> Response:
    """Ready when the database and the data directory accept a write and the upstream answers
    a task listing with our key; the body says whether chat (enhancement) is available."""
    return ok(await service.ready())


@router.api_route("/metrics", methods=["GET", "HEAD"], include_in_schema=False)
async def metrics(service: ServiceDep) -> Response:
    return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)
