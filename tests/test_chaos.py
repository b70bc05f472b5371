"""The chaos run (bench/chaos.py) on a small budget: two instances on PostgreSQL, a faulty
upstream, SIGKILLs and terminated database connections; then every credit adds up, no
client got a 500 and no request hung."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
POSTGRES_URL = os.environ.get("SCENEMINT_TEST_POSTGRES_URL", "").strip()

CHAOS_SECONDS = 15  # plus ~5 s of start-up and ~10 s to settle and check


@pytest.mark.skipif(
    not POSTGRES_URL,
    reason="the chaos run needs PostgreSQL: set SCENEMINT_TEST_POSTGRES_URL "
    "(e.g. postgresql://postgres@127.0.0.1:5432/test)",
)
@pytest.mark.timeout(240)
def test_credits_add_up_under_chaos(tmp_path: Path) -> None:
    figures = tmp_path / "chaos.json"
    # its own process group: on a timeout the run and the services it started go together
    process = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "bench" / "chaos.py"),
            "--seconds",
            str(CHAOS_SECONDS),
            "--clients",
            "8",
            "--task-max-age",
            "15",
            "--json",
            str(figures),
            "--workdir",
            str(tmp_path / "work"),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=200)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"the chaos run did not finish in 200 s:\n{output}")
    assert figures.exists(), output
    result = json.loads(figures.read_text())
    assert process.returncode == 0, output
    assert result["ok"] and not result["violations"], output
    summary = result["summary"]
    # the run really was chaotic, and really did work
    assert summary["kills"] >= 1, output
    assert summary["terminate_rounds"] >= 1 and summary["backends_terminated"] >= 1, output
    assert summary["tasks_received"] >= 10, output
    assert summary["upstream"].get("submit.drop_after", 0) >= 1, output
