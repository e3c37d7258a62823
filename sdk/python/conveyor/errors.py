"""Exceptions raised by the SDK."""

from __future__ import annotations

import functools

import grpc

from .error_details import ErrorDetails, FieldViolation, details_of


class ConveyorError(Exception):
    """Base class of every Conveyor SDK error."""


class UnencodableValue(ConveyorError, TypeError):
    """A Python value has no wire form (see conveyor.values)."""


class TaskFailed(ConveyorError):
    """A task ended in FAILURE, CANCELLED or EXPIRED; raised by AsyncResult-style helpers."""

    def __init__(self, task_id: str, state: str, error_type: str, message: str, traceback: str = "") -> None:
        super().__init__(f"task {task_id} ended {state}: {error_type}: {message}")
        self.task_id = task_id
        self.state = state
        self.error_type = error_type
        self.message = message
        self.traceback = traceback


class ResultIgnored(ConveyorError):
    """A task submitted with ignore_result ended SUCCESS, but its value was not stored, so there
    is no result to return; wait for its state instead (`Submitted.state()`, `get_result`)."""

    def __init__(self, task_id: str) -> None:
        super().__init__(f"task {task_id} ignores its result (submitted with ignore_result): its value was not "
                         "stored; wait for its state with get_result() or Submitted.state() instead")
        self.task_id = task_id


class Retry(ConveyorError):
    """Raise inside a task to run it again after `delay` seconds (bounded by max attempts)."""

    def __init__(self, delay: float = 0.0, reason: str = "") -> None:
        super().__init__(reason or f"retry requested in {delay} s")
        self.delay = delay
        self.reason = reason


class Reject(ConveyorError):
    """Raise inside a task to refuse it (Celery's `Reject`). requeue=False: the task fails for
    good with a "Rejected" error, never retried (on_error callbacks run; it is a dead letter).
    requeue=True: it goes back to its queue and the same attempt runs again later, on any
    worker; not a failure, but a task requeued 10 times fails with "Rejected"."""

    def __init__(self, reason: str = "", requeue: bool = False) -> None:
        super().__init__(reason or ("requeued by the task" if requeue else "rejected by the task"))
        self.reason = reason
        self.requeue = requeue


class TaskCancelled(ConveyorError):
    """Raised inside a sync task (via Context.check_cancelled) once the task was cancelled."""


class TimeLimitExceeded(ConveyorError):
    """The task ran past its time limit."""


class SoftTimeLimitExceeded(ConveyorError):
    """Raised inside a task that ran past its soft time limit; catch it to clean up before the
    hard limit (`time_limit`) stops the task. Uncaught, the attempt fails with this error."""


class WorkerLost(ConveyorError):
    """The process running a task died before the task ended (the error type of that attempt)."""


class RpcFailed(ConveyorError, grpc.aio.AioRpcError):
    """A call the server (or the network) refused, after any retries. Still a
    grpc.aio.AioRpcError: `.code()`, `.details()` and `.trailing_metadata()` work as before.
    Its subclasses name the usual codes; other codes raise RpcFailed itself."""

    def __str__(self) -> str:
        return f"{self.code().name}: {self.details()}"

    @functools.cached_property
    def error_details(self) -> ErrorDetails:
        """The google.rpc details of the status (docs/errors.md); empty without any."""
        return details_of(self)

    @property
    def reason(self) -> str:
        """ErrorInfo.reason: the stable UPPER_SNAKE code of this kind of error ("" without one)."""
        return self.error_details.reason

    @property
    def metadata(self) -> dict[str, str]:
        """ErrorInfo.metadata: ids that help, such as task_id or queue."""
        return self.error_details.metadata

    @property
    def field_violations(self) -> tuple[FieldViolation, ...]:
        """BadRequest's field violations (INVALID_ARGUMENT): which request field, and why."""
        return self.error_details.field_violations

    @property
    def retry_after(self) -> float | None:
        """Seconds the server asks to wait before retrying (RetryInfo), or None without a hint."""
        return self.error_details.retry_after


class TaskNotFound(RpcFailed):
    """NOT_FOUND: no task, workflow or other record with that id or name."""


class InvalidArgument(RpcFailed):
    """INVALID_ARGUMENT: the request is malformed; details() says which field and why."""


class AlreadyExists(RpcFailed):
    """ALREADY_EXISTS: a task with that id was already stored."""


class FailedPrecondition(RpcFailed):
    """FAILED_PRECONDITION: the request is valid but not in the record's current state."""


class PermissionDenied(RpcFailed):
    """PERMISSION_DENIED or UNAUTHENTICATED: the token is missing, wrong or lacks the scope."""


class ResourceExhausted(RpcFailed):
    """RESOURCE_EXHAUSTED: over a limit (size, rate, admission); the server may say when to retry."""


class Unavailable(RpcFailed):
    """UNAVAILABLE or DEADLINE_EXCEEDED: the server, its broker or backend stayed out of reach."""


_BY_CODE: dict[grpc.StatusCode, type[RpcFailed]] = {
    grpc.StatusCode.NOT_FOUND: TaskNotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
}


def rpc_failed(error: grpc.aio.AioRpcError) -> RpcFailed:
    """The SDK's exception for a gRPC error: the class of its code, carrying the same status."""
    if isinstance(error, RpcFailed):
        return error
    kind = _BY_CODE.get(error.code(), RpcFailed)
    return kind(error.code(), error.initial_metadata(), error.trailing_metadata(), error.details(),
                error.debug_error_string())
