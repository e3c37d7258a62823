"""gRPC's own address list (`ipv4:a,b`), as docs/durability.md advises for reaching every replica: a client and
a worker (Python, and Node) given an address nobody answers on first connect to the next one."""

from __future__ import annotations

from pathlib import Path

import pytest

from conveyor import Client, sig
from tests.e2e.test_node import ON_NODE, NodeWorker
from tests.support.processes import Proc, Server, WorkerProc, free_port, replica_target, wait_for_workers

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("language", ["python", ON_NODE])
async def test_a_client_and_a_worker_given_a_dead_address_first_use_the_next(
    tmp_path: Path, procs: list[Proc], language: str
) -> None:
    server = Server(tmp_path, cwd=tmp_path, wait=False)
    procs.append(server)
    server.wait_ready()
    target = replica_target(f"127.0.0.1:{free_port()}", server.address)  # nothing listens on the first
    worker: Proc
    if language == "python":
        worker = WorkerProc(tmp_path, target, concurrency=1)
        signature = sig("add", 2, 3)
    else:
        worker = NodeWorker(tmp_path, target, queues=("default",), concurrency=1)
        signature = sig("node.add", 2, 3)
    procs.append(worker)
    wait_for_workers(server.address, 1)
    async with Client(target) as client:
        assert await client.result(await client.submit(signature), wait=15) == 5
