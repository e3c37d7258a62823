"""Domain errors; the API layer maps each to its gRPC status code and rich details
(api/status.py: google.rpc.ErrorInfo, BadRequest, RetryInfo)."""

from __future__ import annotations

from collections.abc import Mapping


class CoreError(Exception):
    """Base of errors the API reports with a status of their own: what a caller caused, and
    `Unavailable` for an engine out of reach (a fault the caller may retry).

    `reason` is the stable UPPER_SNAKE code clients branch on (ErrorInfo.reason; the class's
    `REASON` unless a raise site names a finer one), `metadata` the ids that help (task_id,
    queue, ...), and `field` the request field at fault (BadRequest, for InvalidArgument)."""

    REASON = "INVALID_ARGUMENT"  # as api/status.py reports a CoreError of no known kind

    def __init__(
        self, message: str, *, reason: str = "", metadata: Mapping[str, str] | None = None, field: str = ""
    ) -> None:
        super().__init__(message)
        self.reason = reason or self.REASON
        self.metadata: dict[str, str] = dict(metadata or {})
        self.field = field


class InvalidArgument(CoreError):
    REASON = "INVALID_ARGUMENT"


class NotFound(CoreError):
    REASON = "NOT_FOUND"


class AlreadyExists(CoreError):
    REASON = "ALREADY_EXISTS"


class FailedPrecondition(CoreError):
    REASON = "FAILED_PRECONDITION"


class ResourceExhausted(CoreError):
    """Over a limit for now; `retry_after_seconds` (when set) tells the caller when to retry."""

    REASON = "RESOURCE_EXHAUSTED"

    def __init__(
        self, message: str, retry_after_seconds: float = 0.0, *, reason: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.retry_after_seconds = retry_after_seconds


class PermissionDenied(CoreError):
    REASON = "PERMISSION_DENIED"


class Unavailable(CoreError):
    """A broker or backend is out of reach for now: the caller may retry the same call.

    Raise it where the core knows an engine failed transiently (an engine's own connection
    errors are recognised by `conveyor_server.engine_errors.is_transient` without it)."""

    REASON = "BACKEND_UNAVAILABLE"
