"""TaskService: thin gRPC adapter over the core's submit, read, watch and cancel."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
from opentelemetry.trace import SpanKind

from conveyor import tracing
from conveyor.v1 import task_service_pb2 as t
from conveyor.v1 import task_service_pb2_grpc

from ..core.cancellation import Canceller
from ..core.errors import InvalidArgument
from ..core.results import ResultReader
from ..core.submission import Submitter
from .auth import Authenticator
from .ratelimit import SubmitRateLimiter
from .session import SessionCalls
from .status import streaming, unary

Context = grpc.aio.ServicerContext[Any, Any]
# GetResult waits at most this long per call; clients loop for longer waits.
MAX_WAIT_SECONDS = 300.0


def _caller_trace(context: Context) -> dict[str, str]:
    """W3C trace context the caller sent as gRPC metadata."""
    return {
        k: v for k, v in (context.invocation_metadata() or ())
        if k in tracing.TRACE_HEADERS and isinstance(v, str)
    }


def _caller(context: Context, authenticator: Authenticator) -> str:
    """Who is submitting, for rate limits: the token's name, else the peer's address."""
    identity = authenticator.identify(context.invocation_metadata())
    if identity is not None:
        return identity.name
    peer = context.peer() or "unknown"
    return peer.rsplit(":", 1)[0] if peer.startswith(("ipv4:", "ipv6:")) else peer


class TaskServicer(task_service_pb2_grpc.TaskServiceServicer):
    def __init__(
        self, submitter: Submitter, reader: ResultReader, canceller: Canceller,
        authenticator: Authenticator | None = None, limiter: SubmitRateLimiter | None = None,
    ) -> None:
        self.submitter = submitter
        self.reader = reader
        self.canceller = canceller
        self.authenticator = authenticator or Authenticator(())
        self.limiter = limiter or SubmitRateLimiter(0, 1)
        self._stopping = asyncio.Event()

    def end_sessions(self) -> None:
        """The server is stopping: sessions answer the calls they have and end, so an idle
        client does not hold the shutdown for its whole grace."""
        self._stopping.set()

    def _limit(self, context: Context, tasks: int) -> None:
        self.limiter.take(_caller(context, self.authenticator), tasks)

    @unary
    async def Submit(self, request: t.SubmitRequest, context: Context) -> t.SubmitResponse:
        self._limit(context, 1)
        return await self._submit(request, _caller_trace(context))

    async def _submit(self, request: t.SubmitRequest, caller_trace: Mapping[str, str]) -> t.SubmitResponse:
        with tracing.span("submit", caller_trace, SpanKind.SERVER):
            (response,) = await self.submitter.submit([request], tracing.inject() or caller_trace)
        return response

    @unary
    async def SubmitBatch(self, request: t.SubmitBatchRequest, context: Context) -> t.SubmitBatchResponse:
        self._limit(context, len(request.requests))
        caller = _caller_trace(context)
        with tracing.span("submit batch", caller, SpanKind.SERVER):
            responses = await self.submitter.submit(request.requests, tracing.inject() or caller)
        return t.SubmitBatchResponse(responses=responses)

    @unary
    async def GetResult(self, request: t.GetResultRequest, context: Context) -> t.GetResultResponse:
        return await self._get_result(request)

    async def _get_result(self, request: t.GetResultRequest) -> t.GetResultResponse:
        wait = request.wait.seconds + request.wait.nanos / 1e9
        if wait < 0:
            wait = 0.0
        result = await self.reader.wait(request.task_id, min(wait, MAX_WAIT_SECONDS))
        return t.GetResultResponse(result=result)

    async def Session(
        self, requests: AsyncIterator[t.SessionRequest], context: Context
    ) -> AsyncIterator[t.SessionResponse]:
        await context.send_initial_metadata(())  # tells the client the session is accepted
        calls = SessionCalls(self._answer, _caller(context, self.authenticator), self._stopping)
        async for reply in calls.serve(requests):
            yield reply

    async def _answer(self, request: t.SessionRequest, caller: str) -> t.SessionResponse:
        kind = request.WhichOneof("call")
        if kind == "submit":
            self.limiter.take(caller, 1)
            return t.SessionResponse(submit=await self._submit(request.submit, request.trace_context))
        if kind == "get_result":
            return t.SessionResponse(get_result=await self._get_result(request.get_result))
        raise InvalidArgument("a session request must set submit or get_result")

    @streaming
    async def WatchResults(
        self, request: t.WatchResultsRequest, context: Context
    ) -> AsyncIterator[t.WatchResultsResponse]:
        ids = await self.reader.resolve_ids(request.task_ids, request.workflow_id)
        until_done = request.until_done if request.HasField("until_done") else True
        async for event in self.reader.watch(ids, until_done):
            yield t.WatchResultsResponse(event=event)

    @unary
    async def Cancel(self, request: t.CancelRequest, context: Context) -> t.CancelResponse:
        return t.CancelResponse(cancelled_task_ids=await self.canceller.cancel(request.id))

    @unary
    async def GetWorkflow(self, request: t.GetWorkflowRequest, context: Context) -> t.GetWorkflowResponse:
        return await self.reader.workflow(request.workflow_id)
