"""Domain errors; the API layer maps each to its gRPC status code."""


class CoreError(Exception):
    """Base of errors the API reports with a status of their own: what a caller caused, and
    `Unavailable` for an engine out of reach (a fault the caller may retry)."""


class InvalidArgument(CoreError):
    pass


class NotFound(CoreError):
    pass


class AlreadyExists(CoreError):
    pass


class FailedPrecondition(CoreError):
    pass


class ResourceExhausted(CoreError):
    """Over a limit for now; `retry_after_seconds` (when set) tells the caller when to retry."""

    def __init__(self, message: str, retry_after_seconds: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class PermissionDenied(CoreError):
    pass


class Unavailable(CoreError):
    """A broker or backend is out of reach for now: the caller may retry the same call.

    Raise it where the core knows an engine failed transiently (an engine's own connection
    errors are recognised by `conveyor_server.engine_errors.is_transient` without it)."""
