"""Property tests: random and malformed messages at every RPC. The server never crashes,
always answers with a deliberate status, and never loses a task it accepted."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conveyor.v1 import (
    admin_service_pb2,
    task_pb2,
    task_service_pb2,
    task_service_pb2_grpc,
    worker_service_pb2,
    worker_service_pb2_grpc,
    workflow_pb2,
)
from tests.support.processes import Server, serving

# Statuses the server chooses on purpose; UNKNOWN or INTERNAL would mean an unhandled error.
DELIBERATE = {
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
}
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


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


accepted: list[str] = []

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
requests = st.one_of(
    st.builds(task_service_pb2.SubmitRequest, task=signatures),
    st.builds(task_service_pb2.SubmitRequest, workflow=workflows),
    st.just(task_service_pb2.SubmitRequest()),
)


def _deliberate(error: grpc.RpcError) -> None:
    assert error.code() in DELIBERATE, f"{error.code()}: {error.details()}"
    assert error.details(), "a refusal must say why"


@FUZZ
@given(request=requests)
def test_submit_answers_or_refuses_clearly(channel: grpc.Channel, request: task_service_pb2.SubmitRequest) -> None:
    stub = task_service_pb2_grpc.TaskServiceStub(channel)
    try:
        response = stub.Submit(request, timeout=10)
    except grpc.RpcError as error:
        _deliberate(error)
        return
    accepted.extend(response.task_ids)


@FUZZ
@given(batch=st.lists(requests, max_size=5))
def test_batches_are_all_or_nothing(channel: grpc.Channel, batch: list[task_service_pb2.SubmitRequest]) -> None:
    stub = task_service_pb2_grpc.TaskServiceStub(channel)
    try:
        response = stub.SubmitBatch(task_service_pb2.SubmitBatchRequest(requests=batch), timeout=10)
    except grpc.RpcError as error:
        _deliberate(error)
        return
    assert len(response.responses) == len(batch)
    accepted.extend(t for r in response.responses for t in r.task_ids)


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
    try:
        for _ in stub.Connect(iter(safe), timeout=3):
            pass
    except grpc.RpcError as error:
        assert error.code() in DELIBERATE | {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}, error


def _confine(message: worker_service_pb2.ConnectRequest) -> worker_service_pb2.ConnectRequest:
    if message.HasField("hello"):
        message.hello.ClearField("queues")
        message.hello.queues.append("fuzz-only")
    return message


def test_the_server_is_alive_and_lost_nothing(server: Server, channel: grpc.Channel) -> None:
    assert serving(server.address)
    stub = task_service_pb2_grpc.TaskServiceStub(channel)
    assert accepted, "the fuzzing accepted some tasks"
    for task_id in set(accepted):
        stub.GetResult(task_service_pb2.GetResultRequest(task_id=task_id), timeout=10)  # NOT_FOUND would raise
