"""The asyncio client: submit tasks and workflows, read and watch their results."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.trace import SpanKind

from conveyor import tracing
from conveyor.canvas import Canvas, Sig
from conveyor.errors import TaskFailed
from conveyor.session import Session
from conveyor.tls import bearer_metadata, open_channel
from conveyor.v1 import result_pb2, task_pb2, task_service_pb2, task_service_pb2_grpc, workflow_pb2
from conveyor.values import from_value

DEFAULT_ADDRESS = "127.0.0.1:50051"
TERMINAL = {result_pb2.TASK_STATE_SUCCESS, result_pb2.TASK_STATE_FAILURE, result_pb2.TASK_STATE_CANCELLED}
# GetResult waits server-side at most this long per call; longer waits loop.
WAIT_SLICE_SECONDS = 60.0

Submittable = Canvas | task_pb2.Signature | workflow_pb2.Workflow


@dataclass(frozen=True)
class Submitted:
    """What a submission created. `task_id` holds the final result (empty for a bare group)."""

    task_id: str
    workflow_id: str
    task_ids: tuple[str, ...]


def state_name(state: int) -> str:
    """"SUCCESS" for TASK_STATE_SUCCESS; the number for a state this SDK does not know."""
    try:
        return result_pb2.TaskState.Name(state).removeprefix("TASK_STATE_")  # type: ignore[arg-type]
    except ValueError:
        return str(state)


def to_request(target: Submittable) -> task_service_pb2.SubmitRequest:
    if isinstance(target, Sig):
        return task_service_pb2.SubmitRequest(task=target.to_proto())
    if isinstance(target, task_pb2.Signature):
        return task_service_pb2.SubmitRequest(task=target)
    if isinstance(target, workflow_pb2.Workflow):
        return task_service_pb2.SubmitRequest(workflow=target)
    return task_service_pb2.SubmitRequest(workflow=target.to_workflow())


def value_of(result: result_pb2.TaskResult) -> Any:
    """The Python value of a finished task, or TaskFailed for a failure or cancellation."""
    if result.state == result_pb2.TASK_STATE_SUCCESS:
        return from_value(result.result)
    raise TaskFailed(
        result.task_id, state_name(result.state), result.error.type, result.error.message, result.error.traceback
    )


def default_address() -> str:
    return os.environ.get("CONVEYOR_ADDRESS", DEFAULT_ADDRESS)


class Client:
    """Async client. Use as `async with Client() as client:` or call close()."""

    def __init__(
        self,
        address: str | None = None,
        *,
        channel: grpc.aio.Channel | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.address = address or default_address()
        self._metadata = bearer_metadata(token)
        if channel is None:
            opts = [("grpc.max_receive_message_length", 64 * 1024 * 1024), *options]
            channel = open_channel(self.address, credentials, opts)
        self._channel = channel
        self._stub = task_service_pb2_grpc.TaskServiceStub(channel)
        # submit() and get_result() travel on one stream: cheaper per call than unary RPCs.
        self._session = Session(self._stub, self._metadata)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._session.close()
        await self._channel.close()

    async def submit(self, target: Submittable | str, *args: Any, **kwargs: Any) -> Submitted:
        """Submit a task or workflow: submit(sig("add", 1, 2)), submit(chain(...)) or submit("add", 1, 2)."""
        if isinstance(target, str):
            target = Sig(target, args, kwargs)
        elif args or kwargs:
            raise TypeError("args and kwargs go with a task name; build a sig() for anything else")
        request = to_request(target)
        name = request.task.name if request.HasField("task") else "workflow"
        with tracing.span(f"submit {name}", kind=SpanKind.CLIENT):
            call = task_service_pb2.SessionRequest(submit=request, trace_context=tracing.inject())
            response = (await self._session.call(call)).submit
        return _submitted(response)

    async def submit_batch(self, targets: Iterable[Submittable]) -> list[Submitted]:
        """Submit many in one round trip; all are accepted or none."""
        request = task_service_pb2.SubmitBatchRequest(requests=[to_request(t) for t in targets])
        with tracing.span("submit batch", kind=SpanKind.CLIENT):
            response = await self._stub.SubmitBatch(request, metadata=self._traced_metadata())
        return [_submitted(r) for r in response.responses]

    def _traced_metadata(self) -> tuple[tuple[str, str], ...]:
        return (*self._metadata, *tracing.inject().items())

    async def get_result(self, task_id: str, wait: float = 0.0) -> result_pb2.TaskResult:
        """The task's record; with `wait`, waits up to that many seconds for it to finish."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            remaining = max(deadline - loop.time(), 0.0)
            request = task_service_pb2.GetResultRequest(task_id=task_id)
            request.wait.FromNanoseconds(int(min(remaining, WAIT_SLICE_SECONDS) * 1e9))
            response = (await self._session.call(task_service_pb2.SessionRequest(get_result=request))).get_result
            if response.result.state in TERMINAL or remaining <= WAIT_SLICE_SECONDS:
                return response.result

    async def result(self, task_id: str, wait: float = 60.0) -> Any:
        """Wait for the task and return its value; raises TaskFailed or TimeoutError."""
        result = await self.get_result(task_id, wait=wait)
        if result.state not in TERMINAL:
            raise TimeoutError(f"task {task_id} is still {state_name(result.state)} after {wait} s")
        return value_of(result)

    async def watch(
        self, task_ids: Iterable[str] = (), *, workflow_id: str = "", until_done: bool = True
    ) -> AsyncIterator[result_pb2.TaskEvent]:
        """Stream state changes (history first); ends when all are finished unless until_done=False."""
        request = task_service_pb2.WatchResultsRequest(
            task_ids=list(task_ids), workflow_id=workflow_id, until_done=until_done
        )
        async for response in self._stub.WatchResults(request, metadata=self._metadata):
            yield response.event

    async def cancel(self, task_or_workflow_id: str) -> list[str]:
        response = await self._stub.Cancel(
            task_service_pb2.CancelRequest(id=task_or_workflow_id), metadata=self._metadata
        )
        return list(response.cancelled_task_ids)

    async def get_workflow(self, workflow_id: str) -> task_service_pb2.GetWorkflowResponse:
        return await self._stub.GetWorkflow(
            task_service_pb2.GetWorkflowRequest(workflow_id=workflow_id), metadata=self._metadata
        )


def _submitted(response: task_service_pb2.SubmitResponse) -> Submitted:
    return Submitted(response.task_id, response.workflow_id, tuple(response.task_ids))
