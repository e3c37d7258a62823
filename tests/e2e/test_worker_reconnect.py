"""A worker whose stream breaks while it runs a long task reconnects and names the tasks it still holds
(Hello.held); the server moves their leases to the new stream, extends them there and does not hand the task
out again when the old stream's grace ends. Before, every task running across a reconnect went back to its
queue when the grace ended (2 s by default) and ran a second time.

The worker (Python, and Node) reaches the server through a TCP proxy the test controls; the proxy resets the
worker's connection while a task runs and accepts the reconnect at once. The task then runs on for two leases.
Each delivery of a task writes a RECEIVED entry into its history: one entry means it was handed out once.
The last test restarts the server itself (a graceful stop, as a deploy does) while the task runs."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from conveyor import Client, sig
from conveyor.v1 import result_pb2
from tests.chaos.conftest import FAST_RECOVERY
from tests.e2e.test_node import ON_NODE, NodeWorker
from tests.support.processes import Proc, Server, WorkerProc, log_lines, wait_for, wait_for_workers
from tests.support.proxy import TcpProxy
from tests.support.wait import wait_for as wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

LEASE_SECONDS = float(FAST_RECOVERY["CONVEYOR_LEASE_SECONDS"])


def deliveries(result: result_pb2.TaskResult) -> int:
    return sum(1 for entry in result.history if entry.state == result_pb2.TASK_STATE_RECEIVED)


async def wait_started(client: Client, task_id: str) -> None:
    async def started() -> bool:
        return (await client.get_result(task_id)).state == result_pb2.TASK_STATE_STARTED

    await wait_until(started, 10, "the task started")


async def held_once_then_done(client: Client, task_id: str, release: Path, server: Proc) -> None:
    """The task still runs under its one delivery; released, it ends as its first attempt, handed out once."""
    running = await client.get_result(task_id)
    assert running.state == result_pb2.TASK_STATE_STARTED, result_pb2.TaskState.Name(running.state)
    assert deliveries(running) == 1, f"handed out again while it ran:\n{running}\n{server.output()[-3000:]}"
    await asyncio.to_thread(release.touch)
    result = await client.get_result(task_id, wait=10)
    assert result.state == result_pb2.TASK_STATE_SUCCESS, result_pb2.TaskState.Name(result.state)
    assert result.attempts == 1 and deliveries(result) == 1, str(result)


@pytest.mark.parametrize("language", ["python", ON_NODE])
async def test_a_task_running_across_a_reconnect_keeps_its_lease_and_runs_once(
    tmp_path: Path, procs: list[Proc], language: str
) -> None:
    # The default 2 s grace, not FAST_RECOVERY's 0.5 s: a reconnect slowed on a busy box past 0.5 s found its
    # task handed back, rightly run again (the grace is what this test relies on, not what it tests).
    server = Server(tmp_path, env={**FAST_RECOVERY, "CONVEYOR_STREAM_GRACE_SECONDS": "2"}, cwd=tmp_path, wait=False)
    procs.append(server)
    server.wait_ready()
    executions = tmp_path / "executions.log"
    release = tmp_path / "release"
    with TcpProxy("127.0.0.1", server.port) as proxy:
        worker: Proc
        if language == "python":  # runs until the test releases it
            worker = WorkerProc(tmp_path, proxy.address, concurrency=1, env={"CONVEYOR_TEST_LOG": str(executions)})
            signature = sig("gate", str(release))
        else:  # runs past the two leases below by itself
            worker = NodeWorker(tmp_path, proxy.address, queues=("default",), concurrency=1)
            signature = sig("node.sleep", 2 * LEASE_SECONDS + 2)
        procs.append(worker)
        wait_for_workers(server.address, 1)
        async with Client(server.address) as client:
            task_id = (await client.submit(signature)).task_id
            await wait_started(client, task_id)

            proxy.reset()  # the worker's stream breaks; its reconnect goes through at once
            wait_for(lambda: "reconnected holding 1 tasks" in server.output(), 10, "the server kept the lease")
            # Past the old stream's grace and two leases: only the new stream's heartbeats kept the lease.
            await asyncio.sleep(2 * LEASE_SECONDS)
            await held_once_then_done(client, task_id, release, server)
            if language == "python":
                assert len(log_lines(executions, f"gate {task_id}")) == 1


async def test_a_task_running_while_its_server_restarts_runs_once(tmp_path: Path, procs: list[Proc]) -> None:
    """A stopping server leaves its workers' leases in the broker; the restarted server takes over the lease the
    worker names when it reconnects (from the task's record, on the embedded SQLite engine) and extends it, so
    the task runs on for leases after the restart and is recorded once. (Before, a stopping server handed back
    the leases of the worker sessions that had ended by its shutdown, and those tasks ran again; whether a
    session had ended by then was a race, so tests/unit/test_worker_stream.py checks the shutdown itself. Then,
    the restarted server did not know the lease, and the task ran again once it lapsed.)"""
    lease_seconds = 4.0  # longer than the restart: the lease the stopped server left is still live
    server = Server(tmp_path, env={**FAST_RECOVERY, "CONVEYOR_LEASE_SECONDS": str(lease_seconds)}, cwd=tmp_path,
                    wait=False)
    procs.append(server)
    server.wait_ready()
    executions = tmp_path / "executions.log"
    release = tmp_path / "release"
    worker = WorkerProc(tmp_path, server.address, concurrency=1, env={"CONVEYOR_TEST_LOG": str(executions)})
    procs.append(worker)
    wait_for_workers(server.address, 1)
    async with Client(server.address) as client:
        task_id = (await client.submit(sig("gate", str(release)))).task_id
    wait_for(lambda: log_lines(executions, f"gate {task_id}"), 10, "the task started")

    server.stop()  # SIGTERM: a graceful stop, as a deploy does
    server.restart()
    wait_for_workers(server.address, 1)
    wait_for(lambda: "holding 1 tasks another replica handed out" in server.output(), 10, "the lease was taken over")
    async with Client(server.address) as client:
        # Past two leases and recovery rounds: only the restarted server's extensions kept the lease.
        await asyncio.sleep(2 * lease_seconds + 2 * float(FAST_RECOVERY["CONVEYOR_RECOVER_INTERVAL_SECONDS"]))
        await held_once_then_done(client, task_id, release, server)
    assert len(log_lines(executions, f"gate {task_id}")) == 1
