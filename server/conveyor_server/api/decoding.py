"""Refuses undecodable requests with INVALID_ARGUMENT instead of gRPC's generic UNKNOWN."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from .auth import Handler
from .status import Refusal, refuse


class _Undecodable:
    def __init__(self, error: DecodeError) -> None:
        self.error = error


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as error:
            return _Undecodable(error)

    return decode


async def _refuse(context: grpc.aio.ServicerContext[Any, Any], bad: _Undecodable) -> None:
    await refuse(context, Refusal(
        grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid message: {bad.error}", reason="MALFORMED_REQUEST"
    ))


def _guard(handler: Handler) -> Handler:
    serializers = {
        "request_deserializer": _lenient(handler.request_deserializer),
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming:
        behaviour: Any = handler.stream_stream if handler.response_streaming else handler.stream_unary

        async def checked(
            requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            async for request in requests:
                if isinstance(request, _Undecodable):
                    await _refuse(context, request)
                yield request

        # gRPC picks how to drive a handler from its kind: an async generator for streamed responses.
        if handler.response_streaming:
            async def guarded_stream_stream(
                requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                async for response in behaviour(checked(requests, context), context):
                    yield response

            return grpc.stream_stream_rpc_method_handler(guarded_stream_stream, **serializers)

        async def guarded_stream_unary(
            requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
        ) -> Any:
            return await behaviour(checked(requests, context), context)

        return grpc.stream_unary_rpc_method_handler(guarded_stream_unary, **serializers)

    behaviour_: Any = handler.unary_stream if handler.response_streaming else handler.unary_unary
    if handler.response_streaming:
        async def guarded_unary_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if isinstance(request, _Undecodable):
                await _refuse(context, request)
            async for response in behaviour_(request, context):
                yield response

        return grpc.unary_stream_rpc_method_handler(guarded_unary_stream, **serializers)

    async def guarded_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, _Undecodable):
            await _refuse(context, request)
        return await behaviour_(request, context)

    return grpc.unary_unary_rpc_method_handler(guarded_unary, **serializers)


class DecodeGuardInterceptor(grpc.aio.ServerInterceptor):
    """Applies to our own services only; health and reflection keep their handlers."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith("/conveyor."):
            return handler
        return _guard(handler)
