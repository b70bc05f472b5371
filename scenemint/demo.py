"""Built-in DEMO upstream that speaks the chatgpt2api protocol on a local port.

This module owns a self-contained fake upstream so the gateway can be tried
without any account: image tasks (generate/edit) that progress over time and end
with a PNG drawn locally by Pillow, a readiness endpoint (``/v1/models``) and a
streaming chat-completions endpoint that performs a fixed, rule-based prompt
rewrite. Nothing here is AI, and every image says so in large letters.
"""

from __future__ import annotations

import asyncio
import base64
import colorsys
import contextlib
import hashlib
import hmac
import io
import ipaddress
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any
from urllib.parse import quote

from aiohttp import web
from aiohttp.typedefs import Handler
from PIL import Image, ImageDraw, ImageFont, ImageOps

log = logging.getLogger(__name__)

# ASCII only: the bundled default font has no glyph for an em dash.
DEMO_LABEL = "SceneMint DEMO - drawn locally, not AI"
FAIL_MESSAGE = "demo: generation failed (the prompt asked for it)"
SIZES: dict[str, tuple[int, int]] = {"1:1": (768, 768), "16:9": (1024, 576), "9:16": (576, 1024)}
QUEUED_FRACTION = 0.15
MAX_TASKS = 2000  # bounds memory for long-running demos; oldest tasks are forgotten first
MAX_REFERENCE_PIXELS = 40_000_000
_FAIL_WORD = re.compile(r"\bfail\b", re.IGNORECASE)
_CJK = re.compile(r"[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef]")
# Every character falls in exactly one alternative, so "".join(tokens) == text.
_TOKEN = re.compile(
    r"[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef]{1,3}"
    r"|[^\s\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef]+\s*|\s+"
)

# Escaped because full-width punctuation looks like ASCII in an editor.
_ZH_COMMA = "\uff0c"
_ZH_STOPS = ("。", _ZH_COMMA, "\uff01", "\uff1f", "\uff1b")

_DETAILS_EN = (
    (
        "soft window light from the left",
        "low golden-hour sun with long shadows",
        "overcast daylight with gentle contrast",
        "warm lamplight against cool ambient light",
    ),
    (
        "visible surface textures, matte and glossy side by side",
        "weathered wood and brushed metal textures",
        "fine fabric weave and faint dust in the air",
        "wet, reflective surfaces",
    ),
    (
        "rule-of-thirds composition with a clear focal point",
        "centred symmetrical framing",
        "shallow depth of field with a softly blurred background",
        "layered foreground, middle ground and background",
    ),
    (
        "muted teal and amber palette",
        "earth tones with one saturated accent colour",
        "soft pastel palette",
        "deep blues against warm oranges",
    ),
)
_CREATIVE_EN = (
    (
        "seen from directly above",
        "viewed from ground level looking up",
        "glimpsed through a rain-streaked window",
        "reflected in a still puddle",
    ),
    (
        "calm stillness set against a hint of an approaching storm",
        "playful details inside an otherwise solemn scene",
        "warm nostalgia with an eerie undertone",
        "bright colours with long melancholic shadows",
    ),
)
_DETAILS_ZH = (
    (
        "柔和的侧窗光",
        "傍晚低角度的金色阳光和长长的影子",
        "阴天的柔和漫射光",
        "暖色灯光与冷色环境光对比",
    ),
    (
        "清晰可见的材质纹理",
        "做旧的木头与拉丝金属质感",
        "细腻的织物纹理和空气中的微尘",
        "湿润反光的表面",
    ),
    ("三分法构图、主体明确", "居中对称构图", "浅景深、背景柔和虚化", "前景、中景、背景层次分明"),
    ("低饱和的青色与琥珀色调", "大地色系点缀一抹亮色", "柔和的粉彩色调", "深蓝与暖橙的对比"),
)
_CREATIVE_ZH = (
    ("从正上方俯瞰", "从地面仰视", "透过挂着雨痕的窗户看去", "倒映在平静的水洼中"),
    (
        "宁静中透出暴风雨将至的气息",
        "庄重场景里藏着俏皮的细节",
        "温暖的怀旧感带着一丝诡异",
        "明亮色彩下拖着忧郁的长影",
    ),
)


