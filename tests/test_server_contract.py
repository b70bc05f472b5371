"""What `scenemint/web/server.py` takes from uvicorn beyond its public API, checked by name.

Our connection layer subclasses uvicorn's protocol classes and reads attributes of theirs
(and of their request cycle) that uvicorn does not promise to keep. uvicorn is pinned in
`pyproject.toml` to the minor version these tests passed with; when it is moved on, this
file says exactly what the new version no longer has, instead of a deadline that silently
stops working. The behaviour itself is tested in `test_connections.py`.
"""

from __future__ import annotations

import asyncio
import re
import tomllib
from importlib.metadata import version
from pathlib import Path
from typing import Any

import h11
import pytest
import uvicorn
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.h11_impl import RequestResponseCycle as H11Cycle
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle as HttpToolsCycle
from uvicorn.server import ServerState

from scenemint.web.server import GuardedH11Protocol, GuardedHttpToolsProtocol, uvicorn_config

# methods we override or call, by class
PROTOCOL_METHODS = (
    "connection_made",
    "connection_lost",
    "data_received",
    "pause_writing",
    "resume_writing",
    "handle_websocket_upgrade",
)
HTTPTOOLS_CALLBACKS = (
    "on_message_begin",
    "on_url",
    "on_header",
    "on_headers_complete",
    "on_body",
    "on_message_complete",
)
# attributes of a protocol instance after connection_made
PROTOCOL_ATTRIBUTES = (
    "transport",
    "loop",
    "flow",
    "cycle",
    "server_state",
    "connections",
    "app_state",
    "headers",
)
# attributes of a request cycle (the response in flight)
CYCLE_ATTRIBUTES = (
    "scope",
    "send",
    "disconnected",
    "keep_alive",
    "message_event",
    "response_started",
    "response_complete",
    "waiting_for_100_continue",
)
# and of httptools' cycle, for the zero-copy file send (only on that protocol)
ZEROCOPY_CYCLE_ATTRIBUTES = ("expected_content_length",)


def pinned_range() -> tuple[str, str]:
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    for requirement in project["project"]["dependencies"]:
        if requirement.startswith("uvicorn"):
            found = re.search(r">=([\d.]+),<([\d.]+)", requirement)
            assert found, f"uvicorn is not pinned to a range in pyproject.toml: {requirement}"
            return found.group(1), found.group(2)
    raise AssertionError("uvicorn is not a dependency")


def as_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def test_the_installed_uvicorn_is_the_pinned_one():
    low, high = pinned_range()
    installed = version("uvicorn")
    assert as_tuple(low) <= as_tuple(installed) < as_tuple(high), (
        f"uvicorn {installed} is outside {low} <= v < {high}, the versions "
        "scenemint/web/server.py was tested with: run this file and test_connections.py on it,"
        " then move the pin"
    )


@pytest.mark.parametrize("base", [HttpToolsProtocol, H11Protocol], ids=lambda base: base.__name__)
def test_the_protocol_methods_we_override_exist(base: type) -> None:
    missing = [name for name in PROTOCOL_METHODS if not callable(getattr(base, name, None))]
    if base is HttpToolsProtocol:
        missing += [n for n in HTTPTOOLS_CALLBACKS if not callable(getattr(base, n, None))]
    assert not missing, f"uvicorn {uvicorn.__version__}: {base.__name__} lost {missing}"


def test_flow_control_has_what_we_use():
    missing = [
        name
        for name in ("read_paused", "write_paused", "drain", "pause_writing", "resume_writing")
        if not hasattr(FlowControl(_FakeTransport()), name)  # type: ignore[arg-type]
    ]
    assert not missing, f"uvicorn {uvicorn.__version__}: FlowControl lost {missing}"


class _FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = b""
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5000), "sockname": ("127.0.0.1", 3000)}.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass


@pytest.mark.parametrize(
    ("protocol", "cycle"),
    [(GuardedHttpToolsProtocol, HttpToolsCycle), (GuardedH11Protocol, H11Cycle)],
    ids=["httptools", "h11"],
)
def test_a_request_in_flight_has_every_attribute_we_read(tmp_path, protocol, cycle) -> None:
    """One request through a real protocol instance, on a fake transport: the instance and
    its cycle have what the deadlines read and write."""
    from tests.conftest import make_settings

    async def run() -> None:
        done = asyncio.Event()

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await done.wait()  # stays in flight while we look at its cycle
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        config = uvicorn_config(app, make_settings(tmp_path, None), lifespan="off")
        config.load()
        instance = protocol(config=config, server_state=ServerState(), app_state={})
        transport = _FakeTransport()
        instance.connection_made(transport)
        instance.data_received(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        await asyncio.sleep(0)
        missing = [name for name in PROTOCOL_ATTRIBUTES if not hasattr(instance, name)]
        assert not missing, f"uvicorn {uvicorn.__version__}: {protocol.__name__} lost {missing}"
        assert isinstance(instance.cycle, cycle), type(instance.cycle)
        wanted = CYCLE_ATTRIBUTES
        if protocol is GuardedHttpToolsProtocol:
            wanted += ZEROCOPY_CYCLE_ATTRIBUTES
        lost = [name for name in wanted if not hasattr(instance.cycle, name)]
        assert not lost, f"uvicorn {uvicorn.__version__}: its request cycle lost {lost}"
        if protocol is GuardedHttpToolsProtocol:
            assert instance.url == b"/healthz"
        else:
            assert isinstance(instance.conn, h11.Connection)
            assert isinstance(instance.conn.trailing_data[0], bytes | bytearray)
        done.set()
        await asyncio.gather(*(asyncio.all_tasks() - {asyncio.current_task()}))
        assert transport.written.startswith(b"HTTP/1.1 204")
        instance.connection_lost(None)

    asyncio.run(run())
