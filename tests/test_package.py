"""The package's public surface."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

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
