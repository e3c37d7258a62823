"""Issue #19 item 5, through a real gRPC server: refusals carry google.rpc details in their
trailers (bad input: BadRequest; an unknown task: ErrorInfo with its id; a rate limit:
RetryInfo), the Session stream's answers carry the same, the SDK exposes them, and server
reflection answers on v1 and v1alpha (a Python reflection client and `buf curl`)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2  # type: ignore[import-untyped]
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from grpc_status import rpc_status

from conveyor import Client, FieldViolation, InvalidArgument, ResourceExhausted, TaskNotFound, sig
from conveyor.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc, worker_service_pb2, worker_service_pb2_grpc
from conveyor_server.app import ConveyorServer
from conveyor_server.config import Security, Settings

pytestmark = pytest.mark.timeout(60)
NODE = shutil.which("node")
NODE_LIB = Path(__file__).resolve().parents[2] / "workers" / "node" / "lib"
# Prints the details the Node client exposes for a bad submit and an unknown task.
NODE_SCRIPT = """
const { Client } = require(process.argv[1]);
const client = new Client(process.argv[2]);
const seen = [];
async function refusal(call) {
  try { await call(); } catch (e) { seen.push([e.code, e.reason, e.errorMetadata, e.fieldViolations]); }
}
(async () => {
  await refusal(() => client.submit('add', [], {}, { queue: 'has space' }));
  await refusal(() => client.getResult('rich-errors-node'));
  client.close();
  console.log(JSON.stringify(seen));
})();
"""
RATE, BURST = 0.5, 2  # one task every 2 s after a burst of 2


@pytest.fixture
async def address() -> AsyncIterator[str]:
    settings = Settings(port=0, http_port=0, broker_url="memory://", backend_url="memory://").replace(
        security=Security(submit_rate_per_second=RATE, submit_burst=BURST)
    )
    server = ConveyorServer(settings)
    port = await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop()


@pytest.fixture
async def stub(address: str) -> AsyncIterator[task_service_pb2_grpc.TaskServiceAsyncStub]:
    async with grpc.aio.insecure_channel(address) as channel:
        yield task_service_pb2_grpc.TaskServiceStub(channel)


async def test_the_node_client_exposes_reason_metadata_and_field_violations(address: str) -> None:
    if NODE is None or not (NODE_LIB.parent / "node_modules").is_dir():
        pytest.skip("node or workers/node/node_modules is missing")
    ran = await asyncio.to_thread(subprocess.run, [NODE, "-e", NODE_SCRIPT, str(NODE_LIB), address],
                                  capture_output=True, text=True, timeout=30)
    assert ran.returncode == 0, ran.stderr
    bad, missing = json.loads(ran.stdout)
    assert bad[:3] == [grpc.StatusCode.INVALID_ARGUMENT.value[0], "INVALID_ARGUMENT", {}]
    assert [v["field"] for v in bad[3]] == ["task.queue"]
    assert missing == [grpc.StatusCode.NOT_FOUND.value[0], "TASK_NOT_FOUND", {"task_id": "rich-errors-node"}, []]


def details_of(error: grpc.aio.AioRpcError) -> dict[str, Any]:
    """The google.rpc details in the error's trailers, by type name (grpcio-status decodes them)."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "a grpc-status-details-bin trailer"
    found: dict[str, Any] = {}
    for detail in status.details:
        for kind in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest, error_details_pb2.RetryInfo):
            if detail.Is(kind.DESCRIPTOR):
                found[kind.__name__] = kind()
                detail.Unpack(found[kind.__name__])
    return found


async def test_bad_input_is_invalid_argument_with_the_field_in_a_bad_request(
    stub: task_service_pb2_grpc.TaskServiceAsyncStub, address: str,
) -> None:
    request = task_service_pb2.SubmitRequest(task=task_pb2.Signature(name="add", queue="has space"))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Submit(request)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = details_of(refused.value)
    assert (details["ErrorInfo"].reason, details["ErrorInfo"].domain) == ("INVALID_ARGUMENT", "conveyor.dev")
    [violation] = details["BadRequest"].field_violations
    assert violation.field == "task.queue"
    assert violation.description == refused.value.details()
    # The SDK, over its Session stream, exposes the same.
    async with Client(address, max_retry_seconds=0) as client:
        with pytest.raises(InvalidArgument) as sdk_refused:
            await client.submit(sig("add").set(queue="has space"))
    assert sdk_refused.value.reason == "INVALID_ARGUMENT"
    assert sdk_refused.value.field_violations == (FieldViolation("task.queue", violation.description),)


