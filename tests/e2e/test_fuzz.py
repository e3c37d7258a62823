"""Property tests: random and malformed messages at every RPC. The server never crashes,
always answers with a deliberate status, and never loses a task it accepted: after each fuzzing
test a worker subscribed to every accepted queue runs whatever comes, and every accepted id
must reach a terminal state (those of a submission with an ETA in the future are cancelled
first, and must end CANCELLED). Each test checks its own submissions, so any order works."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conveyor.v1 import (
    admin_service_pb2,
    result_pb2,
    task_pb2,
    task_service_pb2,
    task_service_pb2_grpc,
    worker_service_pb2,
    worker_service_pb2_grpc,
    workflow_pb2,
)
from tests.support.processes import Server, serving, wait_for

# Statuses the server chooses on purpose; UNKNOWN or INTERNAL would mean an unhandled error.
DELIBERATE = {
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
}
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# How long the accepted tasks of one test may take to end, once a worker runs them.
DRAIN_SECONDS = 60.0
TERMINAL = {result_pb2.TASK_STATE_SUCCESS, result_pb2.TASK_STATE_FAILURE, result_pb2.TASK_STATE_CANCELLED}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    logs: Path = tmp_path_factory.mktemp("fuzz")
    process = Server(logs, "memory://", "memory://", env={"CONVEYOR_LIMITS__MAX_ARGS_BYTES": "4096"})
    yield process
    assert process.alive(), f"the server died during fuzzing:\n{process.output()[-3000:]}"
    process.stop()


@pytest.fixture(scope="module")
def channel(server: Server) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as opened:
        yield opened


class Accepted:
    """What a test's submissions got accepted: task ids, the queues they use, and the ids of
    submissions that have an ETA in the future somewhere (those may wait, and are cancelled)."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.queues: set[str] = set()
        self.waiting: set[str] = set()

    def add(self, request: task_service_pb2.SubmitRequest, task_ids: Iterable[str]) -> None:
        ids = list(task_ids)
        self.ids += ids
        signatures = list(_signatures(request))
        self.queues |= {s.queue or "default" for s in signatures}
        now = time.time()
        if any(s.HasField("eta") and s.eta.seconds + s.eta.nanos / 1e9 > now - 1 for s in signatures):
            self.waiting |= set(ids)


def _signatures(request: task_service_pb2.SubmitRequest) -> Iterator[task_pb2.Signature]:
    if request.HasField("task"):
        yield request.task
    if request.HasField("workflow"):
        yield from _workflow_signatures(request.workflow)


def _workflow_signatures(flow: workflow_pb2.Workflow) -> Iterator[task_pb2.Signature]:
    kind = flow.WhichOneof("kind")
    if kind == "task":
        yield flow.task
    elif kind == "chain":
        for step in flow.chain.steps:
            yield from _workflow_signatures(step)
    elif kind == "group":
        for member in flow.group.members:
            yield from _workflow_signatures(member)
    elif kind == "chord":
        for member in flow.chord.header.members:
            yield from _workflow_signatures(member)
        yield from _workflow_signatures(flow.chord.callback)


def assert_all_end(channel: grpc.Channel, accepted: Accepted) -> None:
    """Run every accepted task (a raw worker that succeeds at anything, on every accepted queue),
    cancel what waits for a future ETA, and require every accepted id to reach a terminal state."""
    assert accepted.ids, "the fuzzing accepted some tasks"
    tasks = task_service_pb2_grpc.TaskServiceStub(channel)

    def states() -> dict[str, int]:
        found: dict[str, int] = {}
        for task_id in set(accepted.ids):
            reply = tasks.GetResult(task_service_pb2.GetResultRequest(task_id=task_id), timeout=10)  # NOT_FOUND raises
            found[task_id] = reply.result.state
        return found

    def unfinished() -> set[str]:
        return {task_id for task_id, state in states().items() if state not in TERMINAL}

    def explain(task_ids: set[str]) -> str:
        replies = [tasks.GetResult(task_service_pb2.GetResultRequest(task_id=t), timeout=10).result
                   for t in sorted(task_ids)[:5]]
        return "; ".join(
            f"{r.task_id} {r.name!r} on {r.queue!r}: {result_pb2.TaskState.Name(r.state)}" for r in replies
        )

    # One worker per queue: a worker on several queues may starve some of them (its window is
    # reserved by one queue's waiting fetch at a time), which is not what this test is about.
    with contextlib.ExitStack() as workers:
        for name in sorted(accepted.queues):
            workers.enter_context(_RunAnything(channel, name))
        try:
            wait_for(lambda: not unfinished() - accepted.waiting, DRAIN_SECONDS, "every task without an ETA ended")
            for task_id in unfinished():
                tasks.Cancel(task_service_pb2.CancelRequest(id=task_id), timeout=10)
            wait_for(lambda: not unfinished(), DRAIN_SECONDS, "every accepted task ended")
        except AssertionError as failed:
            left = unfinished()
            raise AssertionError(f"{failed}: {len(left)} of {len(set(accepted.ids))} not: {explain(left)}") from None


