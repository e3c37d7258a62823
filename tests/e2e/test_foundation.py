"""Foundation acceptance: processes, restarts, watch, windows, bad input, discovery."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from conveyor import Client, sig, state_name
from conveyor.v1 import result_pb2, task_pb2, task_service_pb2, task_service_pb2_grpc
from conveyor_server.app import ConveyorServer
from conveyor_server.config import Limits, Settings
from tests.support.processes import REPO, Proc, Server, WorkerProc


def cli(address: str, *args: str) -> str:
    """Run a client command as its own OS process and return what it printed."""
    done = subprocess.run(
        [sys.executable, "-m", "conveyor_server.cli", "--address", address, *args],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_default_server_worker_and_client_processes_and_restart(tmp_path: Path, procs: list[Proc]) -> None:
    # `conveyor serve` with no engine flags: the embedded SQLite default, in the current folder.
    server = Server(tmp_path, cwd=tmp_path)
    procs.append(server)
    assert (tmp_path / "conveyor.db").exists()
    procs.append(WorkerProc(tmp_path, server.address))

    out = cli(server.address, "submit", "add", "2", "3", "--wait", "20")
    task_id, printed = out.splitlines()
    assert printed == "5"  # the result value alone; -o json prints the record

    server.stop()
    server.restart()
    after = json.loads(cli(server.address, "get", task_id, "-o", "json"))
    assert after["state"] == "SUCCESS"
    assert after["result"] == 5
    assert [h["state"] for h in after["history"]] == ["PENDING", "RECEIVED", "STARTED", "SUCCESS"]


def test_queued_task_survives_server_restart(tmp_path: Path, procs: list[Proc]) -> None:
    db = tmp_path / "c.db"
    server = Server(tmp_path, f"sqlite:///{db}", f"sqlite:///{db}")
    procs.append(server)
    task_id = cli(server.address, "submit", "mul", "6", "7").strip()
    server.stop()
    server.restart()
    procs.append(WorkerProc(tmp_path, server.address))
    assert json.loads(cli(server.address, "-o", "json", "get", task_id, "--wait", "20"))["result"] == 42


EXPECTED_STATES = ["PENDING", "RECEIVED", "STARTED", "SUCCESS"]


async def test_watch_streams_every_state_live_and_late(
    tmp_path: Path, procs: list[Proc], sqlite_server: Server, client: Client
) -> None:
    submitted = await client.submit(sig("sleep", 0.3))
    watch = asyncio.ensure_future(_states(client, submitted.task_id))
    procs.append(WorkerProc(tmp_path, sqlite_server.address))
    assert await asyncio.wait_for(watch, 30) == EXPECTED_STATES
    # A subscriber that joins after completion first gets what happened.
    assert await _states(client, submitted.task_id) == EXPECTED_STATES


async def _states(client: Client, task_id: str) -> list[str]:
    return [state_name(e.state) async for e in client.watch([task_id])]


async def test_worker_window_is_never_exceeded(tmp_path: Path, procs: list[Proc]) -> None:
    settings = Settings(port=0, http_port=0, broker_url="memory://", backend_url="memory://")
    server = ConveyorServer(settings)
    port = await server.start()
    try:
        procs.append(WorkerProc(tmp_path, f"127.0.0.1:{port}", concurrency=4))
        async with Client(f"127.0.0.1:{port}") as client:
            submitted = await client.submit_batch(sig("sleep", 0.02) for _ in range(200))
            for item in submitted:
                assert (await client.get_result(item.task_id, wait=30)).state == result_pb2.TASK_STATE_SUCCESS
        (session,) = server.core.registry.sessions.values()
        assert session.window == 16, "4 slots, each prefetching 4 tasks"
        assert session.high_water == 16, "the worker's window was filled but never exceeded"
    finally:
        await server.stop()


async def test_a_task_no_worker_registered_waits_and_can_be_cancelled(
    tmp_path: Path, procs: list[Proc], sqlite_server: Server, client: Client
) -> None:
    procs.append(WorkerProc(tmp_path, sqlite_server.address))
    submitted = await client.submit("no_such_task", 1)
    # The worker never gets it (it did not register the name), so it is not failed: it waits.
    assert await client.result((await client.submit("add", 2, 3)).task_id, wait=20) == 5
    result = await client.get_result(submitted.task_id, wait=1.0)
    assert state_name(result.state) == "PENDING" and result.attempts == 0
    await client.cancel(submitted.task_id)
    result = await client.get_result(submitted.task_id, wait=20)
    assert state_name(result.state) == "CANCELLED"


BAD_SIGNATURES = {
    "empty name": task_pb2.Signature(name=""),
    "eta and countdown": task_pb2.Signature(
        name="x", eta=Timestamp(seconds=2_000_000_000), countdown=Duration(seconds=1)
    ),
    "eta in milliseconds": task_pb2.Signature(name="x", eta=Timestamp(seconds=1_700_000_000_000)),
    "eta bad nanos": task_pb2.Signature(name="x", eta=Timestamp(seconds=1_700_000_000, nanos=-5)),
    "negative countdown": task_pb2.Signature(name="x", countdown=Duration(seconds=-1)),
    "oversize args": task_pb2.Signature(name="x", args=[task_pb2.Value(bytes_value=b"x" * 2048)]),
    "bad queue": task_pb2.Signature(name="x", queue="no spaces allowed"),
    "bad priority": task_pb2.Signature(name="x", priority=12),
    "bad jitter": task_pb2.Signature(name="x", retry=task_pb2.RetryPolicy(jitter=3.0)),
}


@pytest.fixture
async def small_limits_server() -> object:
    settings = Settings(port=0, http_port=0, broker_url="memory://", backend_url="memory://",
                        limits=Limits(max_args_bytes=1024))
    server = ConveyorServer(settings)
    await server.start()
    yield server
    await server.stop()


@pytest.mark.parametrize("case", sorted(BAD_SIGNATURES))
async def test_malformed_submissions_are_invalid_argument(small_limits_server: ConveyorServer, case: str) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{small_limits_server.port}") as channel:
        stub = task_service_pb2_grpc.TaskServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Submit(task_service_pb2.SubmitRequest(task=BAD_SIGNATURES[case]))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details()


async def test_unknown_ids_are_not_found(small_limits_server: ConveyorServer) -> None:
    async with Client(f"127.0.0.1:{small_limits_server.port}") as client:
        for call in (client.get_result("missing"), client.cancel("missing")):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call
            assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await _states(client, "missing")
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        assert "missing" in (raised.value.details() or "")


async def test_reflection_lists_services_and_health_answers(small_limits_server: ConveyorServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{small_limits_server.port}") as channel:
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        services = None
        files = None
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="conveyor.v1.TaskService"),
        ]
        async for reply in reflection.ServerReflectionInfo(iter(requests)):
            if reply.HasField("list_services_response"):
                services = {s.name for s in reply.list_services_response.service}
            elif reply.HasField("file_descriptor_response"):
                files = [descriptor_pb2.FileDescriptorProto.FromString(b)
                         for b in reply.file_descriptor_response.file_descriptor_proto]
        assert services is not None
        assert {"conveyor.v1.TaskService", "conveyor.v1.WorkerService", "conveyor.v1.AdminService",
                "grpc.health.v1.Health"} <= services
        assert files and any(f.name == "conveyor/v1/task_service.proto" for f in files)

        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "conveyor.v1.TaskService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
