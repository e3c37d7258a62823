"""The asyncio client: submit tasks and workflows, read and watch their results."""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import os
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import grpc
from opentelemetry.trace import SpanKind

from conveyor import tracing
from conveyor.call_stream import CallStream
from conveyor.canvas import DEFAULT_CHUNK_SIZE, Canvas, Chord, Group, Sig, check_depth
from conveyor.context import running_task_id
from conveyor.errors import ConveyorError, ResultIgnored, TaskFailed, rpc_failed
from conveyor.streaming import member_depth, opening, pieces, read_head, streamed_group
from conveyor.tls import bearer_metadata, open_channel
from conveyor.v1 import result_pb2, task_pb2, task_service_pb2, task_service_pb2_grpc, workflow_pb2
from conveyor.values import from_value, set_seconds, to_value, to_value_map

DEFAULT_ADDRESS = "127.0.0.1:50051"
TERMINAL = {
    result_pb2.TASK_STATE_SUCCESS, result_pb2.TASK_STATE_FAILURE, result_pb2.TASK_STATE_CANCELLED,
    result_pb2.TASK_STATE_EXPIRED,
}
# GetResult waits server-side at most this long per call; longer waits loop.
WAIT_SLICE_SECONDS = 60.0
# Events per watch response asked of the server: the events ready together come in one message.
WATCH_EVENTS_PER_RESPONSE = 512
# Trailing metadata in which the server suggests how long to wait before retrying.
RETRY_AFTER_KEY = "retry-after-ms"
UNAVAILABLE = frozenset({grpc.StatusCode.UNAVAILABLE})
# A submit is also retried when the server is over a limit and says when to try again.
SUBMIT_RETRIED = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
# A wait may also be cut short by a proxy's or load balancer's deadline: it is only a read.
UNAVAILABLE_OR_DEADLINE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

Submittable = Canvas | task_pb2.Signature | workflow_pb2.Workflow
T = TypeVar("T")


@dataclass(frozen=True)
class CallRetry:
    """How the client retries a call that found the server, its broker or its backend out of
    reach (UNAVAILABLE): exponential backoff with jitter, for at most `max_seconds` per call.

    The n-th retry waits `initial * multiplier**n` seconds (at most `max_backoff`), less a
    random part of up to `jitter` of it, and at least what the server asked for. `max_seconds=0`
    turns retries off. (Named apart from `RetryPolicy`, which says how a failing *task* reruns.)

    The cap is what a caller waits at most once the engine is back: at 1 s, work submitted
    through an outage resumes within a second or so of the engine's return (at 5 s, up to 5 s
    after). The jitter keeps many clients from retrying in step.
    """

    max_seconds: float = 30.0
    initial: float = 0.1
    multiplier: float = 2.0
    max_backoff: float = 1.0
    jitter: float = 0.5

    def backoff(self, retries: int, asked: float = 0.0) -> float:
        """Seconds to wait before retry number `retries` (from 0); `asked`: the server's hint."""
        delay = min(self.max_backoff, self.initial * self.multiplier ** min(retries, 64))
        delay *= 1.0 - self.jitter * random.random()
        return max(delay, asked)


class State(enum.IntEnum):
    """Where a task is in its life (TaskState in result.proto); compares equal to the wire numbers."""

    UNSPECIFIED = result_pb2.TASK_STATE_UNSPECIFIED
    PENDING = result_pb2.TASK_STATE_PENDING
    RECEIVED = result_pb2.TASK_STATE_RECEIVED
    STARTED = result_pb2.TASK_STATE_STARTED
    RETRY = result_pb2.TASK_STATE_RETRY
    SUCCESS = result_pb2.TASK_STATE_SUCCESS
    FAILURE = result_pb2.TASK_STATE_FAILURE
    CANCELLED = result_pb2.TASK_STATE_CANCELLED
    # Not started by its expiry (Sig expires): it never ran.
    EXPIRED = result_pb2.TASK_STATE_EXPIRED

    @property
    def done(self) -> bool:
        """SUCCESS, FAILURE, CANCELLED or EXPIRED: the task will not change again."""
        return int(self) in TERMINAL


