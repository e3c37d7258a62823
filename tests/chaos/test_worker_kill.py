"""Chaos: a worker is killed with SIGKILL twice while 1,000 tasks run; none is lost and every
outcome is recorded exactly once (its stream drops, its leases return after the grace), and
the server ends up listing exactly the three live workers."""

from __future__ import annotations

import functools
from pathlib import Path

import grpc
import pytest

from conveyor import Client, sig
from conveyor.v1 import admin_service_pb2, admin_service_pb2_grpc
from tests.chaos.checks import assert_each_succeeded_once, rerun_after_kill, started_count
from tests.chaos.conftest import FAST_RECOVERY
from tests.support.processes import Proc, Server, WorkerProc, eventually, wait_for, wait_for_workers

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

TASKS = 1000
TASK_SECONDS = 0.03


async def test_kill_9_a_worker_twice_mid_run(tmp_path: Path, procs: list[Proc], log_file: Path) -> None:
    db = tmp_path / "conveyor.db"
    server = Server(tmp_path, f"sqlite:///{db}", f"sqlite:///{db}", env=FAST_RECOVERY)
    procs.append(server)
    env = {"CONVEYOR_TEST_LOG": str(log_file)}

    def start_worker(name: str) -> WorkerProc:
        started = WorkerProc(tmp_path, server.address, concurrency=8, env=env, name=name)
        procs.append(started)
        return started

    workers = [start_worker(f"worker-{i}") for i in range(3)]
    wait_for_workers(server.address, 3)
    async with Client(server.address) as client:
        submitted = await client.submit_batch(sig("chaos", i, TASK_SECONDS) for i in range(TASKS))
        killed: set[str] = set()
        for victim, when in ((workers[0], TASKS // 4), (workers[1], TASKS // 2)):
            await eventually(functools.partial(started_by, log_file, when), 60, f"{when} tasks started")
            victim.kill9()
            killed.add(str(victim.pid))
            assert started_count(log_file) < TASKS, "the kill came too late to hit the run"
            start_worker(f"replacement-for-{victim.pid}")

        counts = await assert_each_succeeded_once(client, [s.task_id for s in submitted], log_file)

    # The killed workers' sessions end (after the stream grace) and the replacements connect
    # (in their own time: the run may end first): then only the three live workers are listed.
    live = {str(w.pid) for w in procs if isinstance(w, WorkerProc) and w.alive()}
    wait_for(lambda: len(list_workers(server.address)) == 3, 30,
             f"exactly the 3 live workers listed (pids {sorted(live)}, killed {sorted(killed)})")

    assert rerun_after_kill(log_file, killed), "the killed workers' in-flight tasks ran again elsewhere"
    assert sum(counts.values()) == TASKS, "every task ran"
    print(f"runs per task: {dict(sorted(counts.items()))}")


def started_by(log_file: Path, count: int) -> bool:
    return started_count(log_file) >= count


def list_workers(address: str) -> list[admin_service_pb2.WorkerInfo]:
    with grpc.insecure_channel(address) as channel:
        stub = admin_service_pb2_grpc.AdminServiceStub(channel)
        return list(stub.ListWorkers(admin_service_pb2.ListWorkersRequest(), timeout=10).workers)
