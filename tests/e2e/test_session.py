"""TaskService.Session: the client's submit() and get_result() share one stream; calls are
answered in any order, fail exactly as the unary calls do, and survive a server restart."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Collection

import grpc
import pytest

from conveyor import Client, Worker, sig, state_name
from conveyor.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc
from conveyor_server.app import ConveyorServer, Core
from conveyor_server.backends.base import Changes
from conveyor_server.backends.memory import MemoryBackend
from conveyor_server.brokers.memory import MemoryBroker
from conveyor_server.config import Settings
from tests.support.processes import eventually


@pytest.fixture
async def server() -> AsyncIterator[ConveyorServer]:
    started = ConveyorServer(Settings(port=0, http_port=0, broker_url="memory://", backend_url="memory://"))
    await started.start()
    try:
        yield started
    finally:
        await started.stop()


def _address(server: ConveyorServer) -> str:
    return f"127.0.0.1:{server.port}"


async def test_a_long_wait_does_not_hold_up_other_calls(server: ConveyorServer) -> None:
    worker = Worker(_address(server), concurrency=2)
    release = asyncio.Event()

    @worker.task("gate")
    async def gate() -> str:
        await release.wait()
        return "opened"

    @worker.task("add")
    def add(x: int, y: int) -> int:
        return x + y

    running = asyncio.create_task(worker.run())
    try:
        async with Client(_address(server)) as client:
            gated = await client.submit("gate")
            waiting = asyncio.create_task(client.result(gated.task_id, wait=30))
            # Submitted and answered on the same stream while the first call still waits.
            quick = [await client.submit("add", i, 1) for i in range(5)]
            assert [await client.result(s.task_id, wait=10) for s in quick] == [1, 2, 3, 4, 5]
            assert not waiting.done()
            release.set()
            assert await waiting == "opened"
    finally:
        worker.stop()
        await running


async def test_session_errors_are_the_unary_errors(server: ConveyorServer) -> None:
    async with Client(_address(server)) as client:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await client.submit(task_pb2.Signature(name=""))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "name" in (raised.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await client.get_result("no-such-task")
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        # The session is still usable after a refused call.
        submitted = await client.submit(sig("add", 1, 2))
        assert state_name((await client.get_result(submitted.task_id)).state) == "PENDING"

    async with grpc.aio.insecure_channel(_address(server)) as channel:
        stub = task_service_pb2_grpc.TaskServiceStub(channel)
        stream = stub.Session()
        await stream.write(task_service_pb2.SessionRequest(call_id=7))
        reply = await stream.read()
        assert isinstance(reply, task_service_pb2.SessionResponse)
        assert reply.call_id == 7
        assert reply.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "submit or get_result" in reply.error.message
        await stream.done_writing()


class WatchedBackend(MemoryBackend):
    """The memory backend, counting change-feed subscriptions: a GetResult that waits on the
    server makes one."""

    def __init__(self) -> None:
        super().__init__()
        self.watches = 0

    def watch(self, keys: Collection[str]) -> AsyncIterator[Changes]:
        self.watches += 1
        return super().watch(keys)


async def test_a_call_on_a_broken_session_fails_and_the_next_one_reconnects() -> None:
    settings = Settings(port=0, http_port=0, broker_url="memory://", backend_url="memory://")
    backend = WatchedBackend()
    first = ConveyorServer(settings, Core.build(settings, broker=MemoryBroker(), backend=backend))
    port = await first.start()
    client = Client(f"127.0.0.1:{port}", max_retry_seconds=0)  # see the failure, not the SDK's retries
    try:
        submitted = await client.submit("add", 1, 2)
        waiting = asyncio.create_task(client.get_result(submitted.task_id, wait=30))
        await eventually(lambda: backend.watches, 10.0, "the server waiting in GetResult")
        await first.stop(grace=0.2)  # the waiting call is cut off, as in a crash
        with pytest.raises(grpc.aio.AioRpcError):
            await waiting
        second = ConveyorServer(Settings(port=port, broker_url="memory://", backend_url="memory://"))
        await second.start()
        try:
            again = await client.submit("add", 3, 4)  # a new server and a new session
            assert state_name((await client.get_result(again.task_id)).state) == "PENDING"
        finally:
            await second.stop()
    finally:
        await client.close()
