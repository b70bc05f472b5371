"""The HTTP server: uvicorn, with deadlines on client connections.

uvicorn closes an idle keep-alive connection after a response, but it has no timer from
a connection's opening (or a request's first byte) to its complete head, no minimum rate
for a request body and no cap on open connections: a slowloris client, an idle socket or
a body that stalls after ten bytes is held for as long as the client likes. The protocol
classes here are uvicorn's own (httptools, and h11 as a fallback) with those deadlines:

- **request head**: a connection must deliver a complete request head within
  `SCENEMINT_HEADER_TIMEOUT` seconds of its opening; later requests on a kept-alive
  connection, within that time of their first byte. A request that had begun gets `408`,
  a connection that never sent one is just closed. A head that arrives in one read (almost
  every request) costs no timer at all: one is armed only when a read ends inside a head.
- **request body**: once a head announces a body, the body must keep up
  `SCENEMINT_BODY_MIN_RATE` bytes per second after a grace of the header timeout. The
  client earns `1/rate` seconds per byte, never more than the grace ahead of the clock,
  so it may neither dribble below the rate nor stall for longer than the grace. A client
  too slow gets `408` and is closed. Time in which *we* do not read (uvicorn paused
  reading because the app has not taken the body yet, or the client waits for our
  `100 Continue`) never counts against it.
- **keep-alive**: uvicorn's own `timeout_keep_alive`, set to `SCENEMINT_KEEP_ALIVE_TIMEOUT`.
- **connections**: past `SCENEMINT_MAX_CONNECTIONS` open connections of this process, a
  new connection gets `503` with the envelope `too_many_connections` and `Retry-After: 1`
  at once, and is closed (after a short linger that reads and discards its request, so
  that the close does not turn into a reset that loses the answer).

Every place that starts the server builds its options here (`uvicorn_config`,
`uvicorn_options`): `scenemint serve` with one process or several, and the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import json
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

import h11
import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from ..config import Settings
from ..messages import MESSAGES, message_for, prefers_chinese

log = logging.getLogger("scenemint.connections")

#: how long a refused connection is read (and its bytes thrown away) before it is closed
REFUSED_LINGER_SECONDS = 2.0
#: the most a refused connection may send during its linger before it is cut off
REFUSED_LINGER_BYTES = 64 * 1024
#: how often a tally of closed or refused connections is logged, at most
TALLY_INTERVAL_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """The deadlines and the cap of client connections (see the module's docstring)."""

    header_timeout: float = 10.0
    body_min_rate: int = 1024
    keep_alive_timeout: float = 5.0
    max_connections: int = 8192

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        return cls(
            header_timeout=settings.header_timeout,
            body_min_rate=settings.body_min_rate,
            keep_alive_timeout=settings.keep_alive_timeout,
            max_connections=settings.max_connections,
        )


class ServerConfig(uvicorn.Config):
    """A `uvicorn.Config` that carries the connection limits to the protocol instances."""

    def __init__(self, app: Any, *, limits: ConnectionLimits, **options: Any) -> None:
        super().__init__(app, **options)
        self.connection_limits = limits


def uvicorn_options(settings: Settings, **extra: Any) -> dict[str, Any]:
    """The keyword arguments of `uvicorn.Config` / `uvicorn.run` for this service.

    `extra` wins over the defaults (tests pass `port`, `lifespan`, a shorter graceful
    shutdown). The protocol class is importable, so it works with `workers > 1` too.
    """
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "http": GuardedHttpToolsProtocol,
        "log_config": None,
        "access_log": False,
        "server_header": False,
        # uvicorn annotates it as int; it only ever hands it to loop.call_later
        "timeout_keep_alive": settings.keep_alive_timeout,
        "timeout_graceful_shutdown": 10,
    }
    options.update(extra)
    return options


def uvicorn_config(app: Any, settings: Settings, **extra: Any) -> ServerConfig:
    """A server configuration for `app` (an ASGI app, or an import string with
    `factory=True`) with the connection limits of `settings`."""
    return ServerConfig(
        app, limits=ConnectionLimits.from_settings(settings), **uvicorn_options(settings, **extra)
    )


