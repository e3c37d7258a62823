"""TaskService.Session: many Submit and GetResult calls over one stream, each answered as
soon as it is done (in any order) and matched to its request by call_id."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from conveyor.v1 import task_service_pb2

from .status import INTERNAL_ERROR, Refusal, refusal

log = logging.getLogger(__name__)

Answer = Callable[[task_service_pb2.SessionRequest, str], Awaitable[task_service_pb2.SessionResponse]]


class SessionCalls:
    """The calls of one session stream; `caller` names its client for rate limits."""

    def __init__(self, answer: Answer, caller: str, stopping: asyncio.Event) -> None:
        self._answer = answer
        self._caller = caller
        self._stopping = stopping
        self._replies: asyncio.Queue[task_service_pb2.SessionResponse | None] = asyncio.Queue()
        self._running: set[asyncio.Task[None]] = set()

    async def serve(
        self, requests: AsyncIterator[task_service_pb2.SessionRequest]
    ) -> AsyncIterator[task_service_pb2.SessionResponse]:
        reader = asyncio.create_task(self._read(requests))
        stopper = asyncio.create_task(self._stop_reading_on_shutdown(reader))
        try:
            while (reply := await self._replies.get()) is not None:
                yield reply
            if not reader.cancelled():
                await reader  # a broken request stream ends the session with its error
        finally:
            stopper.cancel()
            reader.cancel()
            for call in self._running:
                call.cancel()

    async def _stop_reading_on_shutdown(self, reader: asyncio.Task[None]) -> None:
        await self._stopping.wait()
        reader.cancel()

    async def _read(self, requests: AsyncIterator[task_service_pb2.SessionRequest]) -> None:
        try:
            async for request in requests:
                call = asyncio.create_task(self._call(request))
                self._running.add(call)
                call.add_done_callback(self._running.discard)
        finally:
            # The client is done sending, or the server is stopping: answer what was asked,
            # then end the stream.
            if self._running:
                await asyncio.gather(*self._running, return_exceptions=True)
            self._replies.put_nowait(None)

    async def _call(self, request: task_service_pb2.SessionRequest) -> None:
        try:
            reply = await self._answer(request, self._caller)
        except Exception as exc:  # a refusal, an engine out of reach (UNAVAILABLE), or a bug
            reported = refusal(exc)
            if reported is None:
                log.exception("session call %d failed", request.call_id)
                reported = Refusal(
                    grpc.StatusCode.INTERNAL, "the server failed to answer this call; see its log", INTERNAL_ERROR
                )
            reply = _error(reported)
        reply.call_id = request.call_id
        self._replies.put_nowait(reply)


def _error(reported: Refusal) -> task_service_pb2.SessionResponse:
    """The answer to a refused call: its status, retry hint and details, as a unary call's."""
    status = reported.status
    return task_service_pb2.SessionResponse(error=task_service_pb2.CallError(
        code=status.code, message=status.message, retry_after_ms=reported.retry_after_ms, details=status.details,
    ))
