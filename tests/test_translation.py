"""Every foreign exception is translated at the boundary that calls its library.

The list below is the contract: what aiohttp, yarl, JSON decoding and our SSE parser raise
becomes an `UpstreamError` kind (with whether the request may have been acted on), and what
sqlite3, psycopg and psycopg_pool raise becomes a store error. Nothing else crosses.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import aiohttp
import psycopg
import pytest
from aiohttp.http_exceptions import BadStatusLine, LineTooLong
from psycopg_pool import PoolTimeout

from scenemint.config import Settings
from scenemint.errors import (
    StoreRejected,
    StoreUnavailable,
    UpstreamError,
    UpstreamTimeout,
)
from scenemint.store.sql import SQLStore
from scenemint.upstream.config import load_upstreams
from scenemint.upstream.http import UpstreamHTTP
from scenemint.upstream.sse import SSEError


def _connector_error() -> aiohttp.ClientConnectorError:
    key = aiohttp.client_reqrep.ConnectionKey("127.0.0.1", 1, False, True, None, None, None)
    return aiohttp.ClientConnectorError(key, ConnectionRefusedError(111, "refused"))


UPSTREAM_EXCEPTIONS = [
    # (what the library raises, our reason, our class, may the request have been acted on?)
    pytest.param(_connector_error(), "connect", UpstreamError, False, id="refused"),
    pytest.param(aiohttp.ConnectionTimeoutError(), "connect", UpstreamTimeout, False, id="conn-to"),
    pytest.param(TimeoutError(), "timeout", UpstreamTimeout, True, id="timeout"),
    pytest.param(aiohttp.SocketTimeoutError(), "timeout", UpstreamTimeout, True, id="sock-to"),
    pytest.param(aiohttp.ServerDisconnectedError(), "connection", UpstreamError, True, id="disc"),
    pytest.param(aiohttp.ClientPayloadError("cut"), "connection", UpstreamError, True, id="cut"),
    pytest.param(aiohttp.ClientOSError(104, "reset"), "connection", UpstreamError, True, id="os"),
    pytest.param(ConnectionResetError(), "connection", UpstreamError, True, id="reset"),
    pytest.param(LineTooLong(b"x" * 10, 5), "connection", UpstreamError, True, id="line-long"),
    pytest.param(BadStatusLine("HTTP/9"), "connection", UpstreamError, True, id="bad-status"),
    pytest.param(aiohttp.InvalidURL("http://[::1"), "connection", UpstreamError, True, id="url"),
    pytest.param(ValueError("port out of range"), "invalid", UpstreamError, True, id="yarl"),
    pytest.param(json.JSONDecodeError("bad", "x", 0), "invalid", UpstreamError, True, id="json"),
    pytest.param(
        UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"), "invalid", UpstreamError, True, id="utf8"
    ),
    pytest.param(SSEError("line too long"), "invalid", UpstreamError, True, id="sse"),
    # not a library's: a bug. Still translated (and logged with its traceback).
    pytest.param(KeyError("oops"), "internal", UpstreamError, True, id="bug"),
]


@pytest.mark.parametrize(("raised", "reason", "kind", "ambiguous"), UPSTREAM_EXCEPTIONS)
def test_the_upstream_boundary_translates(raised, reason, kind, ambiguous) -> None:
    async def run() -> UpstreamError:
        settings = Settings(
            _env_file=None,  # type: ignore[call-arg]
            upstream_base_url="http://127.0.0.1:1",
            upstream_api_key="k-translation-test-key",
        )
        (upstream,) = load_upstreams(settings)
        http = UpstreamHTTP.open(settings, upstream)
        try:
            with (
                pytest.raises(UpstreamError) as caught,
                http.translated("submit", 0.0, ambiguous_after_send=True),
            ):
                raise raised
            return caught.value
        finally:
            await http.close()

    error = asyncio.run(run())
    assert type(error) is kind
    assert error.reason == reason
    assert error.ambiguous is ambiguous
    assert error.__cause__ is raised
    assert "k-translation-test-key" not in str(error)


STORE_EXCEPTIONS = [
    pytest.param(sqlite3.OperationalError("database is locked"), StoreUnavailable, id="locked"),
    pytest.param(sqlite3.OperationalError("disk I/O error"), StoreUnavailable, id="io"),
    pytest.param(sqlite3.DatabaseError("file is not a database"), StoreUnavailable, id="corrupt"),
    pytest.param(sqlite3.DataError("too big"), StoreRejected, id="sqlite-data"),
    pytest.param(
        UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"),
        StoreRejected,
        id="surrogate",
    ),
    pytest.param(OSError(28, "No space left on device"), StoreUnavailable, id="full"),
    pytest.param(RuntimeError("the pool is closed"), StoreUnavailable, id="closed"),
    pytest.param(MemoryError(), StoreUnavailable, id="memory"),
]


@pytest.mark.parametrize(("raised", "kind"), STORE_EXCEPTIONS)
def test_the_sqlite_store_boundary_translates(tmp_path: Path, raised, kind) -> None:
    async def run() -> Exception:
        store = await SQLStore.open(f"sqlite:///{tmp_path / 's.sqlite3'}")
        try:

            def fail() -> None:
                raise raised

            with pytest.raises(kind) as caught:
                await store._call(fail)
            return caught.value
        finally:
            await store.close()

    error = asyncio.run(run())
    assert error.__cause__ is raised


POSTGRES_EXCEPTIONS = [
    pytest.param(psycopg.OperationalError("server closed the connection"), StoreUnavailable),
    pytest.param(psycopg.errors.AdminShutdown("terminating connection"), StoreUnavailable),
    pytest.param(psycopg.DataError("invalid byte sequence: 0x00"), StoreRejected),
    pytest.param(PoolTimeout("couldn't get a connection"), StoreUnavailable),
]


@pytest.mark.parametrize(("raised", "kind"), POSTGRES_EXCEPTIONS)
def test_the_postgresql_store_boundary_translates(postgres_url: str, raised, kind) -> None:
    async def run() -> Exception:
        store = await SQLStore.open(postgres_url)
        try:

            def fail() -> None:
                raise raised

            with pytest.raises(kind) as caught:
                await store._call(fail)
            return caught.value
        finally:
            await store.close()

    error = asyncio.run(run())
    assert error.__cause__ is raised
