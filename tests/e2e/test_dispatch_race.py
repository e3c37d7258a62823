"""Assignments go out before RECEIVED is written. When the dispatching replica's own copy of a
record is stale (another replica cancelled the task since), the task is withdrawn: the worker
is told to cancel it, the message is acked, and the result stays CANCELLED."""

from __future__ import annotations

import asyncio

from conveyor import Client, Worker, state_name
from conveyor.tls import open_channel
from conveyor.v1 import admin_service_pb2, admin_service_pb2_grpc
from conveyor_server.app import ConveyorServer, Core
from conveyor_server.backends.memory import MemoryBackend
from conveyor_server.brokers.memory import MemoryBroker
from conveyor_server.config import Settings
from tests.support.wait import wait_for


async def test_a_task_cancelled_on_another_replica_is_withdrawn_from_the_worker() -> None:
    broker, backend = MemoryBroker(), MemoryBackend()
    settings = Settings(port=0, http_port=0, broker_url="memory://", backend_url="memory://")
    dispatching = ConveyorServer(settings, Core.build(settings, broker=broker, backend=backend))
    cancelling = ConveyorServer(settings, Core.build(settings, broker=broker, backend=backend))
    here = f"127.0.0.1:{await dispatching.start()}"
    there = f"127.0.0.1:{await cancelling.start()}"
    worker = Worker(here, concurrency=1)
    began, stopped = asyncio.Event(), asyncio.Event()

    @worker.task("hold")
    async def hold() -> str:
        began.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            stopped.set()
            raise
        return "ran to the end"

    running = None
    try:
        async with Client(here) as client_here, Client(there) as client_there:
            submitted = await client_here.submit("hold")  # the dispatching replica remembers it PENDING
            assert submitted.task_id in await client_there.cancel(submitted.task_id)
            running = asyncio.create_task(worker.run())
            result = await client_here.get_result(submitted.task_id, wait=10)
            assert state_name(result.state) == "CANCELLED"
            if began.is_set():  # it was sent before RECEIVED was refused, and then stopped
                await asyncio.wait_for(stopped.wait(), 10)

            async def queue_empty() -> bool:
                async with open_channel(here) as channel:
                    admin = admin_service_pb2_grpc.AdminServiceStub(channel)
                    queues = (await admin.ListQueues(admin_service_pb2.ListQueuesRequest())).queues
                return [q.ready + q.in_flight for q in queues if q.name == "default"] == [0]

            await wait_for(queue_empty, 10.0, "the withdrawn task's message acked (default queue empty)")
            final = await client_there.get_result(submitted.task_id)
            assert [state_name(t.state) for t in final.history] == ["PENDING", "CANCELLED"]
    finally:
        worker.stop()
        if running is not None:
            await running
        await dispatching.stop()
        await cancelling.stop()