@dataclass(frozen=True)
class Submitted:
    """A handle on what a submission created. `task_id` is the task whose result is the final
    one (empty when that result is a list: a group, or a chain ending in one); `result_id`
    reads the whole result of any submission. From an async Client:
    `await submitted.result(timeout=10)`, `await submitted.state()`, `await submitted.cancel()`,
    `async for event in submitted.watch()`."""

    task_id: str
    workflow_id: str
    task_ids: tuple[str, ...]
    client: Client | None = field(default=None, compare=False, repr=False)

    @property
    def result_id(self) -> str:
        """The workflow id for a workflow (GetResult on it gives the whole canvas's value, and a
        failed chain's own error), else the task id."""
        return self.workflow_id or self.task_id

    def _client(self) -> Client:
        if self.client is None:
            raise RuntimeError("this Submitted was made by hand: pass it to a Client's result(), watch() or cancel()")
        return self.client

    async def result(self, timeout: float = 60.0) -> Any:  # noqa: ASYNC109 - a wait the server serves
        """The value once it finished; TaskFailed if it failed, ResultIgnored if it ignores its
        result (use state() for those), TimeoutError after `timeout` s."""
        return await self._client().result(self, wait=timeout)

    async def state(self) -> State:
        """Its state now (a workflow's: the state of the task that gives its result)."""
        return State((await self._client().get_result(self.result_id)).state)

    async def cancel(self) -> list[str]:
        """Cancel it (a workflow: its remaining tasks); the ids that moved to CANCELLED."""
        return await self._client().cancel(self.result_id)

    def watch(self) -> AsyncIterator[result_pb2.TaskEvent]:
        """Its state changes (a workflow's: every task's), history first, until it finished."""
        if self.workflow_id:
            return self._client().watch(workflow_id=self.workflow_id)
        return self._client().watch([self.task_id])


def state_name(state: int) -> str:
    """"SUCCESS" for TASK_STATE_SUCCESS; the number for a state this SDK does not know."""
    try:
        return result_pb2.TaskState.Name(state).removeprefix("TASK_STATE_")  # type: ignore[arg-type]
    except ValueError:
        return str(state)


# What submit(canvas, ...) takes besides the canvas: Celery's apply_async(args, kwargs, **options).
CANVAS_OPTIONS = ("args", "kwargs", "queue", "priority", "countdown", "eta")


def canvas_options(
    args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None, queue: str = "", priority: int = 0,
    countdown: float | None = None, eta: dt.datetime | None = None,
) -> task_service_pb2.CanvasOptions:
    """Options for a whole submission (see task_service.proto's CanvasOptions): args and kwargs
    for its first tasks, queue and priority for every task that sets none, and a start time."""
    options = task_service_pb2.CanvasOptions(
        args=[to_value(a) for a in args], kwargs=to_value_map(kwargs or {}), queue=queue, priority=priority,
    )
    if countdown is not None:
        set_seconds(options.countdown, countdown)
    if eta is not None:
        aware = eta if eta.tzinfo else eta.replace(tzinfo=dt.UTC)
        options.eta.FromDatetime(aware.astimezone(dt.UTC).replace(tzinfo=None))
    return options


def to_request(target: Submittable) -> task_service_pb2.SubmitRequest:
    check_depth(target)
    if isinstance(target, Sig):
        return task_service_pb2.SubmitRequest(task=target.to_proto())
    if isinstance(target, task_pb2.Signature):
        return task_service_pb2.SubmitRequest(task=target)
    if isinstance(target, workflow_pb2.Workflow):
        return task_service_pb2.SubmitRequest(workflow=target)
    return task_service_pb2.SubmitRequest(workflow=target.to_workflow())


def value_of(result: result_pb2.TaskResult) -> Any:
    """The Python value of a finished task; TaskFailed for a failure, cancellation or expiry;
    ResultIgnored for a task submitted with ignore_result (its value was not stored)."""
    if result.state == result_pb2.TASK_STATE_SUCCESS:
        if result.signature.ignore_result:
            raise ResultIgnored(result.task_id)
        return from_value(result.result)
    raise TaskFailed(
        result.task_id, state_name(result.state), result.error.type, result.error.message, result.error.traceback
    )


