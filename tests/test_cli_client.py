"""`scenemint generate`, `enhance` and `credits` against a running server: through Typer's
runner, as real subprocesses, and the README quick start against `scenemint serve --demo`."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from typer.testing import CliRunner

from scenemint.cli import app
from tests.conftest import FINGERPRINT, balance, check_in
from tests.fake_upstream import make_png
from tests.service_runner import free_port

PICTURE = make_png(16, 9, rgb=(10, 120, 200))


@pytest.fixture(autouse=True)
def client_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A temporary config dir (never the real home), run in tmp_path; nothing of the developer's
    (server, fingerprint, upstream, database) leaks in. Returned: the env for subprocesses."""
    config = str(tmp_path / "config")
    monkeypatch.setenv("SCENEMINT_CONFIG_DIR", config)
    monkeypatch.delenv("SCENEMINT_SERVER", raising=False)
    monkeypatch.delenv("SCENEMINT_FINGERPRINT", raising=False)
    monkeypatch.chdir(tmp_path)
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CHATGPT2API_", "SCENEMINT_")) and k not in ("HOST", "PORT")
    }
    return {**clean, "SCENEMINT_CONFIG_DIR": config}


@pytest.fixture
def cli(service: Any) -> Callable[..., Any]:
    """Runs `scenemint <args> --server <service>` in-process; exceptions are not swallowed."""
    runner = CliRunner()

    def run(*args: str, server: str | None = None, fingerprint: str | None = FINGERPRINT) -> Any:
        options = ["--server", server or service.url]
        if fingerprint is not None:
            options += ["--fingerprint", fingerprint]
        return runner.invoke(app, [*args, *options], catch_exceptions=False)

    return run


