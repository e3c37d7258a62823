"""Domain errors; the API layer maps each to its gRPC status code."""


class CoreError(Exception):
    """Base of errors a caller caused (as opposed to engine faults)."""


class InvalidArgument(CoreError):
    pass


class NotFound(CoreError):
    pass


class AlreadyExists(CoreError):
    pass


class FailedPrecondition(CoreError):
    pass


class ResourceExhausted(CoreError):
    pass
