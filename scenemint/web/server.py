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
- **request head size**: a head may hold at most `MAX_HEAD_BYTES` (64 KiB, nginx's default
  is four 8 KiB buffers) and its request line a URL of at most `MAX_URL_BYTES` (8 KiB);
  past either the client gets `431` (or `414`) at once and the connection is closed: the
  header deadline limits time, this limits bytes.
- **writing**: a response the client does not take fast enough is cut. While our write
  buffer is full (the client is not reading), the client spends an allowance of
  `SCENEMINT_SEND_TIMEOUT` seconds; every byte it takes earns `1/SCENEMINT_SEND_MIN_RATE`
  seconds back, never more than the whole allowance. No progress for the send timeout, or
  progress slower than the rate for long enough, aborts the connection (nginx's
  `send_timeout` with a rate, so a client reading a few bytes a second cannot hold a file,
  an S3 stream and a slot for ever).
- **keep-alive**: uvicorn's own `timeout_keep_alive`, set to `SCENEMINT_KEEP_ALIVE_TIMEOUT`.
- **connections**: past `SCENEMINT_MAX_CONNECTIONS` open connections of this process, a
  new connection gets `503` with the envelope `too_many_connections` and `Retry-After: 1`
  at once, and is closed (after a short linger that reads and discards its request, so
  that the close does not turn into a reset that loses the answer).

Every place that starts the server builds its options here (`uvicorn_config`,
`uvicorn_options`): `scenemint serve` with one process or several, and the tests.

Closed connections are counted by reason in `scenemint_connections_closed_total`: the app
puts its counter in the lifespan state (`CLOSED_COUNTER`), which uvicorn hands to every
protocol instance.