class _RunAnything:
    """A worker on the raw protocol, in a thread: every assignment succeeds at once."""

    def __init__(self, channel: grpc.Channel, queue_name: str) -> None:
        self._outbox: queue.Queue[worker_service_pb2.ConnectRequest | None] = queue.Queue()
        self._outbox.put(worker_service_pb2.ConnectRequest(hello=worker_service_pb2.Hello(
            language="python-fuzz", queues=[queue_name], max_in_flight=100)))
        self._call = worker_service_pb2_grpc.WorkerServiceStub(channel).Connect(self._requests())
        self.error: grpc.RpcError | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)

    def __enter__(self) -> _RunAnything:
        self._reader.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._outbox.put(None)
        self._call.cancel()
        self._reader.join(10)
        assert self.error is None, f"the worker's stream failed: {self.error}"

    def _requests(self) -> Iterator[worker_service_pb2.ConnectRequest]:
        while (message := self._outbox.get()) is not None:
            yield message

    def _read(self) -> None:
        try:
            for message in self._call:
                if message.WhichOneof("message") != "assignments":
                    continue
                outcomes = [worker_service_pb2.TaskOutcome(
                    task_id=item.task.id, lease_token=item.lease_token, outcome=worker_service_pb2.OUTCOME_SUCCESS,
                    result=task_pb2.Value(int_value=1),
                ) for item in message.assignments.items]
                self._outbox.put(worker_service_pb2.ConnectRequest(results=worker_service_pb2.Results(outcomes=outcomes)))
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:
                self.error = error

texts = st.text(max_size=40) | st.sampled_from(["add", "default", " ", "a b", "\x00", "x" * 300])
values = st.one_of(
    st.builds(task_pb2.Value),
    st.builds(task_pb2.Value, int_value=st.integers(-(2**63), 2**63 - 1)),
    st.builds(task_pb2.Value, double_value=st.floats(allow_nan=True)),
    st.builds(task_pb2.Value, string_value=st.text(max_size=50)),
    st.builds(task_pb2.Value, bool_value=st.booleans()),
    st.builds(task_pb2.Value, bytes_value=st.binary(max_size=6000)),
    st.builds(task_pb2.Value, json_value=st.text(max_size=50)),
)
retries = st.builds(
    task_pb2.RetryPolicy, max_attempts=st.integers(-5, 20), backoff=st.integers(0, 3),
    jitter=st.floats(-1, 2, allow_nan=False),
)
signatures = st.builds(
    task_pb2.Signature,
    id=st.one_of(st.just(""), texts), name=texts, queue=st.one_of(st.just(""), texts),
    args=st.lists(values, max_size=4), kwargs=st.dictionaries(st.text(max_size=8), values, max_size=3),
    priority=st.integers(-3, 12), retry=retries, immutable=st.booleans(),
    idempotency_key=st.one_of(st.just(""), st.text(max_size=10)),
    eta=st.one_of(st.none(), st.builds(
        Timestamp, seconds=st.integers(-(10**12), 10**12), nanos=st.integers(-(10**9) + 1, 10**9 - 1)
    )),
)
workflows = st.recursive(
    st.builds(workflow_pb2.Workflow, task=signatures),
    lambda inner: st.one_of(
        st.builds(lambda steps: workflow_pb2.Workflow(chain=workflow_pb2.Chain(steps=steps)),
                  st.lists(inner, max_size=4)),
        st.builds(lambda members: workflow_pb2.Workflow(group=workflow_pb2.Group(members=members)),
                  st.lists(inner, max_size=4)),
        st.builds(lambda members, callback, policy: workflow_pb2.Workflow(chord=workflow_pb2.Chord(
            header=workflow_pb2.Group(members=members), callback=callback, failure_policy=policy)),
            st.lists(inner, max_size=3), inner, st.integers(0, 2)),
        st.just(workflow_pb2.Workflow()),
    ),
    max_leaves=12,
)
# Well-formed submissions too, so that every run accepts some tasks whose fate it then checks.
valid_requests = st.builds(task_service_pb2.SubmitRequest, task=st.builds(
    task_pb2.Signature, name=st.sampled_from(["add", "echo"]), queue=st.sampled_from(["", "fuzz-a", "fuzz-b"]),
    args=st.lists(st.builds(task_pb2.Value, int_value=st.integers(-100, 100)), max_size=2),
    priority=st.integers(0, 9),
))
requests = st.one_of(
    st.builds(task_service_pb2.SubmitRequest, task=signatures),
    st.builds(task_service_pb2.SubmitRequest, workflow=workflows),
    st.just(task_service_pb2.SubmitRequest()),
    valid_requests,
)


def _deliberate(error: grpc.RpcError) -> None:
    assert error.code() in DELIBERATE, f"{error.code()}: {error.details()}"
    assert error.details(), "a refusal must say why"