def default_address() -> str:
    return os.environ.get("CONVEYOR_ADDRESS", DEFAULT_ADDRESS)


def with_task_ids(request: task_service_pb2.SubmitRequest) -> task_service_pb2.SubmitRequest:
    """Gives every task the submission creates an id (a UUID where the caller left it empty),
    so that a retried submit is recognised: the server refuses ids it already stored. Inside a
    running task, that task becomes their parent (TaskContext.parent_id)."""
    parent_id = running_task_id()
    if request.HasField("task"):
        _fill_id(request.task, parent_id)
    elif request.HasField("workflow"):
        for signature in _task_nodes(request.workflow):
            _fill_id(signature, parent_id)
    return request


def _fill_id(signature: task_pb2.Signature, parent_id: str) -> None:
    if not signature.id:
        signature.id = str(uuid.uuid4())
    if parent_id and not signature.parent_id:
        signature.parent_id = parent_id


def _task_nodes(node: workflow_pb2.Workflow) -> list[task_pb2.Signature]:
    """The tasks of a workflow, depth first (the order of SubmitResponse.task_ids); a map's
    task stands for its chunk tasks (its id names them)."""
    kind = node.WhichOneof("kind")
    if kind == "task":
        return [node.task]
    if kind == "map":
        return [node.map.task]
    return [signature for child in _children(node) for signature in _task_nodes(child)]