This layer subclasses uvicorn's protocol classes and uses attributes of theirs that are not
public API (`cycle`, `flow`, `server_state`, `connections`, `url`, `headers`, the parser
callbacks). uvicorn is pinned to the versions it was tested with (`pyproject.toml`), and
`tests/test_server_contract.py` fails loudly, naming what is missing, on a uvicorn whose
internals moved.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import json
import logging
import os
import signal
import socket
import struct
import sys
import threading
import time
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
#: the most a refused head's connection may send after its answer before it is cut off
REFUSED_HEAD_LINGER_BYTES = 1024 * 1024
#: how often a tally of closed or refused connections is logged, at most
TALLY_INTERVAL_SECONDS = 10.0
#: the most bytes a request head may have (request line and headers); past it, 431
MAX_HEAD_BYTES = 64 * 1024
#: the most bytes of a request line's URL; past it, 414
MAX_URL_BYTES = 8 * 1024
# struct tcp_info (linux/tcp.h): u64 tcpi_bytes_acked after 8 u8, 24 u32 and 2 u64 fields
_TCP_INFO_SIZE = 256
_BYTES_ACKED = struct.Struct("=Q")
_BYTES_ACKED_AT = 120
_BYTES_ACKED_END = _BYTES_ACKED_AT + _BYTES_ACKED.size
#: the key under which the app puts its `scenemint_connections_closed` counter in the
#: lifespan state (uvicorn gives that state to every protocol instance)
CLOSED_COUNTER = "scenemint.connections_closed"


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """The deadlines and the cap of client connections (see the module's docstring)."""

    header_timeout: float = 10.0
    body_min_rate: int = 1024
    keep_alive_timeout: float = 5.0
    max_connections: int = 8192
    send_timeout: float = 60.0
    send_min_rate: int = 4096
    max_head_bytes: int = MAX_HEAD_BYTES
    max_url_bytes: int = MAX_URL_BYTES

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        return cls(
            header_timeout=settings.header_timeout,
            body_min_rate=settings.body_min_rate,
            keep_alive_timeout=settings.keep_alive_timeout,
            max_connections=settings.max_connections,
            send_timeout=settings.send_timeout,
            send_min_rate=settings.send_min_rate,
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
        # h11 (the fallback protocol) refuses a head past this with a 400 of its own: ours
        # (431 at MAX_HEAD_BYTES) comes first, whatever one read brings
        "h11_max_incomplete_event_size": MAX_HEAD_BYTES + 256 * 1024,
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
_HEAD_TOO_LARGE = (b"431 Request Header Fields Too Large", "headers_too_large")
_URL_TOO_LONG = (b"414 URI Too Long", "path_too_long")


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

    def __init__(
        self, transport: asyncio.Transport, linger: float, limit: int = REFUSED_LINGER_BYTES
    ) -> None:
        self.transport = transport
        self.received = 0
        self.limit = limit
        self.timer = asyncio.get_running_loop().call_later(linger, transport.close)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self.received > self.limit:
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
        "_head_bytes",
        "_header_timeout",
        "_header_timer",
        "_limits",
        "_phase",
        "_refused",
        "_seconds_per_byte",
        "_send_allowance",
        "_send_paused_at",
        "_send_paused_size",
        "_send_timer",
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
    app_state: dict[str, Any]

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
    _head_bytes: int  # bytes of a head not yet complete
    _refused: tuple[bytes, str] | None  # a head past a limit: answered, nothing more parsed
    _send_allowance: float  # seconds the client may still take to read what we wrote
    _send_paused_at: float  # loop time writing paused (or the last look since); 0: not paused
    _send_paused_size: int  # `_sent_so_far()` then
    _send_timer: asyncio.TimerHandle | None

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
        self._head_bytes = 0
        self._refused = None
        self._send_allowance = limits.send_timeout
        self._send_paused_at = 0.0
        self._send_paused_size = 0
        self._send_timer = None

    def _closed(self, reason: str) -> None:
        """Count a connection this layer closed (`scenemint_connections_closed_total`)."""
        counter = self.app_state.get(CLOSED_COUNTER)
        if counter is not None:
            counter.labels(reason).inc()

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
        self._closed("too_many")
        return True

    # -- the size of a head ------------------------------------------------------------

    def _head_grew(self, size: int) -> None:
        """`size` more bytes of a head that is not complete yet: past the limit, refuse."""
        self._head_bytes += size
        if self._head_bytes > self._limits.max_head_bytes and self._refused is None:
            self._refused = _HEAD_TOO_LARGE

    def _answer_refused_head(self) -> None:
        """Answer a head past a limit (431 or 414) and close: nothing of it reaches the app,
        and the connection reads and throws away what the client still sends, briefly, so
        that the close does not turn into a reset that loses the answer."""
        assert self._refused is not None
        status, code = self._refused
        transport = self.transport
        self._cancel_deadlines()
        self.connections.discard(self)
        self._closed("head_too_large" if code == "headers_too_large" else "url_too_long")
        self._tally.note(
            code,
            logging.WARNING,
            "refused %d request(s) with %s (a head is at most %d bytes, a URL %d)",
            status.decode(),
            self._limits.max_head_bytes,
            self._limits.max_url_bytes,
        )
        if transport.is_closing():
            return
        body = _envelope(code, "The request head is too large.")
        transport.write(_response(status, body, self.server_state.default_headers))
        if transport.can_write_eof():
            transport.write_eof()
        # the rest of a large head (cookies, say) may still be on its way: read it away
        # (thrown away, never kept) so that an honest client gets its answer
        transport.set_protocol(
            _RefusedConnection(
                transport,
                min(REFUSED_LINGER_SECONDS, self._header_timeout),
                limit=REFUSED_HEAD_LINGER_BYTES,
            )
        )

    # -- writing -----------------------------------------------------------------------

    def pause_writing(self) -> None:
        """The transport's buffer is full: the client is not taking what we write. It
        spends its allowance from now (see the module docstring)."""
        self.flow.pause_writing()
        if self._send_paused_at == 0.0:
            self._send_paused_at = self.loop.time()
            self._send_paused_size = self._sent_so_far()
            self._send_timer = self.loop.call_later(max(self._send_allowance, 0.0), self._send_look)

    def resume_writing(self) -> None:
        self._send_account()
        self._send_paused_at = 0.0
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        self.flow.resume_writing()

    def _sent_so_far(self) -> int:
        """A count that grows by the bytes the client takes: what its TCP acknowledged
        (Linux's `tcpi_bytes_acked`: the truth, whatever sits in our buffer, uvloop's or
        the kernel's), else minus our buffer's size (a drop in it is progress)."""
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            try:
                info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
            except (OSError, AttributeError):
                pass
            else:
                if len(info) >= _BYTES_ACKED_END:
                    acked: int = _BYTES_ACKED.unpack_from(info, _BYTES_ACKED_AT)[0]
                    return acked
        return -self.transport.get_write_buffer_size()

    def _send_account(self) -> None:
        """Charge the time paused since the last look, credit the bytes the client took."""
        if self._send_paused_at == 0.0:
            return
        now = self.loop.time()
        size = self._sent_so_far()
        taken = max(0, size - self._send_paused_size)
        allowance = (
            self._send_allowance - (now - self._send_paused_at) + taken / self._limits.send_min_rate
        )
        self._send_allowance = min(allowance, self._limits.send_timeout)
        self._send_paused_at = now
        self._send_paused_size = size

    def _send_look(self) -> None:
        self._send_timer = None
        if self._send_paused_at == 0.0 or self.transport.is_closing():
            return
        self._send_account()
        if self._send_allowance > 0:
            self._send_timer = self.loop.call_later(self._send_allowance, self._send_look)
            return
        self._tally.note(
            "send",
            logging.INFO,
            "cut %d connection(s) that read a response slower than %d bytes/s for %.3g s "
            "(SCENEMINT_SEND_MIN_RATE, SCENEMINT_SEND_TIMEOUT)",
            self._limits.send_min_rate,
            self._limits.send_timeout,
        )
        self._closed("send_timeout")
        # abort, not close: a close waits for our buffer to drain, which this client never
        # lets it do; and a reset (SO_LINGER 0), not a FIN behind the bytes the kernel still
        # queues for it, so that the kernel's memory goes too. The app sees a disconnect.
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

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
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

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
            self._closed("head_timeout")
            if cycle is None or cycle.response_complete:  # not in the middle of an answer
                self.transport.write(self._timeout_response())
        else:
            self._closed("idle")
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
            self._closed("body_rate")
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
    """uvicorn's httptools protocol with deadlines, head limits and a connection cap.

    The size of a head is counted twice: exactly, from the parsed URL and header lines
    (`_head_bytes`, limit `MAX_HEAD_BYTES`), and from the raw reads of a head that is not
    complete yet (`_head_raw`, at most twice the limit: it may also count requests
    pipelined in the same read) — an endless header line is never parsed, but its bytes
    are held by the parser all the same.

    The per-request callbacks call uvicorn's directly, not through `super()`: they run
    for every request, and the poll is most requests."""

    __slots__ = ("_body_read", "_head_raw")
    _body_read: int  # body bytes the current read delivered
    _head_raw: int  # bytes of the reads of a head not yet complete

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._init_deadlines(config)
        self._body_read = 0
        self._head_raw = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if self._refuse_if_full(transport):
            return
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadlines()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        began = self._phase != _HEAD
        self._body_read = 0
        HttpToolsProtocol.data_received(self, data)
        if self._refused is not None:
            self._answer_refused_head()
            return
        # `_after_read`, inlined for the common cases: a read that ends between requests
        # (the whole head of a poll came in one read) arms nothing
        phase = self._phase
        if phase == _HEAD:
            # a head still not complete: the parser holds its bytes (a header line is kept
            # whole until it ends). The read that began it may hold a body's end too: its
            # body bytes do not count
            self._head_raw += len(data) - (self._body_read if began else 0)
            if self._head_raw > 2 * self._limits.max_head_bytes and self._refused is None:
                self._refused = _HEAD_TOO_LARGE
            if self._refused is not None:
                self._answer_refused_head()
                return
        elif phase == _IDLE:
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
        self._head_bytes = 0
        self._head_raw = 0
        HttpToolsProtocol.on_message_begin(self)

    def on_url(self, url: bytes) -> None:
        HttpToolsProtocol.on_url(self, url)
        if len(self.url) > self._limits.max_url_bytes and self._refused is None:
            self._refused = _URL_TOO_LONG

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._refused is not None:
            return  # refused: nothing more is kept
        self._head_grew(len(name) + len(value) + 4)  # "name: value\r\n"
        HttpToolsProtocol.on_header(self, name, value)

    def on_headers_complete(self) -> None:
        if self._refused is not None:
            return  # answered by data_received: no request for the app
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
        if self._refused is not None:
            return
        self._body_read += len(body)
        self._credit_body(len(body))
        super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused is not None:
            return
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
        if self._phase != _GONE and self.conn.their_state is h11.IDLE:
            buffered = self.conn.trailing_data[0]
            if len(buffered) + len(data) > self._limits.max_head_bytes:
                # rare (a head this large is odd): find where the head ends, if it does
                head = bytes(buffered) + data
                end = head.find(b"\r\n\r\n", 0, self._limits.max_head_bytes + 4)
                if end < 0:
                    first_line = head.split(b"\r\n", 1)[0]
                    too_long = b"\r\n" not in head[: self._limits.max_url_bytes + 64]
                    self._refused = (
                        _URL_TOO_LONG
                        if too_long and len(first_line) > self._limits.max_url_bytes
                        else _HEAD_TOO_LARGE
                    )
                    self._answer_refused_head()
                    return
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


# -- the workers of `scenemint serve --workers N` -------------------------------------------

SUPERVISOR_ENV = "SCENEMINT_SUPERVISOR_PID"  # set by `serve --workers N` for its workers
SUPERVISOR_CHECK_SECONDS = 1.0


def follow_supervisor() -> None:
    """In a worker of `serve --workers N`: stop (gracefully, as on SIGTERM) when the
    supervisor that started it is gone. A supervisor killed outright (SIGKILL, the OOM
    killer) cannot stop its workers; without this they would go on serving, holding the
    port, and a restarted service could not bind it. Anything else (a plain `uvicorn
    --factory`, tests) has no supervisor to follow: nothing is done."""
    supervisor = os.environ.get(SUPERVISOR_ENV, "")
    if not supervisor.isdigit() or int(supervisor) != os.getppid():
        return

    def watch() -> None:
        while os.getppid() == int(supervisor):
            time.sleep(SUPERVISOR_CHECK_SECONDS)
        log.warning("the supervisor (pid %s) is gone: this worker stops", supervisor)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="scenemint-supervisor", daemon=True).start()
