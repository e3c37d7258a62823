"""Maps errors to gRPC status codes, so every refusal carries a clear message and
machine-readable details (docs/errors.md lists the reasons).

- A domain error (`core/errors.py`) gets its own code.
- `Unavailable`, and any engine failure `engine_errors.is_transient` recognises, is UNAVAILABLE:
  the broker or backend is out of reach, and the same call may succeed later.
- Anything else is a bug: logged once here, with its traceback, and reported as UNKNOWN, the
  code gRPC gives an exception a handler lets escape.

Every refusal's trailers carry a google.rpc.Status in `grpc-status-details-bin` (written by
grpcio-status) with an ErrorInfo (a stable reason, domain `conveyor.dev`, metadata such as
task_id or queue); INVALID_ARGUMENT adds a BadRequest field violation, and a refusal with a
retry hint (UNAVAILABLE, RESOURCE_EXHAUSTED) a RetryInfo plus `retry-after-ms`, for clients
without the google.rpc types.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]
from grpc_status import rpc_status

from ..core import errors
from ..engine_errors import transient_cause

log = logging.getLogger(__name__)

CODES: dict[type[errors.CoreError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
}
DOMAIN = "conveyor.dev"
# ErrorInfo.reason of refusals that are not domain errors (those name their own).
BACKEND_UNAVAILABLE = errors.Unavailable.REASON
INTERNAL_ERROR = "INTERNAL_ERROR"
# How long a client should wait before retrying a call that met an unreachable engine.
RETRY_DELAY_MS = 1000
RETRY_AFTER_KEY = "retry-after-ms"
STATUS_DETAILS_KEY = "grpc-status-details-bin"
MAX_CAUSE_CHARS = 500
# Messages call a lone Submit's request "request"; a field path is relative to the request.
SUBMIT_REQUEST = "request."

R = TypeVar("R")
Context = grpc.aio.ServicerContext[Any, Any]
Metadata = tuple[tuple[str, str | bytes], ...]


@dataclass(frozen=True)
class Refusal:
    """How an exception is reported: status code, message, the ErrorInfo reason and metadata,
    the request field at fault (INVALID_ARGUMENT) and a retry hint in ms (0: none)."""

    code: grpc.StatusCode
    message: str
    reason: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    field: str = ""
    retry_after_ms: int = 0

    @property
    def status(self) -> Any:
        """The google.rpc.Status this refusal is sent as (its details: ErrorInfo and more)."""
        details = [error_details_pb2.ErrorInfo(
            reason=self.reason or self.code.name, domain=DOMAIN, metadata=dict(self.metadata),
        )]
        if self.code == grpc.StatusCode.INVALID_ARGUMENT:
            violation = error_details_pb2.BadRequest.FieldViolation(field=self.field, description=self.message)
            details.append(error_details_pb2.BadRequest(field_violations=[violation]))
        if self.retry_after_ms > 0:
            info = error_details_pb2.RetryInfo()
            info.retry_delay.FromMilliseconds(self.retry_after_ms)
            details.append(info)
        number: int = self.code.value[0]
        return status_pb2.Status(code=number, message=self.message, details=[_packed(d) for d in details])

    @property
    def trailing_metadata(self) -> Metadata:
        """The trailers of a unary or streaming call refused this way."""
        sent: grpc.Status = rpc_status.to_status(self.status)
        hint: Metadata = ((RETRY_AFTER_KEY, str(self.retry_after_ms)),) if self.retry_after_ms > 0 else ()
        return (*hint, *sent.trailing_metadata)


def _packed(detail: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(detail)
    return packed


def status_of(exc: errors.CoreError) -> grpc.StatusCode:
    """The gRPC status a refusal is reported with."""
    return CODES.get(type(exc), grpc.StatusCode.INVALID_ARGUMENT)


def refusal(exc: BaseException) -> Refusal | None:
    """The status `exc` is reported with, or None for an unexpected exception (a bug)."""
    if isinstance(exc, errors.CoreError):
        code = status_of(exc)
        message, retry_ms = str(exc), 0
        if code == grpc.StatusCode.UNAVAILABLE:
            message, retry_ms = f"{exc}; retry", RETRY_DELAY_MS
        elif isinstance(exc, errors.ResourceExhausted) and exc.retry_after_seconds > 0:
            retry_ms = max(int(exc.retry_after_seconds * 1000), 1)
        return Refusal(code, message, exc.reason, exc.metadata, exc.field.removeprefix(SUBMIT_REQUEST), retry_ms)
    cause = transient_cause(exc)
    if cause is None:
        return None
    message = f"the broker/backend is unreachable: {_describe(cause)}; retry"
    return Refusal(grpc.StatusCode.UNAVAILABLE, message, BACKEND_UNAVAILABLE, retry_after_ms=RETRY_DELAY_MS)


def unexpected(exc: BaseException, where: str) -> Refusal:
    """Logs a bug once and describes it as gRPC would (UNKNOWN)."""
    log.error("%s failed", where, exc_info=exc)
    return Refusal(grpc.StatusCode.UNKNOWN, f"Unexpected {_describe(exc)}; see the server log", INTERNAL_ERROR)


def _describe(exc: BaseException) -> str:
    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    text = " ".join(str(exc).split())
    if len(text) > MAX_CAUSE_CHARS:
        text = text[:MAX_CAUSE_CHARS] + "..."
    return f"{name}: {text}" if text else name


async def abort(context: Context, exc: BaseException, where: str) -> None:
    """End the call with `exc`'s status (see `refusal`); raises as context.abort does."""
    await refuse(context, refusal(exc) or unexpected(exc, where))


async def refuse(context: Context, reported: Refusal) -> None:
    """End the call as `reported` says, details included; raises as context.abort does."""
    await context.abort(reported.code, reported.message, reported.trailing_metadata)


def unary(
    method: Callable[[Any, Any, Context], Awaitable[R]],
) -> Callable[[Any, Any, Context], Awaitable[R]]:
    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: Context) -> R:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise  # the method ended the call itself
        except Exception as exc:
            await abort(context, exc, method.__qualname__)
            raise  # abort raises; this keeps type checkers honest

    return wrapper


def streaming(
    method: Callable[[Any, Any, Context], AsyncIterator[R]],
) -> Callable[[Any, Any, Context], AsyncIterator[R]]:
    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: Context) -> AsyncIterator[R]:
        try:
            async for item in method(self, request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort(context, exc, method.__qualname__)

    return wrapper
