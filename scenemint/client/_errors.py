"""The client's exception tree. Every error a client method raises on purpose is one of these.

    ClientError                 .code, .message, .status (None: no HTTP answer)
    ├── ConnectionFailed        the server is not reachable, or the connection broke
    ├── InvalidInputError       400 / 413 from the server, or input refused before sending
    ├── NoCreditsError          402: check in first
    ├── NotFoundError           404
    ├── ServerError             5xx, an answer that is not ours, or a stream that broke off
    └── WaitTimeout             `wait()` gave up (also a built-in TimeoutError)

`code` is the server envelope's machine code (`error`) when there was one, else a code of
the client's own (`unreachable`, `invalid_size`, `wait_timeout`, ...). HTTP errors are
mapped to these in one place: `scenemint.client._base.error_for`.
"""

from __future__ import annotations


class ClientError(Exception):
    """A request failed. `message` is meant for people; `code` for programs."""

    def __init__(
        self,
        message: str,
        *,
        code: str,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.retry_after = retry_after  # seconds the server asked us to wait, if it did

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, code={self.code!r}, status={self.status})"


class ConnectionFailed(ClientError):
    """No answer: nothing listens at the server URL, or the connection was lost."""


class InvalidInputError(ClientError):
    """The input was refused: by the server (400, 413) or before anything was sent."""


class NoCreditsError(ClientError):
    """The fingerprint has no credits left (402). `check_in()` grants today's credits."""


class NotFoundError(ClientError):
    """The thing asked for does not exist (404), e.g. the image of an unfinished task."""


class ServerError(ClientError):
    """The server failed (5xx), answered something that is not a SceneMint answer, or
    ended a stream with an error."""


class WaitTimeout(ClientError, TimeoutError):
    """`wait()` ran out of time before the task finished. The task goes on on the server."""
