"""A misbehaving worker speaking the raw protocol, to prove the server's guarantees.

    python -m tests.e2e.raw_worker ADDRESS duplicate      # reports every result twice
    python -m tests.e2e.raw_worker ADDRESS die-after N    # dies (exit 9) right after reporting N results

It runs the "member" task (index -> index * index) and logs to CONVEYOR_TEST_LOG like
tests/e2e/workload.py does.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator

import grpc

from conveyor.v1 import worker_service_pb2, worker_service_pb2_grpc
from conveyor.values import from_value, to_value


def _log(line: str) -> None:
    path = os.environ.get("CONVEYOR_TEST_LOG")
    if path:
        with open(path, "a") as out:
            out.write(line + "\n")


async def main(address: str, mode: str, limit: int) -> None:
    outbox: asyncio.Queue[worker_service_pb2.ConnectRequest] = asyncio.Queue()
    outbox.put_nowait(worker_service_pb2.ConnectRequest(hello=worker_service_pb2.Hello(
        worker_id=f"raw-{mode}-{os.getpid()}", language="python-raw", queues=["default"], max_in_flight=10,
    )))

    async def requests() -> AsyncIterator[worker_service_pb2.ConnectRequest]:
        while True:
            yield await outbox.get()

    reported = 0
    async with grpc.aio.insecure_channel(address) as channel:
        call = worker_service_pb2_grpc.WorkerServiceStub(channel).Connect(requests())
        async for message in call:
            if message.WhichOneof("message") == "acks":
                for ack in message.acks.acks:
                    _log(f"ack {ack.task_id} {worker_service_pb2.AckStatus.Name(ack.status)}")
            if message.WhichOneof("message") != "assignments":
                continue
            for assignment in message.assignments.items:
                index = from_value(assignment.task.args[0])
                _log(f"member {index} pid={os.getpid()} raw={mode}")
                outcome = worker_service_pb2.TaskOutcome(
                    task_id=assignment.task.id, lease_token=assignment.lease_token,
                    outcome=worker_service_pb2.OUTCOME_SUCCESS, result=to_value(index * index),
                )
                results = worker_service_pb2.ConnectRequest(results=worker_service_pb2.Results(outcomes=[outcome]))
                outbox.put_nowait(results)
                if mode == "duplicate":
                    outbox.put_nowait(results)
                reported += 1
                if mode == "die-after" and reported >= limit:
                    await asyncio.sleep(0.3)  # let the results leave, then vanish without a goodbye
                    os._exit(9)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 0))
