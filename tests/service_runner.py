"""Run the real app on a loopback port in a background thread (uvicorn, its own event loop)."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn

from scenemint.config import Settings
from scenemint.web.app import create_app
from scenemint.web.server import uvicorn_config


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RunningService:
    """A started service: `url`, an `http` client, and its `app` (for `app.state.service`).

    The server is configured as `scenemint serve` configures it (`uvicorn_config`: the
    connection deadlines and cap of `settings`); `server_options` override uvicorn options
    (e.g. `http=GuardedH11Protocol`)."""

    def __init__(self, settings: Settings, *, demo: bool = False, **server_options: Any) -> None:
        self.settings = settings
        self.app = create_app(settings, demo=demo)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn_config(
            self.app,
            settings,
            host="127.0.0.1",
            port=self.port,
            lifespan="on",
            timeout_graceful_shutdown=2,
            **server_options,
        )
        self.server = uvicorn.Server(config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="service")
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        try:
            loop.run_until_complete(self.server.serve())
        finally:
            loop.close()

    def start(self) -> RunningService:
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("service did not start")
            time.sleep(0.01)
        # the start-up reconcile round has run: a test's own requests never race with it
        while self.app.state.reconciler.rounds < 1:
            if time.monotonic() > deadline:
                raise RuntimeError("the start-up reconcile round did not finish")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.http.close()
        self.server.should_exit = True
        self._thread.join(timeout=15)

    def run(self, coro: Any, timeout: float = 30) -> Any:
        """Run a coroutine on the service's loop (to reach its store or reconciler)."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def service(self) -> Any:
        return self.app.state.service


@contextmanager
def running_service(
    settings: Settings, *, demo: bool = False, **server_options: Any
) -> Iterator[RunningService]:
    running = RunningService(settings, demo=demo, **server_options).start()
    try:
        yield running
    finally:
        running.stop()


class LogCapture(logging.Handler):
    """Every formatted log line of the process, to check what was (not) logged."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def text(self) -> str:
        return "\n".join(self.lines)


class ServiceProcess:
    """`scenemint serve` as a real subprocess (for crash and multi-instance tests)."""

    def __init__(
        self, env: dict[str, str], *, cwd: str, port: int | None = None, args: tuple[str, ...] = ()
    ) -> None:
        import os
        import subprocess
        import sys

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, **env, "HOST": "127.0.0.1", "PORT": str(self.port)}
        self.log_path = f"{cwd}/service-{self.port}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "scenemint", "serve", *args],
            env=full_env,
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 20) -> ServiceProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"service exited early:\n{self.log()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"service not ready:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        with open(self.log_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def kill(self) -> None:
        """SIGKILL: no shutdown, no cleanup — a crash."""
        self.process.kill()
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except Exception:
                self.process.kill()
                self.process.wait(5)
        self._log.close()
