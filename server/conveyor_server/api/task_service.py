"""TaskService: thin gRPC adapter over the core's submit, read, watch and cancel."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

import grpc
from opentelemetry.trace import SpanKind

from conveyor import tracing
from conveyor.v1 import task_service_pb2, task_service_pb2_grpc
from conveyor.values import seconds_of

from ..core.cancellation import Canceller
from ..core.errors import InvalidArgument, PermissionDenied
from ..core.event_spans import EventSpan
from ..core.results import ResultReader
from ..core.sizing import chunks_within
from ..core.streamed import receive
from ..core.submission import Submitter
from .auth import Authenticator
from .ratelimit import SubmitRateLimiter, tasks_in
from .session import SessionCalls
from .status import streaming, unary

Context = grpc.aio.ServicerContext[Any, Any]
# GetResult waits at most this long per call; clients loop for longer waits.
MAX_WAIT_SECONDS = 300.0
# A watch response carries at most this many events, and this many bytes of them unless one
# event alone is larger: well under gRPC's default 4 MiB receive limit.
MAX_EVENTS_PER_RESPONSE = 1024
MAX_WATCH_RESPONSE_BYTES = 1024 * 1024


def _caller_trace(context: Context) -> dict[str, str]:
    """W3C trace context the caller sent as gRPC metadata."""
    return {
        k: v for k, v in (context.invocation_metadata() or ())
        if k in tracing.TRACE_HEADERS and isinstance(v, str)
    }


def _watch_responses(batch: Sequence[EventSpan], per_response: int) -> Iterator[task_service_pb2.WatchResultsResponse]:
    """The batch's events, written straight into responses of up to `per_response`, each
    within MAX_WATCH_RESPONSE_BYTES unless one event alone is larger. Sizes are checked per
    response, and per event only in the rare response over the limit."""
    response = task_service_pb2.WatchResultsResponse()
    for span in batch:
        for transition in span.transitions():
            span.write(response.events.add(), transition)
            if len(response.events) >= per_response:
                yield from _within_bytes(response, per_response)
                response = task_service_pb2.WatchResultsResponse()
    if response.events:
        yield from _within_bytes(response, per_response)


def _within_bytes(
    response: task_service_pb2.WatchResultsResponse, per_response: int
) -> Iterator[task_service_pb2.WatchResultsResponse]:
    if response.ByteSize() <= MAX_WATCH_RESPONSE_BYTES:
        yield response
        return
    for chunk in chunks_within(response.events, per_response, MAX_WATCH_RESPONSE_BYTES):
        yield task_service_pb2.WatchResultsResponse(events=chunk)


def _single_event_responses(batch: Sequence[EventSpan]) -> Iterator[task_service_pb2.WatchResultsResponse]:
    """One event per response, in the `event` field (a client that did not ask for batches)."""
    for span in batch:
        for transition in span.transitions():
            response = task_service_pb2.WatchResultsResponse()
            span.write(response.event, transition)
            yield response


def _scope(context: Context, authenticator: Authenticator) -> frozenset[str]:
    """The queues a client token is limited to (empty: any queue)."""
    identity = authenticator.identify(context.invocation_metadata())
    if identity is None or identity.role == "admin":
        return frozenset()
    return frozenset(identity.queues)


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

    def _limit(self, context: Context, requests: Sequence[task_service_pb2.SubmitRequest]) -> None:
        if self.limiter.enabled:
            self.limiter.take(_caller(context, self.authenticator), tasks_in(requests))

    async def _check_scope(self, scope: frozenset[str], task_ids: Sequence[str]) -> None:
        """A token limited to some queues may read and cancel only the tasks of those queues."""
        if not scope:
            return
        for task_id in task_ids:
            queue = (await self.reader.get(task_id)).queue
            if queue not in scope:
                raise PermissionDenied(
                    f"task {task_id!r} is on queue {queue!r}; this token may use only queues {sorted(scope)}"
                )

    @unary
    async def Submit(
        self, request: task_service_pb2.SubmitRequest, context: Context
    ) -> task_service_pb2.SubmitResponse:
        self._limit(context, [request])
        return await self._submit(request, _caller_trace(context), _scope(context, self.authenticator))

    async def _submit(
        self, request: task_service_pb2.SubmitRequest, caller_trace: Mapping[str, str], scope: frozenset[str]
    ) -> task_service_pb2.SubmitResponse:
        with tracing.span("submit", caller_trace, SpanKind.SERVER):
            (response,) = await self.submitter.submit([request], tracing.inject() or caller_trace, scope)
        return response

    @unary
    async def SubmitBatch(
        self, request: task_service_pb2.SubmitBatchRequest, context: Context
    ) -> task_service_pb2.SubmitBatchResponse:
        self._limit(context, request.requests)
        caller = _caller_trace(context)
        with tracing.span("submit batch", caller, SpanKind.SERVER):
            responses = await self.submitter.submit(
                request.requests, tracing.inject() or caller, _scope(context, self.authenticator)
            )
        return task_service_pb2.SubmitBatchResponse(responses=responses)

    @unary
    async def SubmitStream(
        self, parts: AsyncIterator[task_service_pb2.SubmitStreamRequest], context: Context
    ) -> task_service_pb2.SubmitStreamResponse:
        limits = self.submitter.settings.limits
        try:
            submission = await receive(parts, limits)
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no message for {limits.stream_idle_seconds:g} s (stream_idle_seconds); nothing was submitted",
            )
        self._limit(context, [submission.request])
        caller = _caller_trace(context)
        with tracing.span("submit stream", caller, SpanKind.SERVER):
            (response,) = await self.submitter.submit(
                [submission.request], tracing.inject() or caller, _scope(context, self.authenticator), streamed=True
            )
        return task_service_pb2.SubmitStreamResponse(
            task_id=response.task_id, workflow_id=response.workflow_id, task_count=len(response.task_ids)
        )

    @unary
    async def GetResult(
        self, request: task_service_pb2.GetResultRequest, context: Context
    ) -> task_service_pb2.GetResultResponse:
        return await self._get_result(request, _scope(context, self.authenticator))

    async def _get_result(
        self, request: task_service_pb2.GetResultRequest, scope: frozenset[str]
    ) -> task_service_pb2.GetResultResponse:
        await self._check_scope(scope, [request.task_id])
        wait = seconds_of(request.wait)
        if wait < 0:
            wait = 0.0
        result = await self.reader.wait(request.task_id, min(wait, MAX_WAIT_SECONDS))
        return task_service_pb2.GetResultResponse(result=result)

    async def Session(
        self, requests: AsyncIterator[task_service_pb2.SessionRequest], context: Context
    ) -> AsyncIterator[task_service_pb2.SessionResponse]:
        await context.send_initial_metadata(())  # tells the client the session is accepted
        scope = _scope(context, self.authenticator)

        async def answer(request: task_service_pb2.SessionRequest, caller: str) -> task_service_pb2.SessionResponse:
            return await self._answer(request, caller, scope)

        calls = SessionCalls(answer, _caller(context, self.authenticator), self._stopping)
        async for reply in calls.serve(requests):
            yield reply

    async def _answer(
        self, request: task_service_pb2.SessionRequest, caller: str, scope: frozenset[str]
    ) -> task_service_pb2.SessionResponse:
        kind = request.WhichOneof("call")
        if kind == "submit":
            if self.limiter.enabled:
                self.limiter.take(caller, tasks_in([request.submit]))
            return task_service_pb2.SessionResponse(
                submit=await self._submit(request.submit, request.trace_context, scope)
            )
        if kind == "get_result":
            return task_service_pb2.SessionResponse(get_result=await self._get_result(request.get_result, scope))
        raise InvalidArgument("a session request must set submit or get_result")

    @streaming
    async def WatchResults(
        self, request: task_service_pb2.WatchResultsRequest, context: Context
    ) -> AsyncIterator[task_service_pb2.WatchResultsResponse]:
        ids = await self.reader.resolve_ids(request.task_ids, request.workflow_id)
        await self._check_scope(_scope(context, self.authenticator), ids)
        until_done = request.until_done if request.HasField("until_done") else True
        per_response = min(request.max_events_per_response, MAX_EVENTS_PER_RESPONSE)
        async with contextlib.aclosing(self.reader.watch_batches(ids, until_done)) as batches:
            async for batch in batches:
                if per_response <= 1:
                    responses = _single_event_responses(batch)
                else:
                    responses = _watch_responses(batch, per_response)
                for response in responses:
                    yield response

    @unary
    async def Cancel(
        self, request: task_service_pb2.CancelRequest, context: Context
    ) -> task_service_pb2.CancelResponse:
        scope = _scope(context, self.authenticator)
        if scope:
            workflow = request.id.startswith("wf-")
            targets = await self.reader.resolve_ids([] if workflow else [request.id], request.id if workflow else "")
            await self._check_scope(scope, targets)
        return task_service_pb2.CancelResponse(cancelled_task_ids=await self.canceller.cancel(request.id))

    @unary
    async def GetWorkflow(
        self, request: task_service_pb2.GetWorkflowRequest, context: Context
    ) -> task_service_pb2.GetWorkflowResponse:
        scope = _scope(context, self.authenticator)
        if scope:
            await self._check_scope(scope, await self.reader.resolve_ids([], request.workflow_id))
        return await self.reader.workflow(request.workflow_id)