def test_submit_answers_or_refuses_clearly_and_loses_nothing(channel: grpc.Channel) -> None:
    stub = task_service_pb2_grpc.TaskServiceStub(channel)
    accepted = Accepted()

    @FUZZ
    @given(request=requests)
    def submit(request: task_service_pb2.SubmitRequest) -> None:
        try:
            response = stub.Submit(request, timeout=10)
        except grpc.RpcError as error:
            _deliberate(error)
            return
        accepted.add(request, response.task_ids)

    submit()
    assert_all_end(channel, accepted)


def test_batches_are_all_or_nothing_and_lose_nothing(channel: grpc.Channel) -> None:
    stub = task_service_pb2_grpc.TaskServiceStub(channel)
    accepted = Accepted()

    @FUZZ
    @given(batch=st.lists(requests, max_size=5) | st.lists(valid_requests, min_size=1, max_size=5))
    def submit_batch(batch: list[task_service_pb2.SubmitRequest]) -> None:
        try:
            response = stub.SubmitBatch(task_service_pb2.SubmitBatchRequest(requests=batch), timeout=10)
        except grpc.RpcError as error:
            _deliberate(error)
            return
        assert len(response.responses) == len(batch)
        for request, reply in zip(batch, response.responses, strict=True):
            accepted.add(request, reply.task_ids)

    submit_batch()
    assert_all_end(channel, accepted)


READ_CALLS: list[tuple[str, Any]] = [
    ("/conveyor.v1.TaskService/GetResult", task_service_pb2.GetResultRequest),
    ("/conveyor.v1.TaskService/Cancel", task_service_pb2.CancelRequest),
    ("/conveyor.v1.TaskService/GetWorkflow", task_service_pb2.GetWorkflowRequest),
    ("/conveyor.v1.AdminService/InspectTask", admin_service_pb2.InspectTaskRequest),
    ("/conveyor.v1.AdminService/PurgeQueue", admin_service_pb2.PurgeQueueRequest),
    ("/conveyor.v1.AdminService/ListDeadLetters", admin_service_pb2.ListDeadLettersRequest),
]


@FUZZ
@given(index=st.integers(0, len(READ_CALLS) - 1), text=texts, payload=st.binary(max_size=200))
def test_every_unary_call_survives_random_fields_and_bytes(
    channel: grpc.Channel, index: int, text: str, payload: bytes
) -> None:
    method, message = READ_CALLS[index]
    field = message.DESCRIPTOR.fields[0]
    structured = message(**{field.name: text}) if field.type == field.TYPE_STRING else message()
    call: grpc.UnaryUnaryMultiCallable[Any, bytes] = channel.unary_unary(
        method, request_serializer=lambda m: m.SerializeToString(), response_deserializer=lambda b: b
    )
    try:
        call(structured, timeout=10)
    except grpc.RpcError as error:
        _deliberate(error)
    raw = channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    try:
        raw(payload, timeout=10)
    except grpc.RpcError as error:
        _deliberate(error)


worker_messages = st.one_of(
    st.builds(worker_service_pb2.ConnectRequest, hello=st.builds(
        worker_service_pb2.Hello, queues=st.lists(texts, max_size=3), max_in_flight=st.integers(-3, 5))),
    st.builds(worker_service_pb2.ConnectRequest, heartbeat=st.builds(worker_service_pb2.Heartbeat)),
    st.builds(worker_service_pb2.ConnectRequest, credit=st.builds(
        worker_service_pb2.Credit, max_in_flight=st.integers(-5, 50))),
    st.builds(worker_service_pb2.ConnectRequest, results=st.builds(worker_service_pb2.Results, outcomes=st.lists(
        st.builds(worker_service_pb2.TaskOutcome, task_id=texts, lease_token=texts, outcome=st.integers(0, 4)),
        max_size=3))),
    st.builds(worker_service_pb2.ConnectRequest, reject=st.builds(worker_service_pb2.Reject, tasks=st.lists(
        st.builds(worker_service_pb2.RejectedTask, task_id=texts, lease_token=texts), max_size=2))),
    st.builds(worker_service_pb2.ConnectRequest, started=st.builds(worker_service_pb2.Started)),
    st.builds(worker_service_pb2.ConnectRequest, goodbye=st.builds(worker_service_pb2.Goodbye)),
    st.just(worker_service_pb2.ConnectRequest()),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=st.lists(worker_messages, max_size=6))
def test_worker_streams_with_random_messages(
    channel: grpc.Channel, messages: list[worker_service_pb2.ConnectRequest]
) -> None:
    stub = worker_service_pb2_grpc.WorkerServiceStub(channel)
    # Queues named here are fuzz-only: the stream must not take the accepted tasks.
    safe = [_confine(m) for m in messages]
    # The client half-closes after its messages: the server must answer that by ending the
    # stream (or refuse a message), never leave it hanging until the deadline.
    try:
        for _ in stub.Connect(iter(safe), timeout=10):
            pass
    except grpc.RpcError as error:
        _deliberate(error)


def _confine(message: worker_service_pb2.ConnectRequest) -> worker_service_pb2.ConnectRequest:
    if message.HasField("hello"):
        message.hello.ClearField("queues")
        message.hello.queues.append("fuzz-only")
    return message


def test_the_server_is_alive(server: Server) -> None:
    assert serving(server.address)
    assert server.alive()