def run(config: ServerConfig) -> None:
    """Serve `config` in this process until stopped (what `uvicorn.run` does for one
    process, minus building the configuration). Exits with uvicorn's start-up failure
    code when the server did not start."""
    server = uvicorn.Server(config)
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the SIGINT it stopped on
        server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)


def limits_of(config: uvicorn.Config) -> ConnectionLimits:
    """The limits a protocol instance applies: those `config` carries (`uvicorn_config`),
    else (`uvicorn.run(..., http=GuardedHttpToolsProtocol)`, as `serve --workers N` does,
    where each worker builds its app from the environment too) those of the environment,
    read once per process and kept on the configuration."""
    limits = getattr(config, "connection_limits", None)
    if not isinstance(limits, ConnectionLimits):
        limits = ConnectionLimits.from_settings(Settings())
        config.connection_limits = limits  # type: ignore[attr-defined]
    return limits


# -- answers written by the connection layer itself ------------------------------------


def _envelope(code: str, fallback: str, accept_language: str | None = None) -> bytes:
    """The error envelope of `code`: its message from `scenemint.messages` when it has
    one (in the caller's language), else `fallback`."""
    if code in MESSAGES:
        message = message_for(code, chinese=prefers_chinese(accept_language))
    else:
        message = fallback
    return json.dumps({"code": -1, "message": message, "error": code}, ensure_ascii=False).encode()


def _response(
    status: bytes,
    body: bytes,
    default_headers: list[tuple[bytes, bytes]],
    extra: tuple[bytes, ...] = (),
) -> bytes:
    parts = [b"HTTP/1.1 ", status, b"\r\n"]
    for name, value in default_headers:
        parts += [name, b": ", value, b"\r\n"]
    parts += [
        b"content-type: application/json\r\n",
        b"cache-control: no-store\r\n",
        b"content-length: ",
        str(len(body)).encode("ascii"),
        b"\r\n",
        *extra,
        b"connection: close\r\n\r\n",
        body,
    ]
    return b"".join(parts)


_TOO_MANY_BODY = _envelope("too_many_connections", "The server is busy. Please try again shortly.")
_TIMEOUT_FALLBACK = "The request did not arrive in time."


def _header_value(headers: list[tuple[bytes, bytes]] | None, name: bytes) -> str | None:
    for key, value in headers or ():
        if key == name:
            return value.decode("latin-1")
    return None


