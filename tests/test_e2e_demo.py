"""End to end: `scenemint serve --demo` as a real process, used the way a browser would."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.service_runner import free_port

FINGERPRINT = "e2e-demo-fingerprint"


def start_demo(tmp_path: Path, port: int, *extra: str) -> tuple[subprocess.Popen[bytes], Path]:
    # a clean environment: no upstream or database of the developer's leaks into the demo
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CHATGPT2API_", "SCENEMINT_")) and k not in ("HOST", "PORT")
    }
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "scenemint", "serve", "--demo", "--port", str(port), *extra],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return process, log_path


def wait_ready(process: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert process.poll() is None, f"exited early:\n{log_path.read_text()}"
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"not ready:\n{log_path.read_text()}")


@pytest.mark.parametrize("kind", ["chatgpt2api", "openai"])
def test_demo_service_generates_serves_and_enhances(tmp_path, kind):
    """With either upstream kind, the original web UI's flow works unchanged: its poll loop
    sees queued/running, then completed, and the image loads from the service."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process, log_path = start_demo(tmp_path, port, "--upstream-kind", kind)
    try:
        wait_ready(process, url, log_path)
        with httpx.Client(base_url=url, timeout=10) as http:
            checked = http.post("/api/quota/check-in", json={"fingerprint": FINGERPRINT})
            assert checked.status_code == 200, checked.text
            assert checked.json()["data"]["balance"] == 10

            generated = http.post(
                "/api/images/generate",
                json={"prompt": "a lighthouse at dusk", "size": "16:9", "fingerprint": FINGERPRINT},
            )
            assert generated.status_code == 200, generated.text
            task = generated.json()["data"]
            assert task["remainingCredits"] == 9
            assert task["status"] in ("queued", "running")

            deadline = time.monotonic() + 15
            seen = set()
            while True:
                polled = http.get(f"/api/images/tasks/{task['id']}")
                assert polled.status_code == 200
                state = polled.json()["data"]
                seen.add(state["status"])
                if state["status"] in ("completed", "failed"):
                    break
                assert time.monotonic() < deadline, f"still {state['status']}"
                time.sleep(0.25)
            assert state["status"] == "completed", state
            assert state["image"] == f"/api/images/tasks/{task['id']}/image"
            assert seen & {"queued", "running"}  # it really took a while

            image = http.get(state["image"])
            assert image.status_code == 200
            assert image.headers["content-type"] == "image/png"
            picture = Image.open(io.BytesIO(image.content))
            picture.verify()
            assert picture.format == "PNG"
            width, height = Image.open(io.BytesIO(image.content)).size
            assert width > height  # 16:9

            with http.stream(
                "POST",
                "/api/prompts/enhance",
                json={"prompt": "a lighthouse", "direction": "details"},
            ) as stream:
                assert stream.status_code == 200
                assert stream.headers["content-type"].startswith("text/event-stream")
                body = "".join(stream.iter_text())
            frames = body[:-2].split("\n\n")
            assert frames[-1] == "data: [DONE]"
            text = "".join(
                json.loads(f[len("data: ") :])["choices"][0]["delta"].get("content") or ""
                for f in frames[:-1]
            )
            assert text.strip()

            balance = http.post("/api/quota/status", json={"fingerprint": FINGERPRINT})
            assert balance.json()["data"]["balance"] == 9
        assert (tmp_path / "data").is_dir()  # its ./data is where it was started
    finally:
        if process.poll() is None:
            process.terminate()
        try:
            code = process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
            raise
    log = log_path.read_text()
    # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught so that the parent
    # sees why it ended: a clean stop is exit 0 or "terminated by SIGTERM", nothing else
    assert code in (0, -signal.SIGTERM), log
    assert "Application shutdown complete" in log, log
    assert "Finished server process" in log, log
    assert "Traceback" not in log, log
    assert "DEMO MODE" in log


def test_a_demo_restart_says_the_task_was_lost_and_its_credit_returned(tmp_path):
    """The demo upstream keeps its tasks in memory: after a restart of `serve --demo`, a task
    that was in flight fails saying what happened and that the credit came back — not the
    words for an id that never existed."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process, log_path = start_demo(tmp_path, port)
    try:
        wait_ready(process, url, log_path)
        with httpx.Client(base_url=url, timeout=10) as http:
            http.post("/api/quota/check-in", json={"fingerprint": FINGERPRINT})
            task = http.post(
                "/api/images/generate",
                json={"prompt": "a lighthouse at dusk", "fingerprint": FINGERPRINT},
            ).json()["data"]
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(20)
    process, log_path = start_demo(tmp_path, port)
    try:
        wait_ready(process, url, log_path)
        with httpx.Client(base_url=url, timeout=10) as http:
            state = http.get(f"/api/images/tasks/{task['id']}").json()["data"]
            assert state["status"] == "failed", state
            assert "lost this task" in state["error"] and "credit was returned" in state["error"]
            balance = http.post("/api/quota/status", json={"fingerprint": FINGERPRINT})
            assert balance.json()["data"]["balance"] == 10
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(20)
