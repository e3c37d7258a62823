"""A minimal worker the kit itself runs on the raw protocol: it takes a task away from the worker
under test (the stale-lease scenario) and reports a result of its own under its own lease."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TypeAlias

import grpc

from conveyor.v1 import worker_service_pb2, worker_service_pb2_grpc
from conveyor.values import seconds_of, set_seconds, to_value

AckStatus: TypeAlias = worker_service_pb2.AckStatus.ValueType


class KitWorker:
    """Connects straight to the server (not through the proxy) with a window of one."""

    def __init__(self, address: str, token: str, queue: str, task_names: list[str]) -> None:
        self._channel = grpc.aio.insecure_channel(address)
        self._outbox: asyncio.Queue[worker_service_pb2.ConnectRequest | None] = asyncio.Queue()
        self._assignments: asyncio.Queue[worker_service_pb2.Assignment] = asyncio.Queue()
        self._acks: asyncio.Queue[worker_service_pb2.ResultAck] = asyncio.Queue()
        self._hello = worker_service_pb2.Hello(
            language="conformance-kit", queues=[queue], task_names=task_names, max_in_flight=1
        )
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._reader: asyncio.Task[None] | None = None
        self._heartbeats: asyncio.Task[None] | None = None
        self.worker_id = ""

    async def start(self) -> None:
        stub = worker_service_pb2_grpc.WorkerServiceStub(self._channel)
        self._outbox.put_nowait(worker_service_pb2.ConnectRequest(hello=self._hello))
        call = stub.Connect(self._requests(), metadata=self._metadata)
        first = await call.read()
        if not isinstance(first, worker_service_pb2.ConnectResponse) or not first.HasField("welcome"):
            raise RuntimeError(f"the kit's own worker got no Welcome: {first}")
        self.worker_id = first.welcome.worker_id
        interval = seconds_of(first.welcome.heartbeat_interval) or 1.0
        self._reader = asyncio.create_task(self._read(call))
        self._heartbeats = asyncio.create_task(self._beat(interval))

    async def take(self, within: float) -> worker_service_pb2.Assignment | None:
        try:
            return await asyncio.wait_for(self._assignments.get(), within)
        except TimeoutError:
            return None

    async def finish(
        self, assignment: worker_service_pb2.Assignment, value: object, within: float = 10.0
    ) -> AckStatus | None:
        """Report SUCCESS with `value`; the ack's status, None without one `within` seconds."""
        now = time.time()
        outcome = worker_service_pb2.TaskOutcome(task_id=assignment.task.id, lease_token=assignment.lease_token,
                                outcome=worker_service_pb2.OUTCOME_SUCCESS, result=to_value(value))
        set_seconds(outcome.started_at, now)
        set_seconds(outcome.finished_at, now)
        self._outbox.put_nowait(worker_service_pb2.ConnectRequest(results=worker_service_pb2.Results(outcomes=[outcome])))
        try:
            ack = await asyncio.wait_for(self._acks.get(), within)
        except TimeoutError:
            return None
        return ack.status

    async def close(self) -> None:
        self._outbox.put_nowait(worker_service_pb2.ConnectRequest(goodbye=worker_service_pb2.Goodbye()))
        self._outbox.put_nowait(None)
        for task in (self._heartbeats, self._reader):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in (self._heartbeats, self._reader) if t is not None), return_exceptions=True)
        await self._channel.close()

    async def _requests(self) -> AsyncIterator[worker_service_pb2.ConnectRequest]:
        while (message := await self._outbox.get()) is not None:
            yield message

    async def _read(
        self, call: grpc.aio.StreamStreamCall[worker_service_pb2.ConnectRequest, worker_service_pb2.ConnectResponse]
    ) -> None:
        # read(), not `async for`: the Welcome was read with read(), and grpc forbids mixing them.
        while (message := await call.read()) is not grpc.aio.EOF:
            assert isinstance(message, worker_service_pb2.ConnectResponse)
            if message.HasField("assignments"):
                for item in message.assignments.items:
                    self._outbox.put_nowait(worker_service_pb2.ConnectRequest(started=worker_service_pb2.Started(
                        tasks=[worker_service_pb2.LeaseRef(task_id=item.task.id, lease_token=item.lease_token)])))
                    self._assignments.put_nowait(item)
            elif message.HasField("acks"):
                for ack in message.acks.acks:
                    self._acks.put_nowait(ack)

    async def _beat(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self._outbox.put_nowait(worker_service_pb2.ConnectRequest(heartbeat=worker_service_pb2.Heartbeat()))
