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


def check_in(running: RunningService, fingerprint: str = FINGERPRINT) -> int:
    answer = running.http.post("/api/quota/check-in", json={"fingerprint": fingerprint})
    assert answer.status_code == 200, answer.text
    return int(answer.json()["data"]["balance"])


def balance(running: RunningService, fingerprint: str = FINGERPRINT) -> int:
    answer = running.http.post("/api/quota/status", json={"fingerprint": fingerprint})
    assert answer.status_code == 200, answer.text
    return int(answer.json()["data"]["balance"])
