"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fake_upstream import FakeUpstream

# --- fake chatgpt2api upstream (tests/fake_upstream.py) ----------------------------------


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    """A started fake chatgpt2api upstream, stopped after the test."""
    with FakeUpstream() as fake:
        yield fake


# --- end of fake upstream fixtures --------------------------------------------------------


# --- the real service on a loopback port (tests/service_runner.py) -------------------------

import logging  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import httpx  # noqa: E402

from scenemint.config import Settings  # noqa: E402
from tests.service_runner import LogCapture, RunningService, running_service  # noqa: E402

FINGERPRINT = "test-fingerprint-01"


def make_settings(tmp_path: Path, upstream: FakeUpstream | None, **overrides: object) -> Settings:
    """Settings for a test: its own SQLite file, the fake upstream, a quiet reconciler."""
    values: dict[str, object] = {
        "data_dir": tmp_path / "data",
        "reconcile_interval": 3600.0,
        "upstream_base_url": upstream.base_url + "/v1" if upstream else None,
        "upstream_api_key": upstream.api_key if upstream else None,
        "poll_min_interval": 0.0,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture
def logs() -> Iterator[LogCapture]:
    """Captures every log line the process writes during the test."""
    capture = LogCapture()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    try:
        yield capture
    finally:
        root.removeHandler(capture)
        root.setLevel(old_level)


@pytest.fixture
def service(tmp_path: Path, upstream: FakeUpstream, logs: LogCapture) -> Iterator[RunningService]:
    """The real app on a loopback port, wired to the fake upstream and a fresh SQLite file."""
    with running_service(make_settings(tmp_path, upstream)) as running:
        yield running


def assert_envelope(answer: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """A failure in the envelope: the status, code -1, the machine code, a message."""
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = answer.json()
    assert body["code"] == -1, body
    assert body["error"] == code, body
    assert isinstance(body["message"], str) and body["message"], body
    return body


def wait_finished(running: RunningService, task_id: str, timeout: float = 10.0) -> dict[str, Any]:
    """Poll the task until it is completed or failed (its image copied, or given up)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        answer = running.http.get(f"/api/images/tasks/{task_id}")
        assert answer.status_code == 200, answer.text
        task: dict[str, Any] = answer.json()["data"]
        if task["status"] in ("completed", "failed"):
            return task
        if time.monotonic() > deadline:
            raise AssertionError(f"task {task_id} still {task['status']} after {timeout} s")
        time.sleep(0.02)


def check_in(running: RunningService, fingerprint: str = FINGERPRINT) -> int:
    answer = running.http.post("/api/quota/check-in", json={"fingerprint": fingerprint})
    assert answer.status_code == 200, answer.text
    return int(answer.json()["data"]["balance"])


def balance(running: RunningService, fingerprint: str = FINGERPRINT) -> int:
    answer = running.http.post("/api/quota/status", json={"fingerprint": fingerprint})
    assert answer.status_code == 200, answer.text
    return int(answer.json()["data"]["balance"])


# --- databases: every store test runs on SQLite and, when configured, on PostgreSQL -------

import os  # noqa: E402
import uuid  # noqa: E402
from urllib.parse import quote  # noqa: E402

POSTGRES_URL = os.environ.get("SCENEMINT_TEST_POSTGRES_URL", "").strip()
SKIP_POSTGRES = "PostgreSQL tests need SCENEMINT_TEST_POSTGRES_URL (e.g. postgresql://postgres@127.0.0.1:5432/test)"


def postgres_schema_url() -> Iterator[str]:
    """A throwaway schema in the test database; the URL selects it by search_path."""
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    separator = "&" if "?" in POSTGRES_URL else "?"
    try:
        yield f"{POSTGRES_URL}{separator}options={quote(f'-csearch_path={schema}')}"
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database: a SQLite file, then a PostgreSQL schema (skipped when not configured)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.sqlite3'}"
        return
    if not POSTGRES_URL:
        pytest.skip(SKIP_POSTGRES)
    yield from postgres_schema_url()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    if not POSTGRES_URL:
        pytest.skip(SKIP_POSTGRES)
    yield from postgres_schema_url()


# --- a small disk of our own: a tmpfs (needs root; skipped with the reason otherwise) -----

import contextlib  # noqa: E402
import subprocess  # noqa: E402


def mount_tmpfs(target: Path, size: str) -> None:
    target.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({result.stderr.strip()}): needs root")


def remount(target: Path, mode: str) -> None:
    """Make a mounted tmpfs read-only ("ro") or writable again ("rw")."""
    subprocess.run(["mount", "-o", f"remount,{mode}", str(target)], check=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    target = tmp_path / "small-disk"
    mount_tmpfs(target, "4m")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


def fill(disk: Path) -> Path:
    """Fill `disk` up; the file that did it (remove it to free the space)."""
    filler = disk / "filler"
    with open(filler, "wb") as handle, contextlib.suppress(OSError):
        while True:
            handle.write(b"\0" * 65536)
    return filler