def rewrite_prompt(prompt: str, temperature: float) -> str:
    """Deterministic, rule-based stand-in for an LLM prompt rewrite (keeps the prompt)."""
    base = prompt.strip()
    creative = temperature > 0.5
    chinese = bool(_CJK.search(base))
    if chinese:
        groups = (_CREATIVE_ZH + _DETAILS_ZH[:1]) if creative else _DETAILS_ZH
    else:
        groups = (_CREATIVE_EN + _DETAILS_EN[:1]) if creative else _DETAILS_EN
    digest = hashlib.sha256(f"{creative}:{base}".encode()).digest()
    phrases = [options[digest[i] % len(options)] for i, options in enumerate(groups)]
    if chinese:
        sep = "" if base.endswith(_ZH_STOPS) else _ZH_COMMA
        return f"{base}{sep}{_ZH_COMMA.join(phrases)}。"
    sep = " " if base.endswith((".", ",", ";", ":", "!", "?")) else ", "
    return f"{base}{sep}{', '.join(phrases)}."


def _stream_tokens(text: str) -> list[str]:
    return _TOKEN.findall(text)


# --------------------------------------------------------------------------- images


def _palette(prompt: str) -> tuple[tuple[int, int, int], tuple[int, int, int], bytes]:
    digest = hashlib.sha256(prompt.encode()).digest()
    hue = digest[0] / 255
    first = colorsys.hsv_to_rgb(hue, 0.5 + digest[1] / 800, 0.55 + digest[2] / 900)
    second = colorsys.hsv_to_rgb((hue + 0.3 + digest[3] / 800) % 1.0, 0.6, 0.35 + digest[4] / 900)

    def rgb(c: tuple[float, float, float]) -> tuple[int, int, int]:
        return (int(c[0] * 255), int(c[1] * 255), int(c[2] * 255))

    return rgb(first), rgb(second), digest


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Any, max_width: float) -> list[str]:
    def fits(s: str) -> bool:
        return draw.textlength(s, font=font) <= max_width

    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if fits(candidate):
            current = candidate
            continue
        if current:
            lines.append(current)
        # CJK text has no spaces, so an over-long "word" is broken by characters.
        while not fits(word) and len(word) > 1:
            lo, hi = 1, len(word) - 1
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if fits(word[:mid]) else (lo, mid - 1)
            lines.append(word[:lo])
            word = word[lo:]
        current = word
    if current:
        lines.append(current)
    return lines


def _text_block(
    canvas: Image.Image, text: str, *, top: int | None, max_lines: int, font_size: int
) -> None:
    """Draw wrapped text on a translucent dark panel; top=None centres it vertically."""
    w, h = canvas.size
    font = _font(font_size)
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    lines = _wrap(draw, text[:400], font, w * 0.84)
    if len(lines) > max_lines:
        lines = [*lines[: max_lines - 1], lines[max_lines - 1][:-3] + "..."]
    line_h = int(font_size * 1.3)
    pad = font_size // 2
    block_h = line_h * len(lines) + 2 * pad
    y0 = (h - block_h) // 2 if top is None else top
    draw.rounded_rectangle((w * 0.05, y0, w * 0.95, y0 + block_h), radius=pad, fill=(0, 0, 0, 150))
    for i, line in enumerate(lines):
        x = (w - draw.textlength(line, font=font)) / 2
        draw.text((x, y0 + pad + i * line_h), line, font=font, fill=(255, 255, 255, 255))
    canvas.alpha_composite(overlay)


