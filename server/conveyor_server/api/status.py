"""Maps domain errors to gRPC status codes, so every refusal carries a clear message."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from ..core import errors

log = logging.getLogger(__name__)

CODES: dict[type[errors.CoreError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
}

R = TypeVar("R")


def status_of(exc: errors.CoreError) -> grpc.StatusCode:
    """The gRPC status a refusal is reported with."""
    return CODES.get(type(exc), grpc.StatusCode.INVALID_ARGUMENT)


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: errors.CoreError) -> None:
    await context.abort(status_of(exc), str(exc))


def unary(
    method: Callable[[Any, Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[R]],
) -> Callable[[Any, Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[R]]:
    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> R:
        try:
            return await method(self, request, context)
        except errors.CoreError as exc:
            await _abort(context, exc)
            raise  # abort raises; this keeps type checkers honest

    return wrapper


def streaming(
    method: Callable[[Any, Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[R]],
) -> Callable[[Any, Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[R]]:
    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[R]:
        try:
            async for item in method(self, request, context):
                yield item
        except errors.CoreError as exc:
            await _abort(context, exc)

    return wrapper
