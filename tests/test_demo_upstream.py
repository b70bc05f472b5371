"""Tests for the built-in demo upstream (real HTTP on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from PIL import Image, ImageChops, ImageOps

from scenemint.demo import DEMO_LABEL, FAIL_MESSAGE, DemoUpstream, rewrite_prompt

KEY = "demo-key"
AUTH = {"Authorization": f"Bearer {KEY}"}

Scenario = Callable[[DemoUpstream, aiohttp.ClientSession], Awaitable[None]]


def run(scenario: Scenario, **kwargs: Any) -> None:
    async def main() -> None:
        options: dict[str, Any] = {"port": 0, "api_key": KEY, "task_seconds": 0.3}
        options["word_delay"] = 0.0
        options.update(kwargs)
        async with DemoUpstream(**options) as upstream, aiohttp.ClientSession() as session:
            await scenario(upstream, session)

    asyncio.run(main())


async def submit(
    upstream: DemoUpstream, session: aiohttp.ClientSession, task_id: str, prompt: str, **extra: str
) -> dict[str, Any]:
    body = {"client_task_id": task_id, "prompt": prompt, "model": "gpt-image-2", "size": "1:1"}
    body.update(extra)
    url = f"{upstream.base_url}/api/image-tasks/generations"
    async with session.post(url, json=body, headers=AUTH) as resp:
        assert resp.status == 200, await resp.text()
        result: dict[str, Any] = await resp.json()
        return result


async def fetch(
    upstream: DemoUpstream, session: aiohttp.ClientSession, *ids: str
) -> dict[str, Any]:
    url = f"{upstream.base_url}/api/image-tasks"
    async with session.get(url, params={"ids": ",".join(ids)}, headers=AUTH) as resp:
        assert resp.status == 200
        result: dict[str, Any] = await resp.json()
        return result


async def wait_done(
    upstream: DemoUpstream, session: aiohttp.ClientSession, task_id: str
) -> tuple[dict[str, Any], list[str]]:
    seen: list[str] = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        task = (await fetch(upstream, session, task_id))["items"][0]
        if not seen or seen[-1] != task["status"]:
            seen.append(task["status"])
        if task["status"] in ("success", "error"):
            return task, seen
        await asyncio.sleep(0.02)
    raise AssertionError(f"task {task_id} never finished: {seen}")


async def download(session: aiohttp.ClientSession, url: str) -> Image.Image:
    async with session.get(url) as resp:  # no auth header: file URLs are public
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "image/png"
        body = await resp.read()
        assert int(resp.headers["Content-Length"]) == len(body)
    image = Image.open(io.BytesIO(body))
    image.load()
    assert image.format == "PNG"
    return image


def test_auth_is_required() -> None:
    async def scenario(upstream: DemoUpstream, session: aiohttp.ClientSession) -> None:
        url = f"{upstream.base_url}/v1/models"
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            async with session.get(url, headers=headers) as resp:
                assert resp.status == 401
                assert await resp.json() == {"error": {"message": "invalid api key"}}
        async with session.get(url, headers=AUTH) as resp:
            assert resp.status == 200
            ids = [m["id"] for m in (await resp.json())["data"]]
            assert ids == ["gpt-image-2", "gpt-5.5"]

    run(scenario)


def test_no_api_key_accepts_anything() -> None:
    async def scenario(upstream: DemoUpstream, session: aiohttp.ClientSession) -> None:
        async with session.get(f"{upstream.base_url}/v1/models") as resp:
            assert resp.status == 200

    run(scenario, api_key=None)


def test_generation_progresses_and_serves_png() -> None:
    async def scenario(upstream: DemoUpstream, session: aiohttp.ClientSession) -> None:
        first = await submit(upstream, session, "t-1", "a lighthouse at dusk", size="16:9")
        assert first["status"] == "queued"
        assert first["mode"] == "generate"
        assert first["size"] == "16:9"
        assert first["data"] == []
        task, seen = await wait_done(upstream, session, "t-1")
        assert seen[0] == "queued"
        assert "running" in seen
        assert seen[-1] == "success"
        assert task["progress"] == 100
        assert task["updated_at"] >= task["created_at"]
        (item,) = task["data"]
        assert item["revised_prompt"] == "(demo) a lighthouse at dusk"
        assert item["url"] == f"{upstream.base_url}/images/t-1.png"
        image = await download(session, item["url"])
        assert image.size == (1024, 576)

        again = await submit(upstream, session, "t-1", "something else entirely")
        assert again["id"] == "t-1"
        assert again["status"] == "success"
        assert again["data"][0]["revised_prompt"] == "(demo) a lighthouse at dusk"
        assert again["created_at"] == task["created_at"]

    run(scenario)


def test_missing_ids_and_bad_requests() -> None:
    async def scenario(upstream: DemoUpstream, session: aiohttp.ClientSession) -> None:
        await submit(upstream, session, "known", "a cat")
        listing = await fetch(upstream, session, "known", "nope-1", "nope-2")
        assert [t["id"] for t in listing["items"]] == ["known"]
        assert listing["missing_ids"] == ["nope-1", "nope-2"]

        url = f"{upstream.base_url}/api/image-tasks/generations"
        for body in ({"prompt": "x"}, {"client_task_id": "b", "prompt": "  "}):
            async with session.post(url, json=body, headers=AUTH) as resp:
                assert resp.status == 400
                assert "message" in (await resp.json())["error"]
        async with session.get(f"{upstream.base_url}/images/unknown.png") as resp:
            assert resp.status == 404

    run(scenario)


def reference_png() -> bytes:
    image = Image.new("RGB", (300, 200), (240, 240, 240))
    image.paste((20, 60, 200), (0, 0, 150, 200))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def edit_form(task_id: str, prompt: str, image: bytes) -> aiohttp.FormData:
    form = aiohttp.FormData()
    for name, value in (("client_task_id", task_id), ("prompt", prompt)):
        form.add_field(name, value)
    form.add_field("model", "gpt-image-2")
    form.add_field("size", "9:16")
    form.add_field("image", image, filename="ref.png", content_type="image/png")
    return form


def test_edit_returns_changed_png() -> None:
    async def scenario(upstream: DemoUpstream, session: aiohttp.ClientSession) -> None:
        url = f"{upstream.base_url}/api/image-tasks/edits"
        ref = reference_png()
        async with session.post(url, data=edit_form("e-1", "make it red", ref), headers=AUTH) as r:
            assert r.status == 200
            created = await r.json()
        assert created["mode"] == "edit"
        async with session.post(url, data=edit_form("e-1", "other", ref), headers=AUTH) as r:
            assert (await r.json())["created_at"] == created["created_at"]
        task, _ = await wait_done(upstream, session, "e-1")
        assert task["status"] == "success"
        edited = (await download(session, task["data"][0]["url"])).convert("RGB")
        assert edited.size == (576, 1024)
        fitted = ImageOps.fit(Image.open(io.BytesIO(ref)).convert("RGB"), edited.size)
        assert ImageChops.difference(edited, fitted).getbbox() is not None

        bad = edit_form("e-2", "broken", b"this is not an image")
        async with session.post(url, data=bad, headers=AUTH) as r:
            assert r.status == 400
        assert (await fetch(upstream, session, "e-2"))["missing_ids"] == ["e-2"]

    run(scenario)


def test_fail_prompt_ends_in_error() -> None:
    async def scenario(upstream: DemoUpstream, session: aiohttp.ClientSession) -> None:
        await submit(upstream, session, "f-1", "please FAIL this one")
        task, seen = await wait_done(upstream, session, "f-1")
        assert seen[-1] == "error"
        assert task["error"] == FAIL_MESSAGE
        assert task["data"] == []

    run(scenario)


def test_chat_completion_stream() -> None:
    prompt = "a quiet harbour with fishing boats"

    async def scenario(upstream: DemoUpstream, session: aiohttp.ClientSession) -> None:
        body = {
            "model": "gpt-5.5",
            "stream": True,
            "temperature": 0.2,
            "messages": [
                {"role": "system", "content": "Rewrite image prompts."},
                {"role": "user", "content": prompt},
            ],
        }
        url = f"{upstream.base_url}/v1/chat/completions"
        async with session.post(url, json=body, headers=AUTH) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            raw = (await resp.read()).decode()
        frames = [f for f in raw.split("\n\n") if f]
        assert all(f.startswith("data: ") for f in frames)
        assert frames[-1] == "data: [DONE]"
        chunks = [json.loads(f.removeprefix("data: ")) for f in frames[:-1]]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks]
        assert sum(1 for p in pieces if p) > 5
        text = "".join(pieces)
        assert text.startswith(prompt)
        assert len(text) > len(prompt) + 20
        assert "masterpiece" not in text.lower()
        assert text == rewrite_prompt(prompt, 0.2)

        async with session.post(url, json={"model": "gpt-5.5"}, headers=AUTH) as resp:
            assert resp.status == 400

    run(scenario, word_delay=0.001)


def test_rewrite_styles_and_cjk() -> None:
    details = rewrite_prompt("a red bicycle", 0.2)
    creative = rewrite_prompt("a red bicycle", 1.0)
    assert details.startswith("a red bicycle, ") and creative.startswith("a red bicycle, ")
    assert details != creative
    assert rewrite_prompt("a red bicycle", 0.2) == details
    chinese = rewrite_prompt("一只橘猫在窗台上睡觉", 0.2)
    assert chinese.startswith("一只橘猫在窗台上睡觉")
    assert chinese.endswith("。")
    assert not any(c.isascii() and c.isalpha() for c in chinese)


def test_cjk_prompt_renders_and_non_stream_chat() -> None:
    async def scenario(upstream: DemoUpstream, session: aiohttp.ClientSession) -> None:
        await submit(upstream, session, "zh", "一只橘猫在窗台上睡觉" * 20)
        task, _ = await wait_done(upstream, session, "zh")
        assert task["status"] == "success"
        assert (await download(session, task["data"][0]["url"])).size == (768, 768)
        body = {"model": "gpt-5.5", "messages": [{"role": "user", "content": "a fox"}]}
        url = f"{upstream.base_url}/v1/chat/completions"
        async with session.post(url, json=body, headers=AUTH) as resp:
            answer = await resp.json()
        assert answer["object"] == "chat.completion"
        assert answer["choices"][0]["message"]["content"].startswith("a fox")

    run(scenario)


def test_demo_label_is_visible_constant() -> None:
    assert "DEMO" in DEMO_LABEL
    assert "not AI" in DEMO_LABEL
