"""The exception tree. Every error the service raises on purpose is one of these.

    ScenemintError                  code            status
    ├── BadRequest                  (various)       400
    ├── NoCredits                   no_credits      402
    ├── NotFound                    not_found       404
    ├── PayloadTooLarge             (various)       413
    ├── UpstreamError               upstream_failed 502
    │   ├── UpstreamTimeout         upstream_timeout 504
    │   └── UpstreamUnavailable     upstream_unavailable 503  (wrong key, circuit open)
    ├── NotConfigured               upstream_not_configured 503
    └── NotReady                    not_ready       503  (readiness: the database is down)

`code` is the machine code clients see in the envelope's `error` field; the
human message is looked up by code in `scenemint.messages` in the caller's
language. `detail` is for the log only and never reaches a client.
"""

from __future__ import annotations


class ScenemintError(Exception):
    code: str = "internal_error"
    status: int = 500

    def __init__(self, code: str | None = None, *, detail: str = "") -> None:
        if code is not None:
            self.code = code
        self.detail = detail
        super().__init__(f"{self.code}: {detail}" if detail else self.code)


class BadRequest(ScenemintError):
    code = "bad_request"
    status = 400


class NoCredits(ScenemintError):
    code = "no_credits"
    status = 402


class NotFound(ScenemintError):
    code = "not_found"
    status = 404


class PayloadTooLarge(ScenemintError):
    code = "payload_too_large"
    status = 413


class UpstreamError(ScenemintError):
    """The upstream failed us.

    `ambiguous` is True when the request may have reached the upstream and been
    acted on (a timeout or a reset after sending, a 2xx we could not read): a
    submission in that state is neither refunded nor retried blindly.
    """

    code = "upstream_failed"
    status = 502

    def __init__(
        self,
        code: str | None = None,
        *,
        detail: str = "",
        ambiguous: bool = False,
        upstream_status: int | None = None,
    ) -> None:
        super().__init__(code, detail=detail)
        self.ambiguous = ambiguous
        self.upstream_status = upstream_status
        self.retryable = False


class UpstreamTimeout(UpstreamError):
    code = "upstream_timeout"
    status = 504


class UpstreamUnavailable(UpstreamError):
    code = "upstream_unavailable"
    status = 503


class NotConfigured(ScenemintError):
    code = "upstream_not_configured"
    status = 503


class NotReady(ScenemintError):
    code = "not_ready"
    status = 503
