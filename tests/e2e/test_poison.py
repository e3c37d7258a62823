"""A poison task (issue #14): a task that kills the worker process running it. Its deliveries
are counted; after `max_deliveries` of them ended without an outcome it fails for good with
WorkerLost and is a dead letter, while the other tasks run, instead of killing worker after
worker forever."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from conveyor import Client, sig, state_name
from conveyor.v1 import admin_service_pb2, admin_service_pb2_grpc
from tests.support.processes import Proc, Server, WorkerProc, log_lines

pytestmark = pytest.mark.timeout(120)

MAX_DELIVERIES = 3
FAST = {
    "CONVEYOR_LEASE_SECONDS": "2",
    "CONVEYOR_HEARTBEAT_INTERVAL_SECONDS": "0.5",
    "CONVEYOR_STREAM_GRACE_SECONDS": "0.3",
    "CONVEYOR_RECOVER_INTERVAL_SECONDS": "0.3",
    "CONVEYOR_MAX_DELIVERIES": str(MAX_DELIVERIES),
}
# Worker processes the test may start before it calls the loop endless.
MOST_WORKERS = 8


async def test_a_task_that_kills_its_worker_fails_with_worker_lost_after_max_deliveries(
    tmp_path: Path, procs: list[Proc]
) -> None:
    db = tmp_path / "conveyor.db"
    server = Server(tmp_path, f"sqlite:///{db}", f"sqlite:///{db}", env=FAST)
    procs.append(server)
    log_file = tmp_path / "events.log"
    log_file.touch()
    async with Client(server.address) as client:
        poison = await client.submit(sig("crash_worker", 7))
        others = await client.submit_batch(sig("add", i, i) for i in range(20))
        started = 0
        while True:
            # One worker at a time, each replaced when the poison task kills it; a window of one
            # task, so that the poison task is all a crash loses.
            started += 1
            assert started <= MOST_WORKERS, "the poison task kept killing workers"
            worker = WorkerProc(tmp_path, server.address, concurrency=1, prefetch=1,
                                env={"CONVEYOR_TEST_LOG": str(log_file)}, name=f"worker-{started}")
            procs.append(worker)
            # Not waiting for it to be listed: it may connect, take the poison task and die at once.
            while worker.alive():
                result = await client.get_result(poison.task_id, wait=0.5)
                if state_name(result.state) == "FAILURE":
                    break
            else:
                await asyncio.sleep(0)  # the worker died: start another
                continue
            break

        assert result.error.type == "WorkerLost", result.error
        assert f"max_deliveries is {MAX_DELIVERIES}" in result.error.message
        assert result.attempts == 1
        # Each delivery ran it, and each killed its worker; nothing ran it after the limit.
        assert len(log_lines(log_file, "crash_worker")) == MAX_DELIVERIES
        assert started == MAX_DELIVERIES + 1 and worker.alive(), "the last worker lives on"
        assert [await client.result(s.task_id, wait=30) for s in others] == [2 * i for i in range(20)]

    async with grpc.aio.insecure_channel(server.address) as channel:
        admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        listed = await admin.ListDeadLetters(admin_service_pb2.ListDeadLettersRequest())
        assert [t.task_id for t in listed.tasks] == [poison.task_id]