def _demo_banner(canvas: Image.Image) -> None:
    w, h = canvas.size
    size = max(16, w // 34)
    font = _font(size)
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    bar_h = size * 2
    draw.rectangle((0, h - bar_h, w, h), fill=(0, 0, 0, 200))
    x = (w - draw.textlength(DEMO_LABEL, font=font)) / 2
    draw.text((x, h - bar_h + size // 2), DEMO_LABEL, font=font, fill=(255, 214, 0, 255))
    canvas.alpha_composite(overlay)


def _to_png(canvas: Image.Image) -> bytes:
    buf = io.BytesIO()
    canvas.convert("RGB").save(buf, "PNG", compress_level=3)
    return buf.getvalue()


def render_generation(prompt: str, size: str) -> bytes:
    """Gradient keyed on the prompt hash, the prompt itself, and the DEMO label."""
    w, h = SIZES.get(size, SIZES["1:1"])
    first, second, digest = _palette(prompt)
    mask = Image.linear_gradient("L")
    if digest[5] & 1:
        mask = mask.transpose(Image.Transpose.ROTATE_90)
    mask = mask.resize((w, h))
    base = Image.composite(Image.new("RGB", (w, h), second), Image.new("RGB", (w, h), first), mask)
    canvas = base.convert("RGBA")
    blobs = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    draw = ImageDraw.Draw(blobs)
    for i in range(5):
        cx, cy = digest[6 + i] / 255 * w, digest[11 + i] / 255 * h
        r = (0.08 + digest[16 + i] / 255 * 0.2) * min(w, h)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(255, 255, 255, 36))
    canvas.alpha_composite(blobs)
    _text_block(canvas, prompt, top=None, max_lines=8, font_size=max(18, w // 26))
    _demo_banner(canvas)
    return _to_png(canvas)


def render_edit(reference: Image.Image, prompt: str, size: str) -> bytes:
    """A visibly altered copy of the reference: fitted, posterized, tinted, captioned."""
    w, h = SIZES.get(size, SIZES["1:1"])
    first, _, _ = _palette(prompt)
    base = ImageOps.posterize(ImageOps.fit(reference.convert("RGB"), (w, h)), 3)
    base = Image.blend(base, Image.new("RGB", (w, h), first), 0.35)
    canvas = base.convert("RGBA")
    _text_block(canvas, prompt, top=h // 30, max_lines=3, font_size=max(16, w // 32))
    _demo_banner(canvas)
    return _to_png(canvas)


def decode_reference(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        if img.width * img.height > MAX_REFERENCE_PIXELS:
            raise ValueError("reference image is too large")
        img.load()
        return img.convert("RGBA") if "A" in img.getbands() else img.convert("RGB")


# --------------------------------------------------------------------------- tasks


@dataclass
class _Task:
    id: str
    mode: str
    model: str
    size: str
    prompt: str
    created_mono: float
    created_at: datetime
    fails: bool
    png: bytes | None = None
    rendered_mono: float | None = None
    render_error: str = ""

    def state(self, now: float, task_seconds: float) -> tuple[str, int, float]:
        """(status, progress, seconds from creation to the last status change)."""
        elapsed = now - self.created_mono
        queued_for = task_seconds * QUEUED_FRACTION
        if elapsed < queued_for:
            return "queued", 0, 0.0
        if elapsed >= task_seconds:
            if self.fails or self.render_error:
                return "error", 100, task_seconds
            if self.png is not None and self.rendered_mono is not None:
                return "success", 100, max(task_seconds, self.rendered_mono - self.created_mono)
        span = task_seconds - queued_for
        fraction = (elapsed - queued_for) / span if span > 0 else 1.0
        return "running", min(99, 15 + int(fraction * 84)), queued_for


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status)


def _openai_error(status: int, code: str, message: str) -> web.Response:
    error = {"message": message, "type": "invalid_request_error", "code": code}
    return web.json_response({"error": error}, status=status)


# the OpenAI sizes the service sends -> the demo's own
_OPENAI_SIZES = {"1024x1024": "1:1", "1536x1024": "16:9", "1024x1536": "9:16"}


@dataclass
class _DemoService:
    api_key: str | None
    task_seconds: float
    word_delay: float
    image_model: str
    prompt_model: str
    tasks: dict[str, _Task] = field(default_factory=dict)
    renders: set[asyncio.Task[None]] = field(default_factory=set)

    @web.middleware
    async def auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # Image URLs are fetched like plain file links, so they stay public.
        if self.api_key is None or request.path.startswith("/images/"):
            return await handler(request)
        supplied = request.headers.get("Authorization", "")
        if not hmac.compare_digest(supplied.encode(), f"Bearer {self.api_key}".encode()):
            return _error(401, "invalid api key")
        return await handler(request)

    def _task_json(self, request: web.Request, task: _Task) -> dict[str, Any]:
        status, progress, changed = task.state(time.monotonic(), self.task_seconds)
        data: list[dict[str, str]] = []
        if status == "success":
            url = f"{request.scheme}://{request.host}/images/{quote(task.id, safe='')}.png"
            data.append({"url": url, "revised_prompt": f"(demo) {task.prompt}"})
        error = ""
        if status == "error":
            error = FAIL_MESSAGE if task.fails else task.render_error
        return {
            "id": task.id,
            "status": status,
            "mode": task.mode,
            "model": task.model,
            "size": task.size,
            "created_at": _iso(task.created_at),
            "updated_at": _iso(task.created_at + timedelta(seconds=changed)),
            "progress": progress,
            "data": data,
            "error": error,
        }

    def _add_task(self, task: _Task, reference: Image.Image | None) -> None:
        self.tasks[task.id] = task
        while len(self.tasks) > MAX_TASKS:
            del self.tasks[next(iter(self.tasks))]
        if not task.fails:
            job = asyncio.create_task(self._render(task, reference))
            self.renders.add(job)
            job.add_done_callback(self.renders.discard)

    async def _render(self, task: _Task, reference: Image.Image | None) -> None:
        try:
            if reference is None:
                png = await asyncio.to_thread(render_generation, task.prompt, task.size)
            else:
                png = await asyncio.to_thread(render_edit, reference, task.prompt, task.size)
        except Exception as exc:
            log.exception("demo upstream: rendering task %s failed", task.id)
            task.render_error = f"demo: rendering failed: {exc}"
            return
        task.png = png
        task.rendered_mono = time.monotonic()

    def _new_task(self, task_id: str, mode: str, prompt: str, model: str, size: str) -> _Task:
        return _Task(
            id=task_id,
            mode=mode,
            model=model or self.image_model,
            size=size or "1:1",
            prompt=prompt,
            created_mono=time.monotonic(),
            created_at=datetime.now(UTC),
            fails=bool(_FAIL_WORD.search(prompt)),
        )

    async def generations(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "request body must be JSON")
        if not isinstance(body, dict):
            return _error(400, "request body must be a JSON object")
        fields = {k: body.get(k) for k in ("client_task_id", "prompt", "model", "size")}
        return await self._submit(request, fields, None)

    async def edits(self, request: web.Request) -> web.Response:
        try:
            form = await request.post()
        except ValueError as exc:
            return _error(400, f"invalid multipart body: {exc}")
        fields = {k: form.get(k) for k in ("client_task_id", "prompt", "model", "size")}
        image = form.get("image")
        if isinstance(image, web.FileField):
            raw: bytes | None = image.file.read()
        elif isinstance(image, (bytes, bytearray)):
            raw = bytes(image)
        else:
            raw = None
        return await self._submit(request, fields, raw, edit=True)

    async def _submit(
        self,
        request: web.Request,
        fields: dict[str, Any],
        image: bytes | None,
        *,
        edit: bool = False,
    ) -> web.Response:
        task_id, prompt = fields["client_task_id"], fields["prompt"]
        if not isinstance(task_id, str) or not task_id.strip() or len(task_id) > 200:
            return _error(400, "client_task_id is required (1-200 characters)")
        if not isinstance(prompt, str) or not prompt.strip():
            return _error(400, "prompt must be a non-empty string")
        existing = self.tasks.get(task_id)
        if existing is not None:
            return web.json_response(self._task_json(request, existing))
        reference: Image.Image | None = None
        if edit:
            if not image:
                return _error(400, "an 'image' file part is required for edits")
            try:
                reference = await asyncio.to_thread(decode_reference, image)
            except Exception as exc:
                return _error(400, f"could not decode the reference image: {exc}")
        model = fields["model"] if isinstance(fields["model"], str) else ""
        size = fields["size"] if isinstance(fields["size"], str) else ""
        task = self._new_task(task_id, "edit" if edit else "generate", prompt, model, size)
        self._add_task(task, reference)
        return web.json_response(self._task_json(request, task))

    # -- the OpenAI Images API (synchronous): `scenemint serve --demo --upstream-kind openai`

    async def openai_generations(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _openai_error(400, "invalid_request_error", "request body must be JSON")
        if not isinstance(body, dict):
            return _openai_error(400, "invalid_request_error", "body must be a JSON object")
        return await self._openai_image(body.get("prompt"), body.get("size"), None)

    async def openai_edits(self, request: web.Request) -> web.Response:
        try:
            form = await request.post()
        except ValueError as exc:
            return _openai_error(400, "invalid_request_error", f"invalid multipart body: {exc}")
        image = form.get("image")
        raw = image.file.read() if isinstance(image, web.FileField) else None
        if not raw:
            return _openai_error(400, "invalid_request_error", "an 'image' file is required")
        return await self._openai_image(form.get("prompt"), form.get("size"), raw)

    async def _openai_image(
        self, prompt: object, size: object, image: bytes | None
    ) -> web.Response:
        if not isinstance(prompt, str) or not prompt.strip():
            return _openai_error(400, "invalid_request_error", "prompt must be a non-empty string")
        if _FAIL_WORD.search(prompt):
            return _openai_error(400, "content_policy_violation", FAIL_MESSAGE)
        ours = _OPENAI_SIZES.get(size if isinstance(size, str) else "", "1:1")
        await asyncio.sleep(self.task_seconds)  # a synchronous API holds the connection
        try:
            if image is None:
                png = await asyncio.to_thread(render_generation, prompt, ours)
            else:
                reference = await asyncio.to_thread(decode_reference, image)
                png = await asyncio.to_thread(render_edit, reference, prompt, ours)
        except Exception as exc:
            return _openai_error(400, "invalid_request_error", f"cannot render: {exc}")
        return web.json_response(
            {
                "created": int(time.time()),
                "data": [
                    {
                        "b64_json": base64.b64encode(png).decode(),
                        "revised_prompt": f"(demo) {prompt}",
                    }
                ],
            }
        )

    async def list_tasks(self, request: web.Request) -> web.Response:
        ids = list(dict.fromkeys(i.strip() for i in request.query.get("ids", "").split(",")))
        items, missing = [], []
        for task_id in filter(None, ids):
            task = self.tasks.get(task_id)
            if task is None:
                missing.append(task_id)
            else:
                items.append(self._task_json(request, task))
        return web.json_response({"items": items, "missing_ids": missing})

    async def image_file(self, request: web.Request) -> web.Response:
        name = request.match_info["filename"]
        task = self.tasks.get(name.removesuffix(".png")) if name.endswith(".png") else None
        if task is None or task.png is None:
            return _error(404, "image not found")
        if task.state(time.monotonic(), self.task_seconds)[0] != "success":
            return _error(404, "image not ready")
        return web.Response(body=task.png, content_type="image/png")

    async def models(self, request: web.Request) -> web.Response:
        data = [
            {"id": model, "object": "model", "owned_by": "scenemint-demo"}
            for model in (self.image_model, self.prompt_model)
        ]
        return web.json_response({"object": "list", "data": data})

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "request body must be JSON")
        if not isinstance(body, dict):
            return _error(400, "request body must be a JSON object")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _error(400, "messages must be a non-empty list")
        prompt = _last_user_text(messages)
        if not prompt:
            return _error(400, "no user message with text content")
        temperature = body.get("temperature")
        temp = float(temperature) if isinstance(temperature, (int, float)) else 1.0
        text = rewrite_prompt(prompt, temp)
        model = body.get("model") if isinstance(body.get("model"), str) else self.prompt_model
        base: dict[str, Any] = {
            "id": f"chatcmpl-demo-{uuid.uuid4().hex[:24]}",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "scenemint-demo-rule-based",
        }
        if not body.get("stream"):
            choice = {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": text},
            }
            return web.json_response({**base, "object": "chat.completion", "choices": [choice]})
        return await self._stream(request, base, text)

    async def _stream(
        self, request: web.Request, base: dict[str, Any], text: str
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)

        def frame(delta: dict[str, str], finish: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            chunk = {**base, "object": "chat.completion.chunk", "choices": [choice]}
            return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode()

        try:
            await response.write(frame({"role": "assistant", "content": ""}))
            for token in _stream_tokens(text):
                await asyncio.sleep(self.word_delay)
                await response.write(frame({"content": token}))
            await response.write(frame({}, "stop"))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionResetError:
            log.debug("demo upstream: chat client went away mid-stream")
        return response

    async def close(self, _app: web.Application) -> None:
        if self.renders:
            await asyncio.gather(*self.renders, return_exceptions=True)


def _last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if not isinstance(message, dict) or message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return content.strip()
        if isinstance(content, list):
            parts = [p.get("text", "") for p in content if isinstance(p, dict)]
            return " ".join(p for p in parts if isinstance(p, str) and p).strip()
    return ""


_SERVICE = web.AppKey("scenemint_demo_service", _DemoService)


def create_demo_app(
    *,
    api_key: str | None = None,
    task_seconds: float = 3.0,
    word_delay: float = 0.03,
    image_model: str = "gpt-image-2",
    prompt_model: str = "gpt-5.5",
) -> web.Application:
    """Build the demo upstream application; all state lives on the returned app."""
    service = _DemoService(
        api_key, max(0.0, task_seconds), max(0.0, word_delay), image_model, prompt_model
    )
    app = web.Application(middlewares=[service.auth], client_max_size=25 * 1024 * 1024)
    app[_SERVICE] = service
    app.router.add_post("/api/image-tasks/generations", service.generations)
    app.router.add_post("/api/image-tasks/edits", service.edits)
    app.router.add_get("/api/image-tasks", service.list_tasks)
    app.router.add_get("/images/{filename}", service.image_file)
    app.router.add_post("/v1/images/generations", service.openai_generations)
    app.router.add_post("/v1/images/edits", service.openai_edits)
    app.router.add_get("/v1/models", service.models)
    app.router.add_post("/v1/chat/completions", service.chat_completions)
    app.on_cleanup.append(service.close)
    return app


class DemoUpstream:
    """Runs the demo app on host:port inside the current event loop."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 3200,
        api_key: str | None = None,
        task_seconds: float = 3.0,
        word_delay: float = 0.03,
    ) -> None:
        self.host = host
        self.port = port
        self.app = create_demo_app(
            api_key=api_key, task_seconds=task_seconds, word_delay=word_delay
        )
        self._runner: web.AppRunner | None = None
        self._bound_port: int | None = None

    async def start(self) -> None:
        if self._runner is not None:
            return
        # Access logs would print a line per status poll; the demo stays quiet.
        runner = web.AppRunner(self.app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._bound_port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    @property
    def base_url(self) -> str:
        if self._bound_port is None:
            raise RuntimeError("DemoUpstream is not started")
        host = self.host or "127.0.0.1"
        with contextlib.suppress(ValueError):
            address = ipaddress.ip_address(host)
            # A wildcard bind is reachable via loopback; it is not itself a usable URL host.
            if address.is_unspecified:
                host = "::1" if address.version == 6 else "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self._bound_port}"

    async def __aenter__(self) -> DemoUpstream:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


def run_demo_upstream(
    *, host: str = "127.0.0.1", port: int = 3200, api_key: str | None = None
) -> None:
    """Serve the demo upstream until Ctrl-C (blocking; used by the CLI)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    async def serve() -> None:
        async with DemoUpstream(host=host, port=port, api_key=api_key) as upstream:
            log.info(
                "SceneMint DEMO upstream (rule-based, draws images locally, not AI) "
                "listening on %s%s — press Ctrl-C to stop",
                upstream.base_url,
                "" if api_key is None else " (api key required)",
            )
            await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        log.info("SceneMint DEMO upstream stopped")
