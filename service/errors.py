"""TaskRelay's one error hierarchy.

Every error the service raises on purpose is a :class:`TaskRelayError`. Each carries a stable,
machine-readable ``code``, the HTTP status it maps to and a message written for a person. Errors
from httpx and the database are translated into these at the adapter and store boundaries
(``raise ... from exc``); ``service.app`` turns them into JSON responses in one place.
"""

from __future__ import annotations

from typing import Any


class TaskRelayError(Exception):
    """Base class: ``status`` is the HTTP status, ``code`` a stable identifier for clients."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, details: Any = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}


# --- configuration ----------------------------------------------------------------------------


class SettingsError(TaskRelayError):
    """A configuration value is missing or malformed; start-up stops with this message."""

    code = "invalid_settings"


# --- client errors (4xx) -----------------------------------------------------------------------


class BadRequest(TaskRelayError):
    status = 400
    code = "bad_request"


class ClientGone(BadRequest):
    """The client closed its connection before sending its whole request body: nothing was
    done, and the answer goes nowhere."""

    code = "client_disconnected"


class ValidationFailed(BadRequest):
    """The request body or query does not validate; ``details`` lists each bad field."""

    code = "validation_failed"


class Unauthorized(TaskRelayError):
    status = 401
    code = "unauthorized"


class Forbidden(TaskRelayError):
    status = 403
    code = "forbidden"


class NotFound(TaskRelayError):
    status = 404
    code = "not_found"


class RangeNotSatisfiable(TaskRelayError):
    """A ``Range`` that starts past the end of the file (416); ``size`` goes out in
    ``Content-Range: bytes */size``."""

    status = 416
    code = "range_not_satisfiable"

    def __init__(self, message: str, *, size: int) -> None:
        super().__init__(message)
        self.headers = {"Content-Range": f"bytes */{size}"}


class Conflict(TaskRelayError):
    status = 409
    code = "conflict"


class PayloadTooLarge(TaskRelayError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(TaskRelayError):
    status = 415
    code = "unsupported_media_type"


class Unprocessable(TaskRelayError):
    status = 422
    code = "unprocessable"


class TooManyStreams(TaskRelayError):
    """The client already holds as many open event streams as it may (429); ``retry_after``
    (seconds) becomes the Retry-After header."""

    status = 429
    code = "too_many_streams"

    def __init__(self, message: str, *, retry_after: float, details: Any = None) -> None:
        super().__init__(message, details=details)
        self.retry_after = retry_after


class RateLimited(TaskRelayError):
    """The API client made more requests than TASKRELAY_RATE_LIMIT allows (429);
    ``retry_after`` (seconds) becomes the Retry-After header."""

    status = 429
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: float, details: Any = None) -> None:
        super().__init__(message, details=details)
        self.retry_after = retry_after


# --- callback token errors ---------------------------------------------------------------------


class CallbackTokenInvalid(Unauthorized):
    code = "callback_token_invalid"


class CallbackTokenExpired(Unauthorized):
    code = "callback_token_expired"


class CallbackProviderMismatch(Forbidden):
    code = "callback_provider_mismatch"


class CallbackParseError(BadRequest):
    """A callback body could not be turned into a task update (not JSON, wrong shape)."""

    code = "callback_unparseable"


# --- server-side errors ------------------------------------------------------------------------


class StoreUnavailable(TaskRelayError):
    """The database cannot be reached or refused the write: nothing was recorded. Senders
    are asked to come back in a couple of seconds (Retry-After), which a restarting database
    or a failover usually takes."""

    status = 503
    code = "store_unavailable"
    retry_after = 2.0

    @property
    def reason(self) -> str | None:
        """The database's own error, when known (``details["reason"]``: DeadlockDetected...)."""
        reason = self.details.get("reason") if isinstance(self.details, dict) else None
        return None if reason is None else str(reason)


class StorageFault(StoreUnavailable):
    """The database's storage refused the write: its disk is full, it is read-only, or it
    failed. Nothing was recorded. Unlike a brief outage this lasts until an operator acts, so
    ``retry_after`` asks for a longer wait. A :class:`StoreUnavailable`, so every caller that
    handles an outage (never a 2xx for what was not stored) handles this alike."""

    status = 503
    code = "store_storage_fault"
    retry_after = 30.0


class StoreFull(StorageFault):
    """The disk holding the database (or its quota) is full: 507 Insufficient Storage (RFC
    4918 §11.5), a server error any sender retries, that says exactly what is wrong."""

    status = 507
    code = "store_full"


class StoreReadOnly(StorageFault):
    """The database file, its folder or its file system cannot be written (or a PostgreSQL
    server refuses writes: a standby)."""

    code = "store_read_only"


class StoreIOError(StorageFault):
    """The disk failed a read or a write (an I/O error)."""

    code = "store_io_error"


class ImageStorageFailed(TaskRelayError):
    """An image a provider returned inline could not be written to ``TASKRELAY_FILES_DIR``
    (full, read-only, not a folder). Recorded as the task's error, never an HTTP answer."""

    code = "image_storage_failed"


class StreamCapacityReached(TaskRelayError):
    """This process serves as many open event streams as it may (503): another replica, or
    this one a little later (``retry_after`` seconds), can take the stream."""

    status = 503
    code = "stream_capacity_reached"

    def __init__(self, message: str, *, retry_after: float, details: Any = None) -> None:
        super().__init__(message, details=details)
        self.retry_after = retry_after


# --- upstream provider errors ------------------------------------------------------------------


class ProviderError(TaskRelayError):
    """An upstream provider refused or failed a request.

    ``retryable`` says whether the same request may succeed later (the provider's fault), as
    opposed to the caller's fault, which is final. ``retry_after`` keeps a provider's
    Retry-After hint in seconds. ``ambiguous`` means the request may have been carried out
    even though no usable answer came back (a read timeout, a garbled 2xx): sending it again
    could start a second, paid task.
    """

    status = 502
    code = "upstream_error"
    retryable = False
    ambiguous = False

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        upstream_status: int | None = None,
        retry_after: float | None = None,
        details: Any = None,
        code: str | None = None,
        ambiguous: bool | None = None,
    ) -> None:
        super().__init__(message, details=details, code=code)
        if ambiguous is not None:
            self.ambiguous = ambiguous
        self.provider = provider
        self.upstream_status = upstream_status
        self.retry_after = retry_after


class UpstreamBadRequest(ProviderError):
    status = 502
    code = "upstream_bad_request"


class UpstreamUnauthorized(ProviderError):
    status = 502
    code = "upstream_unauthorized"


class UpstreamNotFound(ProviderError):
    status = 502
    code = "upstream_not_found"


class UpstreamRateLimited(ProviderError):
    status = 503
    code = "upstream_rate_limited"
    retryable = True


class UpstreamUnavailable(ProviderError):
    status = 503
    code = "upstream_unavailable"
    retryable = True


class ContentPolicyViolation(ProviderError):
    status = 502
    code = "content_policy_violation"


class UpstreamProtocolError(ProviderError):
    """The provider answered, but not in the shape its documentation describes."""

    status = 502
    code = "upstream_protocol_error"
    retryable = True
    ambiguous = True
