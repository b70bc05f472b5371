"""The package's public surface."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx

import scenemint


def test_public_names_are_sorted_and_all_resolve():
    assert scenemint.__all__ == sorted(scenemint.__all__)
    for name in scenemint.__all__:
        assert getattr(scenemint, name) is not None


def test_version_matches_the_project_metadata():
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert scenemint.__version__ == project["project"]["version"]


def test_the_client_does_not_import_the_server():
    """`import scenemint.client` stays light: no FastAPI, aiohttp or database driver."""
    code = (
        "import sys, scenemint.client; "
        "print(sorted(m for m in ('fastapi', 'aiohttp', 'psycopg', 'uvicorn') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_readme_documents_every_setting():
    from scenemint.config import Settings

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for field in Settings.model_fields.values():
        for alias in field.validation_alias.choices:  # type: ignore[union-attr]
            assert f"`{alias}`" in readme, f"{alias} is not in the README's configuration table"


def test_the_metadata_builds_without_a_deprecation_warning(tmp_path):
    """The license is an SPDX expression with its file (the `{ text = ... }` table is
    deprecated by setuptools, with a deadline); the project's metadata builds clean."""
    root = Path(__file__).parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT" and (root / "LICENSE").is_file()
    code = (
        "import sys, warnings; warnings.simplefilter('error');"
        "from setuptools import build_meta;"
        "print(build_meta.prepare_metadata_for_build_wheel(sys.argv[1]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    metadata = next(tmp_path.glob("*.dist-info")) / "METADATA"
    assert "License-Expression: MIT" in metadata.read_text()


def readme_python_blocks() -> list[str]:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    return re.findall(r"^```python\n(.*?)^```$", readme, flags=re.DOTALL | re.MULTILINE)


def test_the_readme_library_example_runs_as_written(upstream, tmp_path):
    """The README's example of the service as a library, run as a program of its own
    against a real (fake) upstream: it makes the task, waits for it, writes the image."""
    [example] = [block for block in readme_python_blocks() if "open_service" in block]
    (tmp_path / "example.py").write_text(example)
    upstream.auto_complete = True
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("SCENEMINT_", "CHATGPT2API_"))
    }
    env.update(
        CHATGPT2API_BASE_URL=upstream.base_url,
        CHATGPT2API_API_KEY=upstream.api_key,
        SCENEMINT_DATA_DIR=str(tmp_path / "data"),
    )
    done = subprocess.run(
        [sys.executable, "example.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "Unclosed" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert done.stdout.splitlines()[-1] == "completed lighthouse.png"
    [task] = upstream.tasks.values()
    served = httpx.get(task["data"][0]["url"]).content
    assert (tmp_path / "lighthouse.png").read_bytes() == served
