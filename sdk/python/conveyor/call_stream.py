"""Submit and GetResult calls multiplexed over one TaskService.Session stream.

A message on an open stream costs about half a unary call, which is most of a quick task's
round trip. The stream opens on the first call and again after it breaks; a call in flight
when it breaks fails with the stream's error, as a unary call would.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools

import grpc

from conveyor.v1 import task_service_pb2, task_service_pb2_grpc

from .error_details import status_trailer

Metadata = tuple[tuple[str, str], ...]
Stream = grpc.aio.StreamStreamCall[task_service_pb2.SessionRequest, task_service_pb2.SessionResponse]


def _status(code: int) -> grpc.StatusCode:
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status
    return grpc.StatusCode.UNKNOWN


def _rpc_error(code: grpc.StatusCode, details: str | None, retry_after_ms: int = 0) -> grpc.aio.AioRpcError:
    trailers = grpc.aio.Metadata(("retry-after-ms", str(retry_after_ms))) if retry_after_ms else grpc.aio.Metadata()
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailers, details)


def call_error(error: task_service_pb2.CallError) -> grpc.aio.AioRpcError:
    """The exception the unary call would have raised (its retry hint and details included)."""
    code = _status(error.code)
    if not error.details:
        return _rpc_error(code, error.message, error.retry_after_ms)
    hint = (("retry-after-ms", str(error.retry_after_ms)),) if error.retry_after_ms else ()
    trailers = grpc.aio.Metadata(*hint, status_trailer(code, error.message, error.details))
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailers, error.message)


class CallStream:
    """The client's calls over one TaskService.Session stream (see the module docstring)."""

    def __init__(self, stub: task_service_pb2_grpc.TaskServiceAsyncStub, metadata: Metadata) -> None:
        self._stub = stub
        self._metadata = metadata
        self._ids = itertools.count(1)
        self._stream: Stream | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[task_service_pb2.SessionResponse]] = {}
        self._writing = asyncio.Lock()

    async def call(self, request: task_service_pb2.SessionRequest) -> task_service_pb2.SessionResponse:
        """Send one call and wait for its answer; raises AioRpcError as the unary call would."""
        request.call_id = next(self._ids)
        answer: asyncio.Future[task_service_pb2.SessionResponse] = asyncio.get_running_loop().create_future()
        self._pending[request.call_id] = answer
        try:
            async with self._writing:
                stream = await self._open()
                await stream.write(request)
            response = await answer
        finally:
            self._pending.pop(request.call_id, None)
        if response.HasField("error"):
            raise call_error(response.error)
        return response

    async def _open(self) -> Stream:
        stream = self._stream
        if stream is None or stream.done():
            stream = self._stub.Session(metadata=self._metadata)
            # The server answers a new session with its headers at once. Waiting for them means
            # a refused session (a bad token) reports the server's status: a write racing the
            # refusal would only see gRPC's "Internal error from Core".
            await stream.initial_metadata()
            if stream.done():
                trailers = await stream.trailing_metadata()
                raise grpc.aio.AioRpcError(
                    await stream.code(), grpc.aio.Metadata(), trailers or grpc.aio.Metadata(), await stream.details()
                )
            self._stream = stream
            self._reader = asyncio.create_task(self._read(stream), name="conveyor-call-stream")
        return stream

    async def _read(self, stream: Stream) -> None:
        failure: BaseException | None = None
        try:
            async for response in stream:
                answer = self._pending.get(response.call_id)
                if answer is not None and not answer.done():
                    answer.set_result(response)
        except grpc.aio.AioRpcError as exc:
            failure = exc
        except asyncio.CancelledError:
            failure = _rpc_error(grpc.StatusCode.CANCELLED, "the client closed its session")
            raise
        finally:
            if self._stream is stream:
                self._stream = None
            failure = failure or _rpc_error(grpc.StatusCode.UNAVAILABLE, "the server ended the session")
            for answer in self._pending.values():
                if not answer.done():
                    answer.set_exception(failure)

    async def close(self) -> None:
        stream, reader = self._stream, self._reader
        self._stream = self._reader = None
        if stream is not None:
            stream.cancel()
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await reader