class _Tally:
    """Counts of closed or refused connections of one server, logged as one line per kind
    at most every `TALLY_INTERVAL_SECONDS` (a flood of hostile clients must not become a
    flood of log lines): the first of a kind at once, the rest summed up when the interval
    has passed."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._pending: dict[str, tuple[int, int, str, tuple[object, ...]]] = {}
        self._logged_at: dict[str, float] = {}
        self._flush: asyncio.TimerHandle | None = None

    def note(self, kind: str, level: int, message: str, *args: object) -> None:
        now = self._loop.time()
        last = self._logged_at.get(kind)
        if last is None or now - last >= TALLY_INTERVAL_SECONDS:
            self._logged_at[kind] = now
            count = self._pending.pop(kind, (0,))[0] + 1
            log.log(level, message, count, *args)
            return
        count = self._pending[kind][0] + 1 if kind in self._pending else 1
        self._pending[kind] = (count, level, message, args)
        if self._flush is None:
            self._flush = self._loop.call_at(last + TALLY_INTERVAL_SECONDS, self._log_pending)

    def _log_pending(self) -> None:
        self._flush = None
        now = self._loop.time()
        for kind, (count, level, message, args) in self._pending.items():
            self._logged_at[kind] = now
            log.log(level, message, count, *args)
        self._pending.clear()


def _tally_of(server_state: ServerState, loop: asyncio.AbstractEventLoop) -> _Tally:
    """The tally of one server (one event loop), kept on its shared state."""
    tally = getattr(server_state, "scenemint_tally", None)
    if not isinstance(tally, _Tally):
        tally = _Tally(loop)
        server_state.scenemint_tally = tally  # type: ignore[attr-defined]
    return tally


class _RefusedConnection(asyncio.Protocol):
    """A connection past the cap, after its 503: read and discard what the client sends
    (its request), close at its end of file, after the linger, or when it sends too much."""

    def __init__(self, transport: asyncio.Transport, linger: float) -> None:
        self.transport = transport
        self.received = 0
        self.timer = asyncio.get_running_loop().call_later(linger, transport.close)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self.received > REFUSED_LINGER_BYTES:
            self.transport.close()

    def eof_received(self) -> bool:
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.timer.cancel()


# -- the deadlines, shared by both protocol classes ------------------------------------

_IDLE = 0  # between requests (or before the first): no head begun
_HEAD = 1  # a request head has begun and is not complete
_BODY = 2  # a head announced a body that is not complete
_GONE = 3  # upgraded to another protocol: nothing of ours applies any more


class _Deadlines:
    """The header timer, the body rate and the connection cap (see the module docstring).

    A mixin in front of a uvicorn protocol class: it uses the attributes those set up.
    Its own live in slots: uvicorn's protocol has 28 attributes already, and past 30 an
    instance's attribute dictionary stops sharing its keys (CPython), which slows every
    attribute access of uvicorn's per-request code by several percent."""

    __slots__ = (
        "_body_deadline",
        "_body_timer",
        "_body_waited",
        "_grace",
        "_header_timeout",
        "_header_timer",
        "_limits",
        "_phase",
        "_seconds_per_byte",
        "_tally",
    )

    # provided by the uvicorn protocol class
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    flow: FlowControl
    cycle: Any
    headers: list[tuple[bytes, bytes]]
    server_state: ServerState
    connections: set[Any]

    _limits: ConnectionLimits
    _tally: _Tally
    _header_timeout: float
    _grace: float
    _seconds_per_byte: float
    _phase: int
    _header_timer: asyncio.TimerHandle | None
    _body_timer: asyncio.TimerHandle | None
    _body_deadline: float
    _body_waited: bool  # the last look found us the slow ones

    def _init_deadlines(self, config: uvicorn.Config) -> None:
        limits = limits_of(config)
        self._limits = limits
        self._tally = _tally_of(self.server_state, self.loop)
        self._header_timeout = limits.header_timeout
        self._grace = limits.header_timeout
        self._seconds_per_byte = 1.0 / limits.body_min_rate
        self._phase = _IDLE
        self._header_timer = None
        self._body_timer = None
        self._body_deadline = 0.0
        self._body_waited = False

    # -- the cap ---------------------------------------------------------------------

    def _refuse_if_full(self, transport: asyncio.Transport) -> bool:
        """Past the cap: answer 503, hand the connection to a lingering closer, True."""
        limit = self._limits.max_connections
        if len(self.connections) < limit:
            return False
        transport.write(
            _response(
                b"503 Service Unavailable",
                _TOO_MANY_BODY,
                self.server_state.default_headers,
                (b"retry-after: 1\r\n",),
            )
        )
        if transport.can_write_eof():
            transport.write_eof()
        transport.set_protocol(
            _RefusedConnection(transport, min(REFUSED_LINGER_SECONDS, self._header_timeout))
        )
        self._tally.note(
            "refused",
            logging.WARNING,
            "refused %d connection(s) with 503: %d open, the most allowed "
            "(SCENEMINT_MAX_CONNECTIONS)",
            limit,
        )
        return True

    # -- timers ----------------------------------------------------------------------

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self._header_timeout, self._header_timed_out)

    def _cancel_header_timer(self) -> None:
        timer = self._header_timer
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _arm_body_timer(self) -> None:
        if self._body_deadline == 0.0:  # no byte of the body yet
            self._body_deadline = self.loop.time() + self._grace
        self._body_timer = self.loop.call_at(self._body_deadline, self._body_timed_out)

    def _cancel_body_timer(self) -> None:
        timer = self._body_timer
        if timer is not None:
            timer.cancel()
            self._body_timer = None

    def _cancel_deadlines(self) -> None:
        self._cancel_header_timer()
        self._cancel_body_timer()

    def _credit_body(self, size: int) -> None:
        """`size` bytes of body arrived: the client earns time, at most the grace ahead."""
        now = self.loop.time()
        deadline = self._body_deadline or now + self._grace
        deadline += size * self._seconds_per_byte
        cap = now + self._grace
        self._body_deadline = deadline if deadline < cap else cap

    def _after_read(self) -> None:
        """After the parser took a read: arm what the connection's state now needs."""
        phase = self._phase
        if phase == _HEAD:
            if self._header_timer is None:
                self._arm_header_timer()
        elif phase == _BODY:
            if self._body_timer is None:
                self._arm_body_timer()
        elif phase == _IDLE and self._header_timer is None:
            # bytes that began no request (blank lines) after the last response: they
            # stopped uvicorn's keep-alive timer, so a head must follow in time
            cycle = self.cycle
            if cycle is not None and cycle.response_complete and not self.transport.is_closing():
                self._arm_header_timer()

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self._phase not in (_IDLE, _HEAD):
            return
        cycle = self.cycle
        if self._phase == _HEAD:
            self._tally.note(
                "head",
                logging.INFO,
                "closed %d connection(s) whose request head took over %.3g s "
                "(SCENEMINT_HEADER_TIMEOUT)",
                self._header_timeout,
            )
            if cycle is None or cycle.response_complete:  # not in the middle of an answer
                self.transport.write(self._timeout_response())
        else:
            self._tally.note(
                "idle",
                logging.INFO,
                "closed %d connection(s) that sent no request within %.3g s "
                "(SCENEMINT_HEADER_TIMEOUT)",
                self._header_timeout,
            )
        self.transport.close()

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if self.transport.is_closing() or self._phase != _BODY:
            return
        now = self.loop.time()
        cycle = self.cycle
        if self.flow.read_paused or (cycle is not None and cycle.waiting_for_100_continue):
            # we are the slow ones (the app has not taken the body, or not asked for it):
            # the client gets a fresh grace once we read again
            self._body_deadline = max(self._body_deadline, now + self._grace)
            self._body_waited = True
        elif self._body_waited:
            # we read again since the last look (a `100 Continue` may have just left): the
            # client's fresh grace counts from now, not from when we began to wait
            self._body_waited = False
            self._body_deadline = max(self._body_deadline, now + self._grace)
        elif now < self._body_deadline:
            pass  # the client earned more time since the timer was armed
        else:
            self._tally.note(
                "body",
                logging.INFO,
                "closed %d connection(s) whose request body came slower than %d bytes/s "
                "(SCENEMINT_BODY_MIN_RATE)",
                self._limits.body_min_rate,
            )
            if cycle is not None and not cycle.response_started:
                # the app sees a disconnect and can no longer answer; the client sees 408
                cycle.disconnected = True
                cycle.keep_alive = False
                cycle.message_event.set()
                self.transport.write(self._timeout_response())
            self.transport.close()
            return
        self._body_timer = self.loop.call_at(self._body_deadline, self._body_timed_out)

    def _timeout_response(self) -> bytes:
        body = _envelope(
            "request_timeout", _TIMEOUT_FALLBACK, _header_value(self.headers, b"accept-language")
        )
        return _response(b"408 Request Timeout", body, self.server_state.default_headers)


