"""The app factory: settings in, a FastAPI app out; the lifespan opens and closes everything."""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from pydantic import SecretStr
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import __version__
from ..config import Settings
from ..metrics import Metrics
from ..running import open_service
from .envelope import install_error_handlers
from .fastpath import TaskRoutes
from .middleware import RequestLogMiddleware
from .openapi import complete
from .routes import router
from .server import CLOSED_COUNTER, follow_supervisor

log = logging.getLogger("scenemint")


class ServiceApp(FastAPI):
    """The FastAPI app behind two plain ASGI layers: the request log and the poll fast path.

    They sit in front of FastAPI's own middleware stack, not inside it: the task poll is
    most of the traffic, and every framework layer it skips is throughput (see bench/).
    """

    _front: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._front is None:
            framework = super().__call__
            self._front = RequestLogMiddleware(
                TaskRoutes(framework, state=self.state), metrics=self.state.metrics
            )
        await self._front(scope, receive, send)

    def openapi(self) -> dict[str, Any]:
        """FastAPI's document, completed with the task routes and the real answers."""
        if self.openapi_schema is None:
            self.openapi_schema = complete(super().openapi())
        return self.openapi_schema


def create_app(settings: Settings | None = None, *, demo: bool = False) -> ServiceApp:
    """Build the app. With `demo=True` a local demo upstream starts inside the lifespan."""
    base_settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        async with AsyncExitStack() as stack:
            stack.callback(metrics.close)  # the last thing this worker does
            settings = base_settings
            if demo:
                settings = await _start_demo(stack, settings)
            work = await stack.enter_async_context(
                open_service(settings, metrics=metrics, signals=True)
            )
            app.state.service = work.service
            app.state.reconciler = work.reconciler
            app.state.copier = work.copier
            app.state.runners = work.runners
            app.state.sweeper = work.sweeper
            # the lifespan state reaches every connection of the server (web/server.py)
            yield {CLOSED_COUNTER: metrics.connections_closed}

    metrics = Metrics()

    app = ServiceApp(
        title="SceneMint image service",
        version=__version__,
        summary="A credit-limited gateway to AI image generation (chatgpt2api task API or"
        " any OpenAI-compatible Images API).",
        lifespan=lifespan,
        # offline: Swagger UI from the given directory, not from a CDN
        docs_url=None if base_settings.docs_assets else "/docs",
    )
    install_error_handlers(app)
    app.include_router(router)
    if base_settings.docs_assets:
        _serve_docs_from(app, base_settings.docs_assets)
    app.state.metrics = metrics
    return app


def _serve_docs_from(app: FastAPI, directory: Path) -> None:
    """/docs with Swagger UI's files served from `directory` (SCENEMINT_DOCS_ASSETS)."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles

    app.mount("/docs/assets", StaticFiles(directory=directory), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Response:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=f"{app.title} - Swagger UI",
            swagger_js_url="/docs/assets/swagger-ui-bundle.js",
            swagger_css_url="/docs/assets/swagger-ui.css",
            swagger_favicon_url="/docs/assets/favicon-32x32.png",
        )


async def _start_demo(stack: AsyncExitStack, settings: Settings) -> Settings:
    from ..demo import DemoUpstream  # Pillow and the demo's code load only when asked for

    key = secrets.token_urlsafe(24)
    demo = DemoUpstream(port=0, api_key=key)
    await demo.start()
    stack.push_async_callback(demo.stop)
    log.warning(
        "DEMO MODE: images come from a local demo upstream at %s that draws them itself;"
        " no AI is involved",
        demo.base_url,
    )
    return settings.model_copy(
        update={"upstream_base_url": demo.base_url, "upstream_api_key": SecretStr(key)}
    )


def create_app_from_env() -> ServiceApp:
    """Factory for `uvicorn --factory` (used by `scenemint serve --workers N`).

    Each worker is a fresh process: it sets up its own logging.
    """
    from ..logs import configure_logging

    settings = Settings()
    configure_logging(settings)
    follow_supervisor()
    return create_app(settings)
