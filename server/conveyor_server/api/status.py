"""Maps errors to gRPC status codes, so every refusal carries a clear message.

- A domain error (`core/errors.py`) gets its own code.
- `Unavailable`, and any engine failure `engine_errors.is_transient` recognises, is UNAVAILABLE:
  the broker or backend is out of reach, and the same call may succeed later. The status
  carries a google.rpc.RetryInfo detail (in `grpc-status-details-bin`, as grpcio-status
  writes it, when googleapis-common-protos is installed) and, always, `retry-after-ms` in the
  trailing metadata, for clients without the google.rpc types.
- Anything else is a bug: logged once here, with its traceback, and reported as UNKNOWN, the
  code gRPC gives an exception a handler lets escape.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

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
# How long a client should wait before retrying a call that met an unreachable engine.
RETRY_DELAY_MS = 1000
RETRY_AFTER_KEY = "retry-after-ms"
STATUS_DETAILS_KEY = "grpc-status-details-bin"
MAX_CAUSE_CHARS = 500

R = TypeVar("R")
Context = grpc.aio.ServicerContext[Any, Any]
Metadata = tuple[tuple[str, str | bytes], ...]


@dataclass(frozen=True)
class Refusal:
    """How an exception is reported: status code, message and trailing metadata."""

    code: grpc.StatusCode
    message: str
    trailing_metadata: Metadata = ()


def status_of(exc: errors.CoreError) -> grpc.StatusCode:
    """The gRPC status a refusal is reported with."""
    return CODES.get(type(exc), grpc.StatusCode.INVALID_ARGUMENT)


def refusal(exc: BaseException) -> Refusal | None:
    """The status `exc` is reported with, or None for an unexpected exception (a bug)."""
    if isinstance(exc, errors.CoreError):
        code = status_of(exc)
        if code == grpc.StatusCode.UNAVAILABLE:
            message = f"{exc}; retry"
            return Refusal(code, message, retry_metadata(code, message))
        if isinstance(exc, errors.ResourceExhausted) and exc.retry_after_seconds > 0:
            delay_ms = max(int(exc.retry_after_seconds * 1000), 1)
            return Refusal(code, str(exc), retry_metadata(code, str(exc), delay_ms))
        return Refusal(code, str(exc))
    cause = transient_cause(exc)
    if cause is None:
        return None
    message = f"the broker/backend is unreachable: {_describe(cause)}; retry"
    return Refusal(grpc.StatusCode.UNAVAILABLE, message, retry_metadata(grpc.StatusCode.UNAVAILABLE, message))


def unexpected(exc: BaseException, where: str) -> Refusal:
    """Logs a bug once and describes it as gRPC would (UNKNOWN)."""
    log.error("%s failed", where, exc_info=exc)
    return Refusal(grpc.StatusCode.UNKNOWN, f"Unexpected {_describe(exc)}; see the server log")


def retry_metadata(code: grpc.StatusCode, message: str, delay_ms: int = RETRY_DELAY_MS) -> Metadata:
    """Trailing metadata that asks the client to retry in about `delay_ms`."""
    metadata: Metadata = ((RETRY_AFTER_KEY, str(delay_ms)),)
    details = _status_details(code, message, delay_ms)
    return (*metadata, (STATUS_DETAILS_KEY, details)) if details else metadata


@functools.lru_cache(maxsize=64)
def _retry_info(delay_ms: int) -> Any:
    """A packed google.rpc.RetryInfo, or None without googleapis-common-protos."""
    try:
        from google.protobuf import any_pb2  # noqa: PLC0415
        from google.rpc import error_details_pb2  # type: ignore[import-untyped]  # noqa: PLC0415 - optional
    except ImportError:
        return None
    info = error_details_pb2.RetryInfo()
    info.retry_delay.FromMilliseconds(delay_ms)
    packed = any_pb2.Any()
    packed.Pack(info)
    return packed


def _status_details(code: grpc.StatusCode, message: str, delay_ms: int) -> bytes:
    """A serialized google.rpc.Status with RetryInfo (what grpcio-status's to_status sends)."""
    info = _retry_info(delay_ms)
    if info is None:
        return b""
    from google.rpc import status_pb2  # noqa: PLC0415 - installed with error_details_pb2

    number: int = code.value[0]
    return bytes(status_pb2.Status(code=number, message=message, details=[info]).SerializeToString())


def _describe(exc: BaseException) -> str:
    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    text = " ".join(str(exc).split())
    if len(text) > MAX_CAUSE_CHARS:
        text = text[:MAX_CAUSE_CHARS] + "..."
    return f"{name}: {text}" if text else name


async def abort(context: Context, exc: BaseException, where: str) -> None:
    """End the call with `exc`'s status (see `refusal`); raises as context.abort does."""
    reported = refusal(exc) or unexpected(exc, where)
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
