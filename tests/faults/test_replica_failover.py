"""A worker given every replica's address (gRPC's own address list, `ipv4:a,b`) delivers the result it holds
when its replica dies to the other replica, while the task's lease still holds: the task is recorded once, as
its first attempt, and never runs again.

Replica A is frozen (SIGSTOP) while its worker's task ends, so the result is sent to A and never acked; then A
is killed. A worker that knew only A would keep the result for a server that is gone: nothing would record it,
and once the lease lapsed another replica would hand the task out again (the flaky chord callback that ran twice
in tests/faults/test_replica_kill.py)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conveyor import Client, sig
from conveyor.v1 import result_pb2
from tests.chaos.conftest import FAST_RECOVERY
from tests.faults.rig import code_env
from tests.support.processes import Proc, Server, WorkerProc, log_lines, replica_target, wait_for, wait_for_workers
from tests.support.redis_server import RedisServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

LEASE_SECONDS = float(FAST_RECOVERY["CONVEYOR_LEASE_SECONDS"])


@pytest.fixture(params=["redis", "sqlite"])
def engine_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """One URL for broker and backend: a private Redis, or the embedded SQLite file both replicas share."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'conveyor.db'}"
        return
    with RedisServer(tmp_path / "redis") as redis:
        yield redis.url()


async def test_a_result_its_dead_replica_never_acked_is_recorded_by_the_other_once(
    tmp_path: Path, procs: list[Proc], engine_url: str
) -> None:
    env = {**FAST_RECOVERY, **code_env()}
    replicas = []
    for name in ("replica-a", "replica-b"):
        server = Server(tmp_path, engine_url, engine_url, env=env, name=name, cwd=tmp_path, wait=False)
        procs.append(server)
        server.wait_ready()
        replicas.append(server)
    replica_a, replica_b = replicas
    executions = tmp_path / "executions.log"
    worker = WorkerProc(tmp_path, replica_target(replica_a.address, replica_b.address), concurrency=1,
                        env={"CONVEYOR_TEST_LOG": str(executions), **code_env()})
    procs.append(worker)
    wait_for_workers(replica_a.address, 1)

    release = tmp_path / "release"
    async with Client(replica_b.address) as client:
        task_id = (await client.submit(sig("gate", str(release)))).task_id
        wait_for(lambda: log_lines(executions, f"gate {task_id}"), 10, "the gate task started on A's worker")

        replica_a.signal(signal.SIGSTOP)  # A takes the result into its socket but never answers it
        release.touch()
        wait_for(lambda: f"gate[{task_id}] succeeded" in worker.output(), 10, "the task ended on the worker")
        await asyncio.sleep(0.3)  # the result is sent (results go out at once when no other task runs)
        killed_at = time.monotonic()
        replica_a.kill9()

        result = await client.get_result(task_id, wait=LEASE_SECONDS)
        recorded_after = time.monotonic() - killed_at
        assert result.state == result_pb2.TASK_STATE_SUCCESS, (
            f"the result was not recorded within the lease ({LEASE_SECONDS} s) after A died: "
            f"{result_pb2.TaskState.Name(result.state)}\n{worker.output()[-3000:]}")
        assert recorded_after < LEASE_SECONDS
        assert result.attempts == 1

        # Past the lease and a recovery round: B took A's expired claim back, found the task ended and did
        # not hand it out again.
        await asyncio.sleep(LEASE_SECONDS + 2 * float(FAST_RECOVERY["CONVEYOR_RECOVER_INTERVAL_SECONDS"]) + 1)
        runs = log_lines(executions, f"gate {task_id}")
        assert len(runs) == 1, f"the task ran {len(runs)} times: {runs}"
        final = await client.get_result(task_id)
        assert final.attempts == 1 and final.state == result_pb2.TASK_STATE_SUCCESS