class GuardedHttpToolsProtocol(_Deadlines, HttpToolsProtocol):
    """uvicorn's httptools protocol with deadlines and a connection cap.

    The per-request callbacks call uvicorn's directly, not through `super()`: they run
    for every request, and the poll is most requests."""

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._init_deadlines(config)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if self._refuse_if_full(transport):
            return
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadlines()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        HttpToolsProtocol.data_received(self, data)
        # `_after_read`, inlined for the common cases: a read that ends between requests
        # (the whole head of a poll came in one read) arms nothing
        phase = self._phase
        if phase == _IDLE:
            if self._header_timer is None:
                cycle = self.cycle
                if cycle is None or not cycle.response_complete:
                    return
            else:
                return
        self._after_read()

    def handle_websocket_upgrade(self) -> None:
        self._phase = _GONE
        self._cancel_deadlines()
        super().handle_websocket_upgrade()

    # parser callbacks
    def on_message_begin(self) -> None:
        self._phase = _HEAD
        HttpToolsProtocol.on_message_begin(self)

    def on_headers_complete(self) -> None:
        self._phase = _BODY
        self._body_deadline = 0.0
        self._body_waited = False
        if self._header_timer is not None:
            self._cancel_header_timer()
        HttpToolsProtocol.on_headers_complete(self)
        # only images are sent from files: their requests get the zero-copy extension (the
        # request's task is created, not yet started: it will see both)
        scope, cycle = self.scope, self.cycle
        if scope.get("path", "").endswith("/image") and cycle is not None and cycle.scope is scope:
            scope["extensions"] = {ZEROCOPY: {}}
            cycle.send = functools.partial(_send, self, cycle, cycle.send)

    def on_body(self, body: bytes) -> None:
        self._credit_body(len(body))
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._phase = _IDLE
        if self._body_timer is not None:
            self._cancel_body_timer()
        HttpToolsProtocol.on_message_complete(self)


