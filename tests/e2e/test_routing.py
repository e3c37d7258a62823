"""Routing by task name, end to end (issue #15): a Python and a Node worker on one queue, each
with its own task names, run mixed-language chains without a single UnknownTask, on the SQLite
default and on two replicas sharing Redis (a worker on each, chains submitted through both); a
task no worker can run waits, shown as unroutable, and runs once a worker that has it connects."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import grpc
import pytest

from conveyor import Client, chain, sig, state_name
from conveyor.errors import TaskFailed
from conveyor.v1 import admin_service_pb2, admin_service_pb2_grpc
from tests.e2e.test_node import NodeWorker, pytestmark
from tests.support.processes import Proc, Server, WorkerProc, eventually, free_port, run_cli, wait_for_workers

__all__ = ["pytestmark"]  # skipped without node, as tests/e2e/test_node.py
CHAINS = 100


@pytest.fixture(params=["sqlite", "redis"])
def two_addresses(request: pytest.FixtureRequest) -> tuple[str, str]:
    """Where the two workers and clients connect: one SQLite server, or two Redis replicas."""
    if request.param == "sqlite":
        server: Server = request.getfixturevalue("sqlite_server")
        return server.address, server.address
    first, second = request.getfixturevalue("redis_replicas")({})
    return first.address, second.address


def unroutable(address: str, queue: str = "default") -> int:
    with grpc.insecure_channel(address) as channel:
        reply = admin_service_pb2_grpc.AdminServiceStub(channel).ListQueues(
            admin_service_pb2.ListQueuesRequest(), timeout=10
        )
    return sum(q.unroutable for q in reply.queues if q.name == queue)


async def test_mixed_language_chains_on_one_queue_all_succeed(
    tmp_path: Path, procs: list[Proc], two_addresses: tuple[str, str]
) -> None:
    first, second = two_addresses
    procs.append(WorkerProc(tmp_path, first, module="tests.e2e.py_tasks", name="py-worker"))
    procs.append(NodeWorker(tmp_path, second, queues=("default",)))
    for address in {first, second}:
        wait_for_workers(address, 2 if first == second else 1)
    async with Client(first) as a, Client(second) as b:
        halves = await asyncio.gather(*(
            via.submit_batch(chain(sig("py.add", i, 1), sig("node.mul", 10), sig("py.add", 5))
                             for i in range(start, CHAINS, 2))
            for via, start in ((a, 0), (b, 1))
        ))
        # Each chain's result read through the replica it was not submitted to.
        results = await asyncio.gather(
            *(b.result(s.task_id, wait=60) for s in halves[0]), *(a.result(s.task_id, wait=60) for s in halves[1])
        )
    assert results == [(i + 1) * 10 + 5 for i in [*range(0, CHAINS, 2), *range(1, CHAINS, 2)]]


def metrics_line(port: int, line_start: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text: str = reply.read().decode()
    return next((line for line in text.splitlines() if line.startswith(line_start)), "")


async def test_a_task_no_worker_can_run_waits_as_unroutable_then_runs(tmp_path: Path, procs: list[Proc]) -> None:
    db, metrics_port = tmp_path / "conveyor.db", free_port()
    server = Server(tmp_path, f"sqlite:///{db}", f"sqlite:///{db}", env={"CONVEYOR_METRICS_PORT": str(metrics_port)})
    procs.append(server)
    procs.append(WorkerProc(tmp_path, server.address, module="tests.e2e.py_tasks", name="py-worker"))
    wait_for_workers(server.address, 1)
    async with Client(server.address) as client:
        waiting = await client.submit(sig("node.mul", 6, 7))
        await eventually(lambda: unroutable(server.address) == 1, 20, "turned away by the Python worker")
        assert await client.result((await client.submit(sig("py.add", 1, 2))).task_id, wait=20) == 3
        result = await client.get_result(waiting.task_id)
        assert state_name(result.state) in {"PENDING", "RECEIVED"}, "it waits, it is not failed"
        # What an operator sees: `conveyor queues` and the metrics count it as unroutable.
        header, *rows = run_cli(server.address, "queues").splitlines()
        column = header.split().index("UNROUTABLE")
        assert [row.split()[column] for row in rows if row.split()[0] == "default"] == ["1"]
        gauge = 'conveyor_queue_depth{kind="unroutable",queue="default"}'
        await eventually(lambda: metrics_line(metrics_port, gauge) == f"{gauge} 1.0", 20, "the unroutable gauge")

        procs.append(NodeWorker(tmp_path, server.address, queues=("default",)))
        assert await client.result(waiting.task_id, wait=30) == 42
    assert unroutable(server.address) == 0
    await eventually(lambda: metrics_line(metrics_port, gauge) == f"{gauge} 0.0", 20, "the unroutable gauge at 0")


async def test_a_task_past_its_routing_timeout_fails_unroutable(
    tmp_path: Path, procs: list[Proc], sqlite_server: Server, client: Client
) -> None:
    procs.append(WorkerProc(tmp_path, sqlite_server.address, module="tests.e2e.py_tasks", name="py-worker"))
    wait_for_workers(sqlite_server.address, 1)
    waiting = await client.submit(sig("node.mul", 6, 7).set(routing_timeout=1.0))
    patient = await client.submit(sig("node.mul", 6, 7).set(routing_timeout=3600))
    with pytest.raises(TaskFailed) as failed:
        await client.result(waiting.task_id, wait=20)
    assert failed.value.error_type == "Unroutable" and "'node.mul'" in failed.value.message
    result = await client.get_result(patient.task_id)
    assert state_name(result.state) in {"PENDING", "RECEIVED"}, "within its timeout it waits"
