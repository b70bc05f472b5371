"""SceneMint: a careful, credit-limited gateway for AI image generation.

The library API, usable without the web layer:

    Settings        scenemint.config     every setting, read once from the environment
    open_router     scenemint.service    the configured upstreams, opened (all HTTP upstream)
    ImageService    scenemint.service    generate, get a task, open its image, enhance
    open_store      scenemint.store      credits and the task ledger (SQLite, PostgreSQL)
    create_app      scenemint.web.app    the FastAPI app (what `scenemint serve` runs)

The errors are in `scenemint.errors`; the HTTP client for the service is
`scenemint.client`. Names load on first use, so `import scenemint.client` does not
pull in the server's dependencies.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "ImageService": "scenemint.service",
    "Settings": "scenemint.config",
    "create_app": "scenemint.web.app",
    "open_router": "scenemint.service",
    "open_store": "scenemint.store",
}

__all__ = ["ImageService", "Settings", "__version__", "create_app", "open_router", "open_store"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'scenemint' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