# -- zero-copy file bodies --------------------------------------------------------------

#: the ASGI extension (https://asgi.readthedocs.io/en/latest/extensions.html#zero-copy-send)
ZEROCOPY = "http.response.zerocopysend"
_FALLBACK_CHUNK = 256 * 1024
_CLIENT_GONE = {errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN}


async def _send(protocol: Any, cycle: Any, send: Any, message: dict[str, Any]) -> None:
    if message["type"] == ZEROCOPY:
        await _send_file(protocol, cycle, send, message)
    else:
        await send(message)


async def _send_file(protocol: Any, cycle: Any, send: Any, message: dict[str, Any]) -> None:
    """Write `count` bytes of the open file `file` from `offset` with `os.sendfile`, straight
    from the page cache to the socket, in the event loop's thread and never blocking it.

    uvloop's transports have no `sendfile`: while our bytes are queued in the transport the
    file waits (the write-buffer limits are set to zero, so uvicorn's flow control says when
    the queue is empty); when the socket is full, a chunk is queued the ordinary way, which
    makes the transport wait for the socket to drain. A client that goes away ends it."""
    transport: asyncio.Transport = protocol.transport
    fd, offset = message["file"], int(message.get("offset", 0))
    end = offset + int(message["count"])
    sock = transport.get_extra_info("socket")
    if sock is None or cycle.disconnected:
        return
    sock_fd = sock.fileno()
    transport.set_write_buffer_limits(high=0, low=0)
    try:
        while offset < end and not cycle.disconnected and not transport.is_closing():
            if transport.get_write_buffer_size():
                await protocol.flow.drain()
                continue
            try:
                try:
                    sent = os.sendfile(sock_fd, fd, offset, end - offset)
                except BlockingIOError:
                    chunk = os.pread(fd, min(_FALLBACK_CHUNK, end - offset), offset)
                    if not chunk:
                        break
                    transport.write(chunk)
                    sent = len(chunk)
            except OSError as exc:
                if exc.errno not in _CLIENT_GONE:  # the file's side: a disk error
                    log.warning("sending a file failed after %d bytes: %s", offset, exc)
                cycle.disconnected = True  # the body is cut: the connection ends here
                transport.close()
                return
            if sent == 0:
                break  # the file is shorter than it was said to be
            offset += sent
            cycle.expected_content_length -= sent
    finally:
        if not transport.is_closing():
            transport.set_write_buffer_limits()  # uvicorn's defaults again
    if offset < end:
        if not (cycle.disconnected or transport.is_closing()):  # not the client's doing
            log.warning("a file ended %d bytes short of its length", end - offset)
        cycle.disconnected = True  # the body is cut: the client must see the connection end
        transport.close()
        return
    if not message.get("more_body", False):
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class GuardedH11Protocol(_Deadlines, H11Protocol):
    """uvicorn's h11 protocol (pure Python) with the same deadlines and cap.

    h11 reports no "message begun" event: the state is read after each read instead, and
    a read's whole size counts as body while the client is sending one."""

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._init_deadlines(config)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if self._refuse_if_full(transport):
            return
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadlines()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._phase == _GONE:
            return
        state = self.conn.their_state
        if state is h11.IDLE:
            # a head in progress (or blank lines): either way a head must complete in time
            self._phase = _HEAD if self.conn.trailing_data[0] else _IDLE
            if self._header_timer is None and not self.transport.is_closing():
                self._arm_header_timer()
        elif state is h11.SEND_BODY:
            if self._phase != _BODY:
                self._phase = _BODY
                self._body_deadline = 0.0
                self._body_waited = False
                self._cancel_header_timer()
            self._credit_body(len(data))
            if self._body_timer is None:
                self._arm_body_timer()
        else:
            self._phase = _IDLE
            self._cancel_deadlines()

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        self._phase = _GONE
        self._cancel_deadlines()
        super().handle_websocket_upgrade(event)