async def test_an_unknown_task_is_not_found_with_error_info(
    stub: task_service_pb2_grpc.TaskServiceAsyncStub, address: str,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.GetResult(task_service_pb2.GetResultRequest(task_id="rich-errors-missing"))
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    details = details_of(refused.value)
    assert set(details) == {"ErrorInfo"}
    info = details["ErrorInfo"]
    assert (info.reason, info.domain, dict(info.metadata)) == (
        "TASK_NOT_FOUND", "conveyor.dev", {"task_id": "rich-errors-missing"}
    )
    async with Client(address, max_retry_seconds=0) as client:
        with pytest.raises(TaskNotFound) as sdk_refused:
            await client.get_result("rich-errors-missing")
    assert sdk_refused.value.reason == "TASK_NOT_FOUND"
    assert sdk_refused.value.metadata == {"task_id": "rich-errors-missing"}


async def test_a_rate_limit_is_resource_exhausted_with_retry_info(
    stub: task_service_pb2_grpc.TaskServiceAsyncStub, address: str,
) -> None:
    batch = task_service_pb2.SubmitBatchRequest(
        requests=[task_service_pb2.SubmitRequest(task=task_pb2.Signature(name="add")) for _ in range(BURST)]
    )
    await stub.SubmitBatch(batch)  # the whole burst
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Submit(task_service_pb2.SubmitRequest(task=task_pb2.Signature(name="add")))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = details_of(refused.value)
    assert details["ErrorInfo"].reason == "RATE_LIMITED"
    delay = details["RetryInfo"].retry_delay.ToTimedelta().total_seconds()
    assert 0 < delay <= 1 / RATE
    async with Client(address, max_retry_seconds=0) as client:
        with pytest.raises(ResourceExhausted) as sdk_refused:
            await client.submit(sig("add"))
    assert sdk_refused.value.reason == "RATE_LIMITED"
    assert sdk_refused.value.retry_after is not None and 0 < sdk_refused.value.retry_after <= 1 / RATE


async def test_a_refused_worker_stream_carries_error_info(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = worker_service_pb2_grpc.WorkerServiceStub(channel)
        first = worker_service_pb2.ConnectRequest(credit=worker_service_pb2.Credit())
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in stub.Connect(iter([first])):
                pass
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details_of(refused.value)["ErrorInfo"].reason == "HELLO_REQUIRED"


async def test_reflection_answers_v1alpha_with_a_reflection_client(address: str) -> None:
    def ask() -> tuple[set[str], str]:  # a blocking client, off the server's event loop
        with grpc.insecure_channel(address) as channel:
            database = ProtoReflectionDescriptorDatabase(channel)
            described = database.FindFileContainingSymbol("grpc.reflection.v1.ServerReflection")
            return set(database.get_services()), described.package

    services, package = await asyncio.to_thread(ask)
    assert {"conveyor.v1.TaskService", "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"} <= services
    assert package == "grpc.reflection.v1"


async def test_reflection_answers_v1(address: str) -> None:
    # v1's messages are v1alpha's, renamed: the same bytes on the wire.
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        stream = call(iter([
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="conveyor.v1.TaskService"),
        ]))
        listed, described = [response async for response in stream]
    assert "conveyor.v1.TaskService" in {s.name for s in listed.list_services_response.service}
    assert described.file_descriptor_response.file_descriptor_proto, described.error_response


@pytest.mark.parametrize("protocol", ["grpc-v1", "grpc-v1alpha"])
async def test_buf_curl_lists_services_over_each_reflection_protocol(address: str, protocol: str) -> None:
    buf = shutil.which("buf") or shutil.which("buf", path=str(Path(sys.executable).parent))
    if buf is None:
        pytest.skip("buf is not installed")
    listed = await asyncio.to_thread(subprocess.run, [
        buf, "curl", "--protocol", "grpc", "--http2-prior-knowledge", "--reflect-protocol", protocol,
        "--list-services", f"http://{address}",
    ], capture_output=True, text=True, timeout=30)
    assert listed.returncode == 0, listed.stderr
    assert "conveyor.v1.TaskService" in listed.stdout.split()