def scenemint(
    *args: str, env: dict[str, str], timeout: float = 20
) -> subprocess.CompletedProcess[str]:
    """`python -m scenemint <args>` as a real process."""
    return subprocess.run(
        [sys.executable, "-m", "scenemint", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class Mover:
    """Moves the next submitted task along once the CLI has seen each state:
    queued → running → completed (with `image`), or → failed."""

    def __init__(self, upstream: Any, *, image: bytes = PICTURE, fail: bool = False) -> None:
        self.upstream = upstream
        self.image = image
        self.fail = fail
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _polls(self) -> int:
        return len(self.upstream.recorded("/api/image-tasks", method="GET"))

    def _await_polls(self, count: int) -> None:
        deadline = time.monotonic() + 10
        while self._polls() < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {count} polls")
            time.sleep(0.01)

    def _run(self) -> None:
        try:
            [submitted] = self.upstream.wait_for_requests(
                "/api/image-tasks/generations", timeout=10
            )
            task_id = submitted.json["client_task_id"]
            self._await_polls(1)  # the CLI has seen "queued"
            self.upstream.set_task(task_id, status="running")
            self._await_polls(self._polls() + 1)  # ... and then "running"
            if self.fail:
                self.upstream.fail_task(task_id, "the model refused")
            else:
                self.upstream.complete_task(task_id, image=self.image)
        except BaseException as exc:
            self.error = exc

    def join(self) -> None:
        self._thread.join(10)
        assert not self._thread.is_alive()
        assert self.error is None, self.error


def one_error_line(stderr: str) -> str:
    """The error output: exactly one line starting with `error: `, no traceback."""
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    return lines[0]


# --------------------------------------------------------------------------- credits


def test_credits_shows_the_balance_and_takes_the_check_in(cli, service):
    before = cli("credits")
    assert before.exit_code == 0, before.stderr
    assert "balance: 0 credits (cap 100)" in before.stdout
    assert "not taken yet (+10)" in before.stdout
    assert "scenemint credits --check-in" in before.stdout

    taken = cli("credits", "--check-in")
    assert taken.exit_code == 0, taken.stderr
    assert taken.stdout.splitlines() == [
        "checked in: +10 credits",
        "balance: 10 credits (cap 100)",
        "today's check-in: taken",
    ]
    again = cli("credits", "--check-in")
    assert again.stdout.splitlines()[0] == "already checked in today"
    assert balance(service) == 10


def test_credits_without_a_fingerprint_stores_one_and_keeps_it(cli, service, tmp_path):
    assert cli("credits", "--check-in", fingerprint=None).exit_code == 0
    stored = (tmp_path / "config" / "fingerprint").read_text().strip()
    assert balance(service, stored) == 10
    shown = cli("credits", fingerprint=None)
    assert "balance: 10 credits" in shown.stdout


def test_audit_credits_says_which_database_it_checked(service, monkeypatch):
    """The server-side audit is `scenemint audit credits`; the client's `credits` is apart."""
    check_in(service)
    monkeypatch.setenv("SCENEMINT_DATA_DIR", str(service.settings.data_dir))
    monkeypatch.delenv("SCENEMINT_DATABASE_URL", raising=False)
    result = CliRunner().invoke(app, ["audit", "credits"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    database = (service.settings.data_dir / "scenemint.sqlite3").resolve()
    assert result.stdout.splitlines()[0] == f"database: sqlite:///{database}"
    assert "accounts 1" in result.stdout
    assert "audit passed" in result.stdout
    assert "balance:" not in result.stdout  # the client's overview did not run
    helped = CliRunner().invoke(app, ["credits", "--help"], catch_exceptions=False)
    assert "audit" not in helped.stdout  # the client's command shows only its own options


# --------------------------------------------------------------------------- generate


def test_generate_shows_each_state_then_writes_the_image_and_prints_its_path(
    cli, service, upstream, tmp_path
):
    check_in(service)
    mover = Mover(upstream)
    result = cli("generate", "a lighthouse at dusk", "-o", "out.png", "--poll-interval", "0.02")
    mover.join()
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "out.png\n"
    assert (tmp_path / "out.png").read_bytes() == PICTURE
    states = [line.split()[1] for line in result.stderr.splitlines()]
    assert states == ["queued", "running", "completed"]
    assert all(line.endswith("s") for line in result.stderr.splitlines())  # elapsed time
    assert balance(service) == 9


def test_generate_json_prints_the_final_task(cli, service, upstream, tmp_path):
    check_in(service)
    mover = Mover(upstream)
    result = cli("generate", "a lighthouse", "--size", "16:9", "--json", "--poll-interval", "0.02")
    mover.join()
    assert result.exit_code == 0, result.stderr
    task = json.loads(result.stdout)
    assert task["status"] == "completed"
    assert task["size"] == "16:9"
    assert task["prompt"] == "a lighthouse"
    assert task["remainingCredits"] == 9
    assert task["image"] == f"/api/images/tasks/{task['id']}/image"
    assert task["file"] == f"scenemint-{task['id'][:8]}.png"
    assert (tmp_path / task["file"]).read_bytes() == PICTURE


def test_generate_no_wait_prints_the_task_id_and_returns(cli, service, upstream, tmp_path):
    check_in(service)
    result = cli("generate", "a lighthouse", "--no-wait")
    assert result.exit_code == 0, result.stderr
    task_id = result.stdout.strip()
    assert str(uuid.UUID(task_id)) == task_id
    assert upstream.task(task_id) is not None
    assert result.stderr == ""
    assert not list(tmp_path.glob("*.png"))


def test_generate_with_an_image_submits_an_edit(cli, service, upstream, tmp_path):
    check_in(service)
    reference = make_png(2, 2)
    (tmp_path / "ref.png").write_bytes(reference)
    result = cli("generate", "make it blue", "--image", "ref.png", "--no-wait", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["mode"] == "image"
    [sent] = upstream.recorded("/api/image-tasks/edits")
    assert sent.files["image"].data == reference


def test_generate_json_of_a_failed_task_prints_the_balance_after_the_refund(
    cli, service, upstream, tmp_path
):
    """It printed the stale remainingCredits of the submit answer (9) after the refund."""
    check_in(service)
    mover = Mover(upstream, fail=True)
    result = cli("generate", "a lighthouse", "--json", "--poll-interval", "0.02")
    mover.join()
    assert result.exit_code == 1
    task = json.loads(result.stdout)
    assert task["status"] == "failed"
    assert task["remainingCredits"] == 10 == balance(service)


def test_generate_that_fails_upstream_says_so_and_exits_1(cli, service, upstream, tmp_path):
    check_in(service)
    mover = Mover(upstream, fail=True)
    result = cli("generate", "a lighthouse", "--poll-interval", "0.02")
    mover.join()
    assert result.exit_code == 1
    assert result.stdout == ""
    line = result.stderr.splitlines()[-1]
    assert line == ("error: the generation failed: the model refused (the credit was given back)")
    assert not list(tmp_path.glob("*.png"))
    assert balance(service) == 10


def test_generate_that_takes_too_long_gives_up(cli, service):
    check_in(service)
    result = cli("generate", "a lighthouse", "--timeout", "0.2", "--poll-interval", "0.05")
    assert result.exit_code == 1
    assert "did not finish within 0.2s" in result.stderr.splitlines()[-1]


def test_wait_finishes_a_task_started_with_no_wait(cli, service, upstream, tmp_path):
    check_in(service)
    task_id = cli("generate", "a lighthouse", "--no-wait").stdout.strip()
    upstream.complete_task(task_id, image=PICTURE)
    result = cli("wait", task_id, "-o", "later.png", "--poll-interval", "0.02", fingerprint=None)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "later.png\n"
    assert (tmp_path / "later.png").read_bytes() == PICTURE
    assert result.stderr.splitlines()[-1].split()[1] == "completed"  # the live status


def test_wait_for_an_id_that_is_not_a_task_says_so(cli, service):
    result = cli("wait", str(uuid.uuid4()), fingerprint=None)
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == (
        "error: the generation failed: task not found or expired"
    )


def test_wait_rides_out_an_upstream_that_is_down_when_it_starts(cli, service, upstream):
    """`scenemint wait` makes no first request of its own that could fail it: the wait's
    own polls ride out the upstream's 502s until the task finishes."""
    from tests.test_events import Front

    check_in(service)
    task_id = service.http.post(
        "/api/images/generate", json={"prompt": "a fox", "fingerprint": FINGERPRINT}
    ).json()["data"]["id"]
    upstream.complete_task(task_id)
    front = Front(service.url, "down-first")
    try:
        result = cli(
            "wait", task_id, "--poll-interval", "0.05", "--timeout", "20",
            server=front.url, fingerprint=None,
        )  # fmt: skip
    finally:
        front.close()
    assert result.exit_code == 0, result.stderr
    assert front.polls >= 4


@pytest.mark.parametrize(
    "task_id",
    [
        "abc",
        "../x",
        "0f74000f",
        "{00000000-0000-4000-8000-000000000000}",
        "urn:uuid:00000000-0000-4000-8000-000000000000",
        "00000000000040008000000000000000",
    ],
)
def test_wait_for_something_that_is_not_a_task_id_is_invalid_input(cli, service, task_id):
    result = cli("wait", task_id, fingerprint=None)
    assert result.exit_code == 2
    line = one_error_line(result.stderr)
    assert "is not a task id" in line and repr(task_id) in line


def test_a_server_without_an_upstream_is_explained(tmp_path, client_env):
    """The operator forgot the upstream: the user is told what the operator must set."""
    from tests.conftest import make_settings
    from tests.service_runner import running_service

    with running_service(make_settings(tmp_path, None)) as bare:
        check_in(bare)
        result = CliRunner().invoke(
            app,
            ["generate", "a fox", "--server", bare.url, "--fingerprint", FINGERPRINT],
            catch_exceptions=False,
        )
        enhanced = CliRunner().invoke(
            app, ["enhance", "a fox", "--server", bare.url], catch_exceptions=False
        )
    for done in (result, enhanced):
        assert done.exit_code == 1
        line = one_error_line(done.stderr)
        assert "no upstream configured" in line and "CHATGPT2API_BASE_URL" in line, line
    assert "image service" not in one_error_line(enhanced.stderr)


# --------------------------------------------------------------------------- enhance


def test_enhance_prints_the_rewrite(cli, upstream):
    result = cli("enhance", "a lighthouse", "--direction", "creative", fingerprint=None)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "A lighthouse at dusk\n"
    [sent] = upstream.recorded("/v1/chat/completions")
    assert sent.json["temperature"] == 0.7


def test_enhance_streams_to_stdout_as_the_text_arrives(service, upstream, client_env):
    """A real process: its first bytes are out while the upstream still has chunks to send."""
    upstream.chat_chunk_delay = 0.3
    process = subprocess.Popen(
        [sys.executable, "-m", "scenemint", "enhance", "a lighthouse", "--server", service.url],
        env=client_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        first = process.stdout.read1(100)
        sent_then = len(upstream.chunk_sent_times)
        rest, errors = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
    assert first.startswith(b"A ")
    assert sent_then < len(upstream.chat_chunks)
    assert (first + rest).decode() == "A lighthouse at dusk\n"
    assert process.returncode == 0, errors


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "args",
    [("generate", "a lighthouse"), ("enhance", "a lighthouse"), ("credits",)],
    ids=["generate", "enhance", "credits"],
)
def test_an_unreachable_server_is_one_line_and_exit_1(args):
    server = f"http://127.0.0.1:{free_port()}"
    result = CliRunner().invoke(app, [*args, "--server", server], catch_exceptions=False)
    assert result.exit_code == 1
    assert result.stdout == ""
    line = one_error_line(result.stderr)
    assert line == (
        f"error: cannot reach the SceneMint server at {server} (is `scenemint serve` running?)"
    )


def test_no_credits_says_how_to_check_in(cli, service, upstream):
    result = cli("generate", "a lighthouse")
    assert result.exit_code == 1
    line = one_error_line(result.stderr)
    assert "No credits left" in line
    assert f"`scenemint credits --check-in --server {service.url} --fingerprint {FINGERPRINT}`" in (
        line
    )
    assert upstream.recorded("/api/image-tasks") == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("generate", "  "), "error: The prompt must not be empty."),
        (
            ("generate", "x", "--size", "4:3"),
            "error: size must be one of 1:1, 16:9, 9:16 (got '4:3')",
        ),
        (("generate", "x", "--image", "missing.png"), "error: cannot read the reference image"),
        (("enhance", ""), "error: The prompt must not be empty."),
        (("enhance", "x", "--direction", "up"), "error: The direction must be 'details' or"),
        (("credits",), "error: The fingerprint must be 8 to 256 characters"),
    ],
    ids=["empty-prompt", "bad-size", "missing-image", "empty-enhance", "bad-direction", "fp"],
)
def test_invalid_input_is_one_line_and_exit_2(cli, service, upstream, args, message):
    check_in(service)
    fingerprint = {"credits": "short", "enhance": None}.get(args[0], FINGERPRINT)
    result = cli(*args, fingerprint=fingerprint)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert one_error_line(result.stderr).startswith(message)
    assert upstream.recorded("/api/image-tasks") == []
    assert balance(service) == 10


# --------------------------------------------------------------------------- real processes


def test_generate_as_a_subprocess_writes_the_upstream_image(
    service, upstream, client_env, tmp_path
):
    check_in(service)
    upstream.auto_complete = True
    done = scenemint(
        "generate", "a lighthouse", "-o", "real.png", "--server", service.url,
        "--fingerprint", FINGERPRINT, "--poll-interval", "0.05",
        env=client_env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == "real.png\n"
    written = (tmp_path / "real.png").read_bytes()
    [task] = upstream.tasks.values()
    assert written == httpx.get(task["data"][0]["url"]).content


@pytest.mark.parametrize("case", ["unreachable", "no-credits", "empty-prompt"])
def test_error_paths_of_a_real_process_are_one_line(service, client_env, case):
    server = f"http://127.0.0.1:{free_port()}" if case == "unreachable" else service.url
    prompt = "" if case == "empty-prompt" else "a lighthouse"
    done = scenemint(
        "generate", prompt, "--server", server, "--fingerprint", FINGERPRINT, env=client_env
    )
    assert done.returncode == (2 if case == "empty-prompt" else 1)
    assert done.stdout == ""
    line = one_error_line(done.stderr)
    expected = {
        "unreachable": "cannot reach the SceneMint server",
        "no-credits": "scenemint credits --check-in",
        "empty-prompt": "The prompt must not be empty.",
    }[case]
    assert expected in line


def test_quick_start_against_serve_demo(tmp_path, client_env):
    """The README quick start: `serve --demo`, then `credits --check-in` and `generate`."""
    port = free_port()
    server = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        serving = subprocess.Popen(
            [sys.executable, "-m", "scenemint", "serve", "--demo", "--port", str(port)],
            cwd=tmp_path,
            env=client_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_until_up(serving, server, log_path)
        env = {**client_env, "SCENEMINT_SERVER": server}
        checked = scenemint("credits", "--check-in", env=env)
        assert checked.returncode == 0, checked.stderr
        assert "checked in: +10 credits" in checked.stdout
        made = scenemint(
            "generate", "a lighthouse at dusk", "-o", "lighthouse.png", "--poll-interval", "0.2",
            env=env,
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        assert made.stdout == "lighthouse.png\n"
        assert [line.split()[1] for line in made.stderr.splitlines()][-1] == "completed"
    finally:
        serving.terminate()
        serving.wait(15)
    data = (tmp_path / "lighthouse.png").read_bytes()
    picture = Image.open(io.BytesIO(data))
    picture.verify()
    assert picture.format == "PNG"
    assert Image.open(io.BytesIO(data)).size[0] > 100
    assert (tmp_path / "config" / "fingerprint").is_file()


def _wait_until_up(process: subprocess.Popen[bytes], server: str, log_path: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert process.poll() is None, log_path.read_text()
        try:
            if httpx.get(server + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"not up:\n{log_path.read_text()}")
