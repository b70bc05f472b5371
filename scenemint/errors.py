"""The exception tree. Every error the service raises on purpose is one of these.

    ScenemintError                  code            status
    ├── BadRequest                  (various)       400
    ├── NoCredits                   no_credits      402
    ├── NotFound                    not_found       404
    ├── Conflict                    (various)       409  (idempotency keys)
    ├── PayloadTooLarge             (various)       413
    ├── UpstreamError               upstream_failed 502
    │   ├── UpstreamTimeout         upstream_timeout 504
    │   └── UpstreamUnavailable     upstream_unavailable 503  (wrong key, circuit open)
    ├── NotConfigured               upstream_not_configured 503
    ├── StoreUnavailable            store_unavailable 503  (the database failed; Retry-After)
    ├── StoreRejected               store_rejected  400  (the database refused the data itself)
    ├── ImageStoreUnavailable       image_store_unavailable 503  (the image store failed)
    │   └── ImageMissing            image_store_unavailable 503  (an image it should have)
    ├── Gone                        image_expired   410  (deleted by the retention rule)
    └── NotReady                    not_ready       503  (readiness: the database is down)

`code` is the machine code clients see in the envelope's `error` field; the
human message is looked up by code in `scenemint.messages` in the caller's
language. `detail` is for the log only and never reaches a client. `retry_after`
(seconds), when set, is sent as the `Retry-After` header and in the envelope; `limit`
(bytes), when set, is said in the message and sent in the envelope (what was too large).
"""

from __future__ import annotations


class ScenemintError(Exception):
    code: str = "internal_error"
    status: int = 500
    retry_after: float | None = None
    limit: int | None = None

    def __init__(
        self,
        code: str | None = None,
        *,
        detail: str = "",
        retry_after: float | None = None,
        limit: int | None = None,
    ) -> None:
        if code is not None:
            self.code = code
        self.detail = detail
        if retry_after is not None:
            self.retry_after = retry_after
        self.limit = limit
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


class Conflict(ScenemintError):
    code = "conflict"
    status = 409


class PayloadTooLarge(ScenemintError):
    code = "payload_too_large"
    status = 413


class UpstreamError(ScenemintError):
    """The upstream failed us.

    `ambiguous` is True when the request may have reached the upstream and been
    acted on (a 5xx, a timeout or a reset after sending, a 2xx we could not read): a
    submission in that state is never refunded on the spot. `retryable` says that trying
    again may help; `reason` is the metric label of the failure (connect, timeout, ...).
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
        reason: str = "",
        retryable: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(code, detail=detail, retry_after=retry_after)
        self.ambiguous = ambiguous
        self.upstream_status = upstream_status
        self.reason = reason
        self.retryable = retryable
        # what an OpenAI-style error object said: its code (or type) and message
        self.upstream_code: str | None = None
        self.upstream_message: str | None = None


class UpstreamTimeout(UpstreamError):
    code = "upstream_timeout"
    status = 504


class UpstreamUnavailable(UpstreamError):
    code = "upstream_unavailable"
    status = 503


class NotConfigured(ScenemintError):
    code = "upstream_not_configured"
    status = 503


class StoreUnavailable(ScenemintError):
    """The database failed (unreachable, connection lost, disk full): try again shortly."""

    code = "store_unavailable"
    status = 503
    retry_after = 2.0


class StoreRejected(ScenemintError):
    """The database refused the data of a request (input validation should have caught it:
    nothing was written)."""

    code = "store_rejected"
    status = 400


class ImageStoreUnavailable(ScenemintError):
    """The image store failed (a full or read-only disk, an unreachable bucket)."""

    code = "image_store_unavailable"
    status = 503
    retry_after = 2.0


class ImageMissing(ImageStoreUnavailable):
    """The image store has no object for an image the ledger says is stored. The service
    looks again (`ImageService.image_missing`): the retention sweep may have deleted it."""

    def __init__(self, task_id: str, *, detail: str) -> None:
        super().__init__(detail=detail)
        self.task_id = task_id


class Gone(ScenemintError):
    code = "image_expired"
    status = 410


class NotReady(ScenemintError):
    code = "not_ready"
    status = 503
