"""Server-sent events, decoded as the SSE specification says (not line by line of LF).

A line ends at CR, LF or CRLF; an event is the `data:` lines before a blank line, joined
with LF; comments (`:`) and other fields are ignored. A line longer than `max_line` bytes
is an error, not an unbounded buffer.
"""

from __future__ import annotations


class SSEError(ValueError):
    """The stream is not SSE we can read (a line too long)."""


class SSEDecoder:
    def __init__(self, *, max_line: int = 256 * 1024) -> None:
        self._max_line = max_line
        self._buffer = bytearray()
        self._data: list[bytes] = []
        self._size = 0  # bytes of data in the event being read
        self._after_cr = False  # the last chunk ended with CR: a LF that follows is its pair

    def feed(self, chunk: bytes) -> list[bytes]:
        """The data of every event completed by `chunk`."""
        events: list[bytes] = []
        if self._after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._after_cr = chunk.endswith(b"\r")
        self._buffer += chunk
        lines = bytes(self._buffer).replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        rest = lines.pop()  # the unfinished line
        if len(rest) > self._max_line:
            raise SSEError(f"an SSE line over {self._max_line} bytes")
        self._buffer = bytearray(rest)
        for line in lines:
            if len(line) > self._max_line:
                raise SSEError(f"an SSE line over {self._max_line} bytes")
            self._line(line, events)
        return events

    def close(self) -> list[bytes]:
        """At the end of the stream: the data lines of an event that no blank line closed.

        (The specification drops them; an upstream that ends right after its last `data:`
        line still meant it. A line cut short is passed on as it is: the reader finds it is
        not a whole JSON frame.)"""
        events: list[bytes] = []
        if self._buffer:
            self._line(bytes(self._buffer), events)
        if self._data:
            events.append(b"\n".join(self._data))
        self._data = []
        self._size = 0
        self._buffer.clear()
        return events

    def _line(self, line: bytes, events: list[bytes]) -> None:
        if not line:
            if self._data:
                events.append(b"\n".join(self._data))
                self._data = []
                self._size = 0
            return
        if line.startswith(b":"):
            return
        name, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            self._data.append(value)
            self._size += len(value) + 1
            if self._size > self._max_line:
                raise SSEError(f"an SSE event over {self._max_line} bytes")