def _task_ids(node: workflow_pb2.Workflow) -> tuple[str, ...]:
    """The ids of the workflow's tasks as the server lists them: a map's chunk tasks are
    `<its task's id>.c<index>`."""
    kind = node.WhichOneof("kind")
    if kind == "task":
        return (node.task.id,)
    if kind == "map":
        size = node.map.chunk_size or DEFAULT_CHUNK_SIZE
        return tuple(f"{node.map.task.id}.c{i}" for i in range(-(-len(node.map.items) // size)))
    return tuple(task_id for child in _children(node) for task_id in _task_ids(child))


def _children(node: workflow_pb2.Workflow) -> Sequence[workflow_pb2.Workflow]:
    kind = node.WhichOneof("kind")
    if kind == "chain":
        return node.chain.steps
    if kind == "group":
        return node.group.members
    if kind == "chord":
        return [*node.chord.header.members, node.chord.callback]
    return ()


def _result_task(node: workflow_pb2.Workflow) -> str:
    """The task whose result is the workflow's (empty for a group), as the server picks it."""
    kind = node.WhichOneof("kind")
    if kind == "task":
        return node.task.id
    if kind == "chain" and node.chain.steps:
        return _result_task(node.chain.steps[-1])
    if kind == "chord":
        return _result_task(node.chord.callback)
    return ""


def _retry_after(error: grpc.aio.AioRpcError) -> float:
    """The server's suggested pause in seconds (0 without one)."""
    for key, value in error.trailing_metadata() or ():
        if key == RETRY_AFTER_KEY:
            try:
                return max(float(value) / 1000.0, 0.0)
            except (TypeError, ValueError):
                return 0.0
    return 0.0


class _Retries:
    """The retry budget of one call: which codes are retried, until when, and the pause."""

    def __init__(self, policy: CallRetry, codes: frozenset[grpc.StatusCode], at_least: float = 0.0) -> None:
        self._policy = policy
        self._codes = codes
        self._loop = asyncio.get_running_loop()
        self._budget = max(policy.max_seconds, at_least) if policy.max_seconds > 0 else 0.0
        self.retried = 0
        self._until = self._loop.time() + self._budget

    def reset(self) -> None:
        """The call made progress (a watch got an event): the budget starts over."""
        self.retried = 0
        self._until = self._loop.time() + self._budget

    async def pause(self, error: grpc.aio.AioRpcError) -> bool:
        """Wait before the next try; False when `error` is final (its code, or time is up)."""
        remaining = self._until - self._loop.time()
        asked = _retry_after(error)
        if error.code() not in self._codes or remaining <= 0:
            return False
        if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and not asked:
            return False  # over a limit with no hint of when: retrying would only add load
        await asyncio.sleep(min(self._policy.backoff(self.retried, asked), remaining))
        self.retried += 1
        return True


class Client:
    """Async client. Use as `async with Client() as client:` or call close().

    Calls that find the server, or its broker or backend, out of reach (gRPC UNAVAILABLE) are
    retried with exponential backoff and jitter for up to `max_retry_seconds` (default 30 s;
    0 turns retries off), or as `retry=CallRetry(...)` says. Retried are the calls that are
    safe to repeat: submit() and submit_batch() (each task gets a client-side UUID when its id
    is empty, so a submit that reached the server before the error is recognised: its retry's
    ALREADY_EXISTS counts as success), get_result() (which also retries DEADLINE_EXCEEDED, and
    keeps trying for as long as its `wait`), watch() (it subscribes again and skips the
    events it already gave) and cancel() (a retry after a cancel that was applied returns
    only what it still cancelled). A caller's own timeout (asyncio.timeout, wait_for) ends the
    retries with the call. Other errors are raised at once. Errors are the SDK's own
    (conveyor.errors: TaskNotFound, InvalidArgument, PermissionDenied, ResourceExhausted,
    Unavailable, ... all RpcFailed and ConveyorError), which are also grpc.aio.AioRpcError.

    With no address, the client reads CONVEYOR_ADDRESS (default 127.0.0.1:50051), and without
    `token` or `credentials` CONVEYOR_TOKEN and CONVEYOR_TLS_CA/_CERT/_KEY, as the CLI does.
    `strict_tasks=True` makes every submit refuse a task name no worker registered.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        channel: grpc.aio.Channel | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        options: Sequence[tuple[str, Any]] = (),
        retry: CallRetry | None = None,
        max_retry_seconds: float | None = None,
        strict_tasks: bool = False,
    ) -> None:
        self.address = address or default_address()
        # Every submit asks the server to refuse task names no worker registered (SubmitRequest.strict).
        self.strict_tasks = strict_tasks
        self._metadata = bearer_metadata(token)
        self.retry = retry or CallRetry()
        if max_retry_seconds is not None:
            self.retry = replace(self.retry, max_seconds=max_retry_seconds)
        if channel is None:
            opts = [("grpc.max_receive_message_length", 64 * 1024 * 1024), *options]
            channel = open_channel(self.address, credentials, opts)
        self._channel = channel
        self._stub = task_service_pb2_grpc.TaskServiceStub(channel)
        # submit() and get_result() travel on one stream: cheaper per call than unary RPCs.
        self._calls = CallStream(self._stub, self._metadata)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._calls.close()
        await self._channel.close()

    async def submit(self, target: Submittable | str, *args: Any, **kwargs: Any) -> Submitted:
        """Submit a task or workflow: submit(sig("add", 1, 2)), submit(chain(...)) or submit("add", 1, 2).

        With a sig or canvas, keyword options apply to the whole of it, as Celery's
        canvas.apply_async(args, kwargs, **options): `args` (prepended) and `kwargs` (merged)
        go to its first tasks, `queue` and `priority` to every task that sets none, `countdown`
        or `eta` delays its start: submit(chain(sig("add", 1), sig("mul", 3)), args=(2,), queue="math")."""
        options = None
        if isinstance(target, str):
            target = Sig(target, args, kwargs)
        elif args or set(kwargs) - set(CANVAS_OPTIONS):
            raise TypeError(
                f"with a sig or canvas, submit() takes only the options {', '.join(CANVAS_OPTIONS)}; "
                "task args go with a task name or in the sig()"
            )
        elif kwargs:
            options = canvas_options(**kwargs)
        if isinstance(target, Group | Chord) and streamed_group(target) is not None:
            target = read_head(target)  # a generator of one piece or less goes as a list would
            if streamed_group(target) is not None:
                return await self._submit_stream(target, options)
        request = with_task_ids(to_request(target))
        request.strict = self.strict_tasks
        if options is not None:
            request.options.CopyFrom(options)
        name = request.task.name if request.HasField("task") else "workflow"
        with tracing.span(f"submit {name}", kind=SpanKind.CLIENT):
            call = task_service_pb2.SessionRequest(submit=request, trace_context=tracing.inject())

            async def send() -> list[Submitted]:
                return [self._submitted((await self._calls.call(call)).submit)]

            (submitted,) = await self._submit_retrying(send, [request])
        return submitted

    async def _submit_stream(
        self, target: Group | Chord, options: task_service_pb2.CanvasOptions | None
    ) -> Submitted:
        """Submit a canvas whose root group (or chord header) is lazy and longer than a piece
        over SubmitStream: the members are read and sent a piece at a time. Not retried (the
        members were read once); a failure or a cancel mid-way submits nothing. The handle lists
        no task_ids (there may be very many): watch or read it by its workflow id."""
        lazy = streamed_group(target)
        assert lazy is not None and lazy.lazy is not None
        request = with_task_ids(to_request(opening(target)))
        request.strict = self.strict_tasks
        if options is not None:
            request.options.CopyFrom(options)
        parent_id = running_task_id()

        def prepare(member: workflow_pb2.Workflow) -> None:
            for signature in _task_nodes(member):
                _fill_id(signature, parent_id)

        with tracing.span("submit stream", kind=SpanKind.CLIENT):
            call = self._stub.SubmitStream(metadata=self._traced_metadata())
            try:
                await call.write(task_service_pb2.SubmitStreamRequest(open=request))
                sent = 0
                for piece in pieces(lazy.lazy, member_depth(target), prepare):
                    await call.write(task_service_pb2.SubmitStreamRequest(members=piece))
                    sent += len(piece.members)
                commit = task_service_pb2.SubmitStreamCommit(member_count=sent)
                await call.write(task_service_pb2.SubmitStreamRequest(commit=commit))
                await call.done_writing()
                response = await call
            except grpc.aio.AioRpcError as error:
                raise rpc_failed(error) from None
            except BaseException:
                call.cancel()  # the server drops what it received: nothing is submitted
                raise
        return Submitted(response.task_id, response.workflow_id, (), self)

    async def submit_batch(self, targets: Iterable[Submittable]) -> list[Submitted]:
        """Submit many in one round trip; all are accepted or none."""
        requests = [with_task_ids(to_request(t)) for t in targets]
        for each in requests:
            each.strict = self.strict_tasks
        request = task_service_pb2.SubmitBatchRequest(requests=requests)
        with tracing.span("submit batch", kind=SpanKind.CLIENT):

            async def send() -> list[Submitted]:
                response = await self._stub.SubmitBatch(request, metadata=self._traced_metadata())
                return [self._submitted(r) for r in response.responses]

            return await self._submit_retrying(send, requests)

    async def _submit_retrying(
        self, send: Callable[[], Awaitable[list[Submitted]]], requests: Sequence[task_service_pb2.SubmitRequest]
    ) -> list[Submitted]:
        retries = _Retries(self.retry, SUBMIT_RETRIED)
        while True:
            try:
                return await send()
            except grpc.aio.AioRpcError as error:
                if retries.retried and error.code() == grpc.StatusCode.ALREADY_EXISTS:
                    # An earlier try stored the tasks before its answer was lost.
                    return [await self._already_submitted(r) for r in requests]
                if not await retries.pause(error):
                    raise rpc_failed(error) from None

    async def _already_submitted(self, request: task_service_pb2.SubmitRequest) -> Submitted:
        """What the server answered the submit of `request` with (its ids are all set)."""
        if request.HasField("task"):
            return Submitted(request.task.id, "", (request.task.id,), self)
        workflow = request.workflow
        ids = _task_ids(workflow)
        if workflow.WhichOneof("kind") == "task":
            return Submitted(ids[0], "", ids, self)
        if not ids:
            raise ConveyorError("the submit's answer was lost and its workflow holds no task to find it by")
        stored = await self.get_result(ids[0])  # the workflow's id is the server's choice
        return Submitted(_result_task(workflow), stored.workflow_id, ids, self)

    def _traced_metadata(self) -> tuple[tuple[str, str], ...]:
        return (*self._metadata, *tracing.inject().items())

    async def get_result(self, task_id: str, wait: float = 0.0) -> result_pb2.TaskResult:
        """The task's record; with `wait`, waits up to that many seconds for it to finish."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        retries = _Retries(self.retry, UNAVAILABLE_OR_DEADLINE, at_least=wait)
        while True:
            remaining = max(deadline - loop.time(), 0.0)
            request = task_service_pb2.GetResultRequest(task_id=task_id)
            set_seconds(request.wait, min(remaining, WAIT_SLICE_SECONDS))
            try:
                response = (await self._calls.call(task_service_pb2.SessionRequest(get_result=request))).get_result
            except grpc.aio.AioRpcError as error:
                if await retries.pause(error):
                    continue
                raise rpc_failed(error) from None
            if response.result.state in TERMINAL or remaining <= WAIT_SLICE_SECONDS:
                return response.result

    async def result(self, task_id: str | Submitted, wait: float = 60.0) -> Any:
        """Wait for the task and return its value; raises TaskFailed, ResultIgnored (a task that
        ignores its result, once it succeeded) or TimeoutError. A workflow
        id (or a Submitted) gives the whole workflow's value: a group's list, a chain's last
        step's value, a chord's callback's; TaskFailed carries the error that ended it."""
        if isinstance(task_id, Submitted):
            task_id = task_id.result_id
        result = await self.get_result(task_id, wait=wait)
        if result.state not in TERMINAL:
            raise TimeoutError(f"task {task_id} is still {state_name(result.state)} after {wait} s")
        return value_of(result)

    async def watch(
        self, task_ids: Iterable[str] = (), *, workflow_id: str = "", until_done: bool = True
    ) -> AsyncIterator[result_pb2.TaskEvent]:
        """Stream state changes (history first); ends when all are finished unless until_done=False.

        A stream that breaks is opened again; the server replays each task's history, and the
        events already given are skipped."""
        request = task_service_pb2.WatchResultsRequest(
            task_ids=list(task_ids), workflow_id=workflow_id, until_done=until_done,
            max_events_per_response=WATCH_EVENTS_PER_RESPONSE,
        )
        given: dict[str, int] = {}  # events given so far, per task (each history only grows)
        retries = _Retries(self.retry, UNAVAILABLE)
        while True:
            replayed: dict[str, int] = {}
            try:
                async for response in self._stub.WatchResults(request, metadata=self._metadata):
                    # A server that predates batches sends one event per response, in `event`.
                    for event in response.events if response.events else [response.event]:
                        replayed[event.task_id] = seen = replayed.get(event.task_id, 0) + 1
                        if seen <= given.get(event.task_id, 0):
                            continue
                        given[event.task_id] = seen
                        retries.reset()
                        yield event
                return
            except grpc.aio.AioRpcError as error:
                if not await retries.pause(error):
                    raise rpc_failed(error) from None

    async def events(
        self, task_ids: Iterable[str] = (), *, workflow_id: str = ""
    ) -> list[result_pb2.TaskEvent]:
        """Every event of the tasks (or workflow) until they finished: watch() as a list."""
        return [event async for event in self.watch(task_ids, workflow_id=workflow_id)]

    async def cancel(self, task_or_workflow_id: str) -> list[str]:
        """Cancel a task or a workflow's remaining tasks; returns the ids that moved to CANCELLED."""
        request = task_service_pb2.CancelRequest(id=task_or_workflow_id)
        response = await self._unary(lambda: self._stub.Cancel(request, metadata=self._metadata))
        return list(response.cancelled_task_ids)

    async def get_workflow(self, workflow_id: str) -> task_service_pb2.GetWorkflowResponse:
        request = task_service_pb2.GetWorkflowRequest(workflow_id=workflow_id)
        return await self._unary(lambda: self._stub.GetWorkflow(request, metadata=self._metadata))

    async def _unary(self, call: Callable[[], Awaitable[T]]) -> T:
        """An idempotent call, retried while UNAVAILABLE."""
        retries = _Retries(self.retry, UNAVAILABLE)
        while True:
            try:
                return await call()
            except grpc.aio.AioRpcError as error:
                if not await retries.pause(error):
                    raise rpc_failed(error) from None

    def _submitted(self, response: task_service_pb2.SubmitResponse) -> Submitted:
        return Submitted(response.task_id, response.workflow_id, tuple(response.task_ids), self)
